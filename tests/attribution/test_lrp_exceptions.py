"""An exception in the middle of a relevance pass leaves the model bit-identical and without hooks:
canonizers (merged BatchNorm, residual Sum) and rules all go through genxai.core.patching.Patch."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from genxai.attribution.lrp import LRP, Composite, Epsilon, RelevanceCAM, ZPlus
from tests.attribution.test_lrp import assert_restored, randomize_batch_norms, snapshot


class Exploding(Epsilon):
    """A rule that fails inside the backward pass, after the rules and canonizers are in place."""

    def relevance(self, layer, a, relevance):
        raise RuntimeError("boom in the backward")


def residual_net() -> nn.Module:
    """Conv + BatchNorm + a torchvision BasicBlock: both default canonizers apply."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        BasicBlock(8, 8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    return randomize_batch_norms(model).eval()


def full_snapshot(model: nn.Module) -> dict:
    return {**snapshot(model), "modules": [list(m._modules) for m in model.modules()]}


def assert_identical(model: nn.Module, before: dict) -> None:
    assert_restored(model, before)  # parameters (objects and bits), buffers, forward, hooks
    assert [list(m._modules) for m in model.modules()] == before["modules"]  # no canonizer_sum left
    assert all("forward" not in vars(m) for m in model.modules())


def test_exception_in_the_backward_restores_the_model(images):
    model = residual_net()
    before = full_snapshot(model)
    reference = model(images)
    exploding = Composite({nn.Conv2d: ZPlus(), nn.Linear: Exploding()})
    method = LRP(model, exploding)
    assert [type(c).__name__ for c in method.canonizers] == ["MergeBatchNorm", "ResNetCanonizer"]
    with pytest.raises(RuntimeError, match="boom in the backward"):
        method(images, target=1)
    assert_identical(model, before)
    with pytest.raises(RuntimeError, match="boom in the backward"):
        RelevanceCAM(model, "3", exploding)(images, target=1)
    assert_identical(model, before)
    torch.testing.assert_close(model(images), reference, rtol=0, atol=0)
    LRP(model)(images, target=1)  # and it still explains afterwards
    assert_identical(model, before)


def test_exception_between_forward_and_backward_restores_the_model(images):
    model = residual_net()
    before = full_snapshot(model)

    def failing_target(output):
        raise KeyError("target failed after the forward")

    with pytest.raises(KeyError, match="target failed"):
        LRP(model)(images, target=failing_target)
    assert_identical(model, before)


def test_exception_in_the_forward_restores_the_model(images):
    model = residual_net()
    before = full_snapshot(model)
    with pytest.raises(RuntimeError):
        LRP(model)(images[:, :2], target=0)  # two channels: the first conv fails inside the rules
    assert_identical(model, before)
