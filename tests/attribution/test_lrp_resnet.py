"""LRP on torchvision ResNets: the residual sum as a module with the Norm rule (ResNetCanonizer)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.resnet import Bottleneck, ResNet

from genxai.attribution.lrp import (
    LRP,
    EpsilonPlus,
    MergeBatchNorm,
    Norm,
    ResNetCanonizer,
    Sum,
    attach,
)
from genxai.attribution.lrp.lrp import default_canonizers
from tests.attribution.test_lrp import (
    assert_agree,
    assert_restored,
    randomize_batch_norms,
    snapshot,
    zennit_relevance,
)

CANONIZERS = (MergeBatchNorm(), ResNetCanonizer())


def small_resnet18(bn_eps: float | None = None) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batch_norms(resnet18(weights=None, num_classes=10), eps=bn_eps)


def small_bottleneck_resnet() -> nn.Module:
    torch.manual_seed(1)
    return randomize_batch_norms(ResNet(Bottleneck, [1, 1, 1, 1], num_classes=5), eps=1e-10)


@pytest.fixture
def images():
    torch.manual_seed(2)
    return torch.rand(2, 3, 32, 32)


def submodule_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules()]


# --- the canonizer --------------------------------------------------------------------------------


def test_sum_with_norm_splits_in_proportion_to_each_branch():
    a = torch.tensor([[1.0, -2.0, 3.0]])
    b = torch.tensor([[3.0, 6.0, 0.0]])
    stacked = torch.stack([a, b], dim=-1).requires_grad_(True)
    relevance = torch.tensor([[4.0, 8.0, 5.0]])
    with attach(Sum(), Norm(1e-12)) as summed:
        (found,) = torch.autograd.grad(summed(stacked), stacked, relevance)
    expected = torch.stack([a, b], dim=-1) * (relevance / (a + b)).unsqueeze(-1)
    torch.testing.assert_close(found, expected)
    torch.testing.assert_close(found.sum(-1), relevance)


def test_canonizer_keeps_the_function_and_gives_sums_the_norm_rule(images):
    model = small_resnet18()
    reference = model(images)
    with ResNetCanonizer().apply(model):
        assert torch.equal(model(images), reference)  # stack + sum is the same float addition
        rules = {name: rule for name, _, rule in EpsilonPlus().assign(model)}
    sums = [name for name in rules if name.endswith("canonizer_sum")]
    assert len(sums) == 8  # one per BasicBlock
    assert all(type(rules[name]) is Norm for name in sums)


def test_model_restored_after_use_and_after_exceptions(images):
    model = small_resnet18()
    before, names = snapshot(model), submodule_names(model)
    lrp = LRP(model, EpsilonPlus(), canonizers=list(CANONIZERS))

    lrp(images, target=1)
    assert_restored(model, before)
    assert submodule_names(model) == names
    with pytest.raises(RuntimeError, match="boom"), ResNetCanonizer().apply(model):
        assert "layer1.0.canonizer_sum" in submodule_names(model)
        raise RuntimeError("boom")
    assert_restored(model, before)
    with pytest.raises(ValueError, match="target"):  # raised while both canonizers are applied
        lrp(images, target=99)
    assert_restored(model, before)
    assert submodule_names(model) == names


def test_applying_twice_is_refused_and_restores(images):
    model = small_resnet18()
    before, names = snapshot(model), submodule_names(model)
    composite = EpsilonPlus(canonizers=[ResNetCanonizer()])
    with pytest.raises(ValueError, match="canonizer_sum"):
        LRP(model, composite, canonizers=[ResNetCanonizer()])(images, target=0)
    assert_restored(model, before)
    assert submodule_names(model) == names


# --- agreement with zennit ------------------------------------------------------------------------


@pytest.mark.peers
@pytest.mark.parametrize(("bn_eps", "tolerance"), [(None, 1e-4), (1e-10, 1e-5)])
def test_resnet18_matches_zennit(images, bn_eps, tolerance):
    zc = pytest.importorskip("zennit.composites")
    zt = pytest.importorskip("zennit.torchvision")
    model = small_resnet18(bn_eps)
    ours = LRP(model, EpsilonPlus(), canonizers=list(CANONIZERS))(images, target=3)
    # zennit's ResNetCanonizer merges BatchNorm too, but leaves each BatchNorm computing
    # x / sqrt(1 + eps); with the default eps=1e-5 that costs ~3e-5 of the largest relevance, and
    # a tiny eps leaves only float32 rounding (~3e-6).
    theirs = zennit_relevance(model, images, zc.EpsilonPlus(canonizers=[zt.ResNetCanonizer()]), target=3)
    assert_agree(ours, theirs, rtol=tolerance)


@pytest.mark.peers
def test_bottleneck_resnet_matches_zennit(images):
    zc = pytest.importorskip("zennit.composites")
    zt = pytest.importorskip("zennit.torchvision")
    model = small_bottleneck_resnet()
    ours = LRP(model, EpsilonPlus(), canonizers=list(CANONIZERS))(images, target=2)
    theirs = zennit_relevance(model, images, zc.EpsilonPlus(canonizers=[zt.ResNetCanonizer()]), target=2)
    assert_agree(ours, theirs, rtol=1e-5)


# --- conservation and defaults --------------------------------------------------------------------


def test_residual_sums_make_relevance_conserved_without_biases(images):
    model = small_resnet18()
    with torch.no_grad():  # BatchNorm merges to a bias-free scale; fc loses its bias: z+/epsilon conserve
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.zero_()
                module.bias.zero_()
        model.fc.bias.zero_()
    logits = model(images)[:, 3]
    with_sums = LRP(model, EpsilonPlus(), canonizers=list(CANONIZERS))(images, target=3).sum((1, 2, 3))
    gradient_sums = LRP(model, EpsilonPlus(), canonizers=[MergeBatchNorm()])(images, target=3).sum((1, 2, 3))
    torch.testing.assert_close(with_sums, logits, rtol=1e-3, atol=1e-6)
    # the plain gradient copies the full relevance into both branches of every addition
    assert ((gradient_sums - logits).abs() > 10 * (with_sums - logits).abs()).all()
    assert ((gradient_sums - logits).abs() > logits.abs()).all()


def test_resnet_canonizer_is_added_by_default(images):
    model = small_resnet18()
    chosen = default_canonizers(model, EpsilonPlus(), None)
    assert [type(c) for c in chosen] == [MergeBatchNorm, ResNetCanonizer]
    assert default_canonizers(model, EpsilonPlus(), []) == []
    assert default_canonizers(model, EpsilonPlus(canonizers=[ResNetCanonizer()]), None) == []
    explicit = LRP(model, EpsilonPlus(), canonizers=list(CANONIZERS))(images, target=5)
    torch.testing.assert_close(LRP(model)(images, target=5), explicit)
    merged_only = LRP(model, canonizers=[MergeBatchNorm()])(images, target=5)
    assert not torch.allclose(merged_only, explicit)
