"""What every attribution method shares: one call shape, input checks, target handling, output form.

    heat = GradCAM(model, layer="layer4")(x, target=3)

A method subclass implements :meth:`Attribution.attribute` only; checks, target normalisation,
float32 output on the input's device and optional per-image min-max scaling happen here. Layer
methods (the CAM family, Relevance-CAM) derive from :class:`LayerAttribution`, which resolves the
layer once (an unknown name lists the closest names) and upsamples maps to the input size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from genxai.core.checks import check_images
from genxai.core.hooks import resolve_layer
from genxai.core.registry import Registry
from genxai.core.targets import Target, as_target

METHODS: Registry[type[Attribution]] = Registry("attribution method")
register = METHODS.register


def normalize_maps(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Min-max scale each image's map to [0, 1]; a flat map becomes all zeros (never NaN)."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values.view(-1, *[1] * (maps.ndim - 1))
    high = flat.max(dim=1).values.view(-1, *[1] * (maps.ndim - 1))
    span = high - low
    return torch.where(span > eps, (maps - low) / span.clamp_min(eps), torch.zeros_like(maps))


def reduce_channels(maps: torch.Tensor, how: str = "max_abs") -> torch.Tensor:
    """(N, C, H, W) -> (N, 1, H, W): ``max_abs`` (Simonyan), ``sum``, ``abs_sum``, ``l2`` or ``mean``."""
    if how == "max_abs":
        return maps.abs().amax(dim=1, keepdim=True)
    if how == "sum":
        return maps.sum(dim=1, keepdim=True)
    if how == "abs_sum":
        return maps.abs().sum(dim=1, keepdim=True)
    if how == "l2":
        return maps.pow(2).sum(dim=1, keepdim=True).sqrt()
    if how == "mean":
        return maps.mean(dim=1, keepdim=True)
    raise ValueError(f"reduce: expected 'max_abs', 'sum', 'abs_sum', 'l2' or 'mean', got {how!r}")


def upsample_to(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, 1, h, w) maps to ``size`` (no-op when already there)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


class Attribution(ABC):
    """Base class: ``Method(model, **options)(x, target=None) -> maps``.

    Args:
        model: any ``nn.Module`` taking a (N, C, H, W) batch. Its train/eval mode and
            ``requires_grad`` flags are left as they are; nothing stays attached after a call.
        normalize: min-max scale each returned map to [0, 1].
        autocast: run forwards under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``).

    ``target`` in ``__call__``: int class, (N,) tensor of classes, callable ``output -> (N,)`` or a
    :class:`genxai.targets.Target`; None explains the predicted class (or a single logit).
    """

    name: ClassVar[str] = ""
    #: "map": an explanation of the input (scored by the metrics); "image": a synthesised input.
    output: ClassVar[str] = "map"

    def __init__(self, model: nn.Module, *, normalize: bool = False, autocast: torch.dtype | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.normalize = normalize
        self.autocast = autocast

    def __call__(self, x: torch.Tensor, target: Any = None, **kwargs: Any) -> torch.Tensor:
        x = check_images(x, "x")
        maps = self.attribute(x, as_target(target), **kwargs).float()
        return normalize_maps(maps) if self.normalize else maps

    @abstractmethod
    def attribute(self, x: torch.Tensor, target: Target, **kwargs: Any) -> torch.Tensor:
        """The method itself: checked input ``x`` and a normalised ``target`` -> raw maps."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__})"


class LayerAttribution(Attribution):
    """Base of methods that explain through one layer's activations: maps are (N, 1, H, W).

    Args:
        layer: dotted module name (e.g. ``"layer4"`` or ``"features.28"``) or the module itself.
        upsample: resize maps bilinearly to the input size (False keeps the layer's resolution).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module,
        *,
        upsample: bool = True,
        normalize: bool = False,
        autocast: torch.dtype | None = None,
    ):
        super().__init__(model, normalize=normalize, autocast=autocast)
        self.layer_name, self.layer = resolve_layer(model, layer)
        self.upsample = upsample

    def finish(self, maps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Bring layer-resolution maps (N, 1, h, w) to the output form."""
        if maps.ndim == 3:
            maps = maps.unsqueeze(1)
        return upsample_to(maps, tuple(x.shape[-2:])) if self.upsample else maps

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__}, layer={self.layer_name!r})"
