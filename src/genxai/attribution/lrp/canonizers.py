"""Canonizers: rewrite a model temporarily into an equivalent form that LRP's rules suit.

LRP's rules are defined on linear layers followed by element-wise activations. A BatchNorm after a
convolution is an affine map of its own; :class:`MergeBatchNorm` folds it into the layer before it
(``W' = W * s``, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``) and makes the
BatchNorm the identity, so the model computes the same function and the rules see one layer.

``with canonizer.apply(model):`` makes the change (through :class:`genxai.core.patching.Patch`);
leaving the block, however it is left, puts the original Parameter objects back (untouched, so
bitwise equal) and the BatchNorm's own forward.

A residual addition (``out += identity`` in a torchvision ResNet block) is no module, so no rule
sees it and plain gradient splits its relevance equally between the two branches.
:class:`ResNetCanonizer` routes it through a :class:`Sum` module, which the composites give the
:class:`~genxai.attribution.lrp.rules.Norm` rule: each branch gets relevance in proportion to its
contribution to the sum (as zennit's ``ResNetCanonizer``, without its BatchNorm merging).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from functools import partial
from itertools import pairwise
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from genxai.attribution.lrp.rules import LINEAR_LAYERS
from genxai.core.patching import Patch

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
RESNET_BLOCKS = (BasicBlock, Bottleneck)


class Canonizer:
    """Base class: :meth:`apply` is a context manager that rewrites ``model`` and restores it."""

    def apply(self, model: nn.Module) -> AbstractContextManager[nn.Module]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def check_canonizers(canonizers: Any) -> list[Canonizer]:
    """None or a sequence of canonizers -> a list, with a clear error for anything else."""
    if canonizers is None:
        return []
    if isinstance(canonizers, Canonizer):
        return [canonizers]
    if not isinstance(canonizers, Sequence) or not all(isinstance(c, Canonizer) for c in canonizers):
        raise TypeError(f"canonizers: expected a list of Canonizer objects, got {canonizers!r}")
    return list(canonizers)


def _leaves(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if next(module.children(), None) is None]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def merged_parameters(layer: nn.Module, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``layer`` followed by the eval-mode BatchNorm ``norm``, as one layer."""
    with torch.no_grad():
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = norm.weight * scale
        beta = norm.bias if norm.bias is not None else torch.zeros_like(scale)
        weight = layer.weight
        bias = layer.bias if layer.bias is not None else torch.zeros_like(scale)
        if isinstance(layer, _TRANSPOSED):  # weight (in, out / groups, ...): output channels on dim 1
            groups = layer.groups
            grouped = weight.unflatten(0, (groups, -1))
            shape = (groups, 1, -1, *[1] * (weight.ndim - 2))
            weight = (grouped * scale.view(shape)).flatten(0, 1)
        else:  # weight (out, ...)
            weight = weight * scale.view(-1, *[1] * (weight.ndim - 1))
        return weight, (bias - norm.running_mean) * scale + beta


@contextmanager
def merge_batch_norm(layer: nn.Module, norm: nn.Module, name: str = "") -> Iterator[nn.Module]:
    """Fold ``norm`` into ``layer`` inside the block (see the module docstring)."""
    where = f" ({name})" if name else ""
    if norm.training:
        raise ValueError(
            f"model: MergeBatchNorm needs the model in eval mode (call model.eval()); a BatchNorm in "
            f"training mode{where} normalises with batch statistics"
        )
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError(f"model: a BatchNorm{where} without running statistics cannot be merged")
    if not isinstance(layer._parameters.get("weight"), nn.Parameter):
        raise ValueError(
            f"model: the layer before a BatchNorm{where} has no plain weight Parameter to merge into"
        )
    weight, bias = merged_parameters(layer, norm)
    requires_grad = layer.weight.requires_grad
    with Patch() as patch:
        patch.parameter(layer, "weight", weight)
        patch.parameter(layer, "bias", bias, requires_grad=requires_grad)
        patch.forward(norm, _identity)
        yield layer


class MergeBatchNorm(Canonizer):
    """Merge every BatchNorm that directly follows a Linear/Conv/ConvTranspose layer (leaf modules
    in definition order, as zennit's SequentialMergeBatchNorm) into that layer. Needs eval mode."""

    def pairs(self, model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
        leaves = _leaves(model)
        return [
            (before, after)
            for before, after in pairwise(leaves)
            if isinstance(before, LINEAR_LAYERS) and isinstance(after, BATCH_NORMS)
        ]

    @contextmanager
    def apply(self, model: nn.Module) -> Iterator[nn.Module]:
        names = {module: name for name, module in model.named_modules()}
        with ExitStack() as stack:
            for layer, norm in self.pairs(model):
                stack.enter_context(merge_batch_norm(layer, norm, names.get(norm, "")))
            yield model


class Sum(nn.Module):
    """The sum over ``dim``: a residual addition as a module, so a composite can give it a rule."""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sum(x, dim=self.dim)


def _residual(block: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``relu(shortcut(x) + out)``, the addition done by the block's ``canonizer_sum``."""
    identity = x if block.downsample is None else block.downsample(x)
    return block.relu(block.canonizer_sum(torch.stack([identity, out], dim=-1)))


def _basic_block_forward(block: BasicBlock, x: torch.Tensor) -> torch.Tensor:
    out = block.relu(block.bn1(block.conv1(x)))
    return _residual(block, x, block.bn2(block.conv2(out)))


def _bottleneck_forward(block: Bottleneck, x: torch.Tensor) -> torch.Tensor:
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.relu(block.bn2(block.conv2(out)))
    return _residual(block, x, block.bn3(block.conv3(out)))


@contextmanager
def sum_residual(block: nn.Module) -> Iterator[nn.Module]:
    """Give a torchvision BasicBlock/Bottleneck a ``canonizer_sum`` submodule and a forward using it."""
    if "canonizer_sum" in block._modules:
        raise ValueError("model: a ResNet block already has a 'canonizer_sum' (canonizer applied twice?)")
    forward = _bottleneck_forward if isinstance(block, Bottleneck) else _basic_block_forward
    with Patch() as patch:
        patch.submodule(block, "canonizer_sum", Sum())
        patch.forward(block, partial(forward, block))
        yield block


class ResNetCanonizer(Canonizer):
    """Route the residual sum of every torchvision ResNet BasicBlock/Bottleneck through a :class:`Sum`
    module (see the module docstring). Combine with :class:`MergeBatchNorm` for the BatchNorms."""

    @contextmanager
    def apply(self, model: nn.Module) -> Iterator[nn.Module]:
        with ExitStack() as stack:
            for block in [m for m in model.modules() if isinstance(m, RESNET_BLOCKS)]:
                stack.enter_context(sum_residual(block))
            yield model
