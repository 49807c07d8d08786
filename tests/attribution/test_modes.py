"""An explanation or a metric never changes the model: every registered method and every
model-scoring metric, run on a model left in train mode (BatchNorm, Dropout), leaves parameters,
buffers and each module's mode exactly as they were, also when the call fails. Inputs in the wrong
precision and out-of-range targets are reported in the caller's terms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genxai.attribution import IntegratedGradients, Saliency, build, names
from genxai.core.modes import evaluation_mode
from genxai.evaluation import (
    AverageDrop,
    Deletion,
    IncreaseInConfidence,
    Insertion,
    WinPercent,
    model_randomization,
)

CLASSES = 5


class NormDropNet(nn.Module):
    """conv-BN-ReLU-Dropout features, global average pool, dropout, linear head (CAM-compatible)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Dropout2d(0.5),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pool(self.features(x)).flatten(1)))


def make_model() -> NormDropNet:
    torch.manual_seed(0)
    model = NormDropNet()
    with torch.no_grad():  # non-trivial running statistics, so eval mode differs from train mode
        for norm in (model.features[1], model.features[5]):
            norm.running_mean.uniform_(-0.2, 0.2)
            norm.running_var.uniform_(0.5, 2.0)
    model.train()
    model.features[5].eval()  # mixed modes: each module must get its own mode back
    return model


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[bool]]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [m.training for m in model.modules()]


def assert_unchanged(model: nn.Module, before: tuple[dict[str, torch.Tensor], list[bool]]) -> None:
    state, modes = before
    now = model.state_dict()
    assert now.keys() == state.keys()
    changed = [k for k in state if not torch.equal(now[k], state[k])]
    assert not changed, f"changed: {changed}"  # parameters and buffers (running stats, counters)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 3, 12, 12)


# Defaults, except fewer samples for the slowest methods (the property does not depend on them).
FAST = {
    "rise": {"masks": 64},
    "lime": {"samples": 32},
    "kernelshap": {"samples": 32},
    "classmodel": {"steps": 4},
    "smoothgrad": {"samples": 4},
    "integratedgradients": {"steps": 8},
}


@pytest.mark.parametrize("name", names())
def test_every_method_leaves_a_training_model_unchanged_and_explains_it_in_eval_mode(name, x):
    model = make_model()
    before = snapshot(model)
    maps = build(name, model, **FAST.get(name, {}))(x, target=1)
    assert_unchanged(model, before)
    assert torch.isfinite(maps).all()
    reference = make_model().eval()  # the same weights: in eval mode the result must be the same
    expected = build(name, reference, **FAST.get(name, {}))(x, target=1)
    torch.testing.assert_close(maps, expected)


@pytest.mark.parametrize("name", names())
def test_every_method_restores_modes_when_it_fails(name, x):
    model = make_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"target: class indices out of range \[0, 5\): \[1, 7\]"):
        build(name, model, **FAST.get(name, {}))(x, target=torch.tensor([1, 7]))
    assert_unchanged(model, before)


def test_default_options_of_rise_and_integrated_gradients_leave_the_model_unchanged(x):
    model = make_model()
    before = snapshot(model)
    build("rise", model)(x, target=0)
    build("integratedgradients", model)(x, target=0)
    assert_unchanged(model, before)


def test_evaluation_mode_restores_modes_on_exceptions():
    model = make_model()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), evaluation_mode(model):
        assert not any(m.training for m in model.modules())
        raise RuntimeError("boom")
    assert_unchanged(model, before)
    with pytest.raises(TypeError, match=r"model: expected a torch\.nn\.Module"), evaluation_mode("net"):
        pass


@pytest.mark.parametrize("metric", [AverageDrop, IncreaseInConfidence, Deletion, Insertion])
def test_metrics_leave_a_training_model_unchanged(metric, x):
    model = make_model()
    before = snapshot(model)
    maps = torch.rand(2, 1, 12, 12)
    options = {"steps": 4} if metric in (Deletion, Insertion) else {}
    value = metric(model, sync_on_compute=False, **options)
    value.update(x, maps)
    assert_unchanged(model, before)
    reference = metric(make_model().eval(), sync_on_compute=False, **options)
    reference.update(x, maps)
    torch.testing.assert_close(value.compute().per_image, reference.compute().per_image)
    with pytest.raises(ValueError, match="out of range"):
        value.update(x, maps, target=9)
    assert_unchanged(model, before)


def test_win_percent_and_sanity_check_leave_a_training_model_unchanged(x):
    model = make_model()
    before = snapshot(model)
    win = WinPercent(model, sync_on_compute=False)
    win.update(x, torch.rand(2, 1, 12, 12), torch.rand(2, 1, 12, 12))
    result = model_randomization(Saliency, model, x, target=0, layers=["fc", "features.4"])
    assert_unchanged(model, before)
    # the copy is explained in eval mode: the original maps are those of the eval-mode model
    torch.testing.assert_close(result.original, Saliency(make_model().eval())(x, target=0))


# -- precision ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", names())
def test_a_float64_input_to_a_float32_model_is_a_clear_error(name, x):
    model = make_model()
    with pytest.raises(
        ValueError,
        match=r"x: expected float32, bfloat16 or float16 .* got float64; convert with x\.float\(\)",
    ):
        build(name, model, **FAST.get(name, {}))(x.double(), target=1)


def test_a_float32_input_to_a_float64_model_is_a_clear_error(x):
    model = make_model().double()
    with pytest.raises(
        ValueError, match=r"x: expected float64 .* got torch.float32; convert with x\.double\(\)"
    ):
        Saliency(model)(x, target=1)


@pytest.mark.parametrize("name", names())
def test_a_float64_model_explains_float64_input(name, x):
    model = make_model().double().eval()
    maps = build(name, model, **FAST.get(name, {}))(x.double(), target=1)
    assert maps.dtype == torch.float32 and torch.isfinite(maps).all()


# -- targets ----------------------------------------------------------------------------------------


def test_out_of_range_targets_are_reported_as_given_not_as_the_expanded_batch():
    model = make_model().eval()
    torch.manual_seed(2)
    images = torch.rand(4, 3, 12, 12)
    method = IntegratedGradients(model, steps=4, internal_batch_size=16)
    with pytest.raises(ValueError) as info:
        method(images, target=torch.tensor([0, 1, 2, 9]))
    assert str(info.value) == "target: class indices out of range [0, 5): [0, 1, 2, 9]"
    with pytest.raises(ValueError, match=r"expected 4 class indices \(one per image\), got 3"):
        method(images, target=torch.tensor([0, 1, 2]))
