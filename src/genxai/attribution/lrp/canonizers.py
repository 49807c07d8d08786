"""Canonizers: rewrite a model temporarily into an equivalent form that LRP's rules suit.

LRP's rules are defined on linear layers followed by element-wise activations. A BatchNorm after a
convolution is an affine map of its own; :class:`MergeBatchNorm` folds it into the layer before it
(``W' = W * s``, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``) and makes the
BatchNorm the identity, so the model computes the same function and the rules see one layer.

``with canonizer.apply(model):`` makes the change; leaving the block, however it is left, puts the
original Parameter objects back (untouched, so bitwise equal) and the BatchNorm's own forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from itertools import pairwise
from typing import Any

import torch
from torch import nn

from genxai.attribution.lrp.rules import LINEAR_LAYERS, replace_forward

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


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
    saved = {key: layer._parameters.get(key) for key in ("weight", "bias")}
    try:
        layer._parameters["weight"] = nn.Parameter(weight, requires_grad=saved["weight"].requires_grad)
        layer._parameters["bias"] = nn.Parameter(bias, requires_grad=saved["weight"].requires_grad)
        with replace_forward(norm, _identity):
            yield layer
    finally:
        layer._parameters.update(saved)


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
