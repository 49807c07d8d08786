import math
import warnings

import pytest
import torch
from torch import nn

from genxai.attribution.base import METHODS
from genxai.attribution.visualization import ClassModelVisualization
from genxai.core.hooks import run_until
from genxai.core.maps import gaussian_blur
from genxai.targets import UnitActivation


def test_registered():
    assert METHODS.get("classmodel") is ClassModelVisualization
    assert METHODS.get("activation_maximization") is ClassModelVisualization


def test_plain_ascent_reaches_the_closed_form_optimum():
    # For a linear score w . I + b the objective w . I - l2 |I|^2 peaks at I = w / (2 l2).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
    method = ClassModelVisualization(model, steps=40, lr=1.0, l2=0.2, jitter=0, blur_every=0)
    images = method(torch.zeros(2, 2, 4, 4), target=torch.tensor([0, 2]))
    expected = model[1].weight[[0, 2]].view(2, 2, 4, 4) / (2 * 0.2)
    assert torch.allclose(images, expected, atol=1e-5)


def test_increases_the_class_score_from_zero(gapnet):
    x = torch.zeros(5, 3, 16, 16)
    method = ClassModelVisualization(gapnet, steps=30, lr=0.3, l2=1e-3, normalize_grad=True)
    images = method(x, target=torch.arange(5))
    with torch.no_grad():
        before, after = gapnet(x).diagonal(), gapnet(images).diagonal()
    # Every class gains; on average by more than the spread of the logits of the zero image (0.53).
    assert (after > before + 0.03).all()
    assert (after - before).mean() > 0.4
    assert images.shape == x.shape and torch.isfinite(images).all()


def test_deterministic_with_seed(gapnet, images):
    def run(seed):
        return ClassModelVisualization(gapnet, steps=8, lr=50.0, jitter=2, seed=seed)(images, target=1)

    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))


def test_unit_activation_target(gapnet):
    x = torch.zeros(1, 3, 16, 16)
    target = UnitActivation("features.2", 5)
    images = ClassModelVisualization(gapnet, steps=30, lr=0.05, normalize_grad=True)(x, target=target)
    with torch.no_grad():
        before = run_until(gapnet, "features.2", x)[:, 5].mean()
        after = run_until(gapnet, "features.2", images)[:, 5].mean()
    assert after > before + 0.02
    assert not gapnet.features[2]._forward_hooks


def test_init_from_input(gapnet, images):
    method = ClassModelVisualization(gapnet, steps=1, lr=1e-6, l2=0.0, blur_every=0, init="input")
    assert torch.allclose(method(images, target=0), images, atol=1e-5)
    zeros = ClassModelVisualization(gapnet, steps=1, lr=1e-6, blur_every=0)(images, target=0)
    assert zeros.abs().max() < 1e-5


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """The class model's blur: replicated borders, radius max(1, ceil(3 sigma))."""
    return gaussian_blur(images, sigma, radius=max(1, math.ceil(3 * sigma)), padding="replicate")


def test_gaussian_blur_keeps_constants_and_mass():
    flat = torch.full((1, 2, 6, 6), 0.3)
    assert torch.allclose(blur(flat, 1.0), flat)
    spike = torch.zeros(1, 1, 9, 9)
    spike[0, 0, 4, 4] = 1.0
    blurred = blur(spike, 0.8)
    assert torch.isclose(blurred.sum(), torch.tensor(1.0)) and blurred.max() < 0.5


def test_bad_input(gapnet, images):
    with pytest.raises(ValueError, match="init"):
        ClassModelVisualization(gapnet, init="noise")
    with pytest.raises(ValueError, match="steps"):
        ClassModelVisualization(gapnet, steps=0)
    with pytest.raises(ValueError, match="lr"):
        ClassModelVisualization(gapnet, lr=-1.0)
    with pytest.raises(ValueError, match="target: class 5 out of range"):
        ClassModelVisualization(gapnet, steps=2)(images, target=5)
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x: contains 1 NaN"):
        ClassModelVisualization(gapnet, steps=2)(bad, target=0)


def _resnet_like() -> nn.Module:
    """conv (no bias) -> BatchNorm -> ReLU -> pool -> linear: at the zero image every ReLU is off,
    so no gradient reaches the image (as in a random ResNet-18)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


def test_a_constant_result_warns_and_a_dead_start_stops_at_once():
    model = _resnet_like()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    with pytest.warns(UserWarning, match=r"result is constant \(0\) for images \[0, 1\].*init='input'"):
        images = ClassModelVisualization(model, steps=1000)(torch.zeros(2, 3, 8, 8), target=1)
    assert not images.any()
    assert len(calls) == 2  # binding the target, then one step: a zero image with no gradient stays zero


def test_a_moving_result_does_not_warn(gapnet, images):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ClassModelVisualization(gapnet, steps=3)(images, target=1)


def test_max_seconds_bounds_the_time(gapnet, images):
    calls = []
    gapnet.register_forward_hook(lambda *_: calls.append(1))
    method = ClassModelVisualization(gapnet, steps=50, max_seconds=1e-9)
    with pytest.warns(UserWarning, match=r"stopped after 1 of 50 steps \(max_seconds=1e-09\)"):
        method(images, target=1)
    assert len(calls) == 2  # binding, then the one step every run makes
    with pytest.raises(ValueError, match=r"max_seconds: expected a number in \(0.0, inf\), got 0"):
        ClassModelVisualization(gapnet, max_seconds=0)
