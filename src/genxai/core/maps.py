"""Per-image map arithmetic every capability shares: min-max scaling and a Gaussian blur.

One definition of each, so a saliency map drawn in a report, masked into an image by a metric and
turned into a noise weight by the diffusion method is scaled and smoothed the same way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PADDINGS = ("reflect", "replicate", "zeros")


def minmax_normalize(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale each image's map (all dims after the first) to [0, 1]; a flat map becomes zeros, never NaN."""
    flat = maps.flatten(1)
    shape = (-1,) + (1,) * (maps.ndim - 1)
    low, high = flat.amin(dim=1).view(shape), flat.amax(dim=1).view(shape)
    span = high - low
    return torch.where(span > eps, (maps - low) / span.clamp_min(eps), torch.zeros_like(maps))


def gaussian_blur(
    x: torch.Tensor, sigma: float, *, radius: int | None = None, padding: str = "reflect"
) -> torch.Tensor:
    """Separable Gaussian blur of each channel of (N, C, H, W) ``x``; ``sigma`` in pixels.

    The kernel has ``2 * radius + 1`` taps (default radius ``ceil(3 sigma)``); ``padding`` is
    ``reflect`` (radius capped at the image size minus one, as reflection needs), ``replicate``
    or ``zeros``. ``sigma <= 0`` or a radius below 1 returns ``x`` unchanged. With radius 5,
    sigma 5 and reflect padding this is torchvision's ``gaussian_blur(x, [11, 11], [5, 5])``.
    """
    if padding not in PADDINGS:
        raise ValueError(f"padding: expected one of {PADDINGS}, got {padding!r}")
    if sigma <= 0:
        return x
    radius = math.ceil(3 * sigma) if radius is None else int(radius)
    if padding == "reflect":
        radius = min(radius, x.shape[-2] - 1, x.shape[-1] - 1)
    if radius < 1:
        return x
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    pad = (radius, radius, radius, radius)
    x = F.pad(x, pad) if padding == "zeros" else F.pad(x, pad, mode=padding)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
