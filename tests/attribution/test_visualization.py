import math

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
