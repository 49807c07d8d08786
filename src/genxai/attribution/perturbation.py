"""Perturbation methods: Occlusion and RISE.

Both score many perturbed copies of each image with :func:`genxai.core.engine.batched_scores`:
copies are built lazily, ``batch_size`` rows at a time, from several images at once, so memory
stays bounded whatever the number of windows or masks. The target is bound on the clean output
first, so the explained class stays fixed while the input is perturbed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from genxai.attribution.base import Attribution, register
from genxai.core.checks import baseline_like, check_in_range, check_positive_int
from genxai.core.engine import batched_scores
from genxai.core.targets import Target, bind_target


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name}: expected an int or a pair (height, width), got {value!r}")
    for v in pair:
        check_positive_int(v, name)
    return pair


@register("occlusion")
class Occlusion(Attribution):
    """Score drop when a sliding window is set to a baseline (Zeiler & Fergus, 2014).

    Each pixel gets the mean of ``score(x) - score(x with the window occluded)`` over the windows
    that cover it (Captum's convention); the window spans all channels, so the (N, C, H, W) map has
    the same value in every channel. Pixels no window covers (when the stride skips the border)
    get 0.

    Args:
        window: window size, an int or (height, width).
        stride: step between windows, an int or a pair; default half the window.
        baseline: value of occluded pixels, a number or a tensor broadcastable to ``x``.
        batch_size: occluded copies per forward.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        window: int | tuple[int, int] = 8,
        stride: int | tuple[int, int] | None = None,
        baseline: float | torch.Tensor = 0.0,
        batch_size: int = 64,
        **kwargs,
    ):
        super().__init__(model, **kwargs)
        self.window = _pair(window, "window")
        self.stride = (
            tuple(max(1, w // 2) for w in self.window) if stride is None else _pair(stride, "stride")
        )
        self.baseline = baseline
        self.batch_size = check_positive_int(batch_size, "batch_size")

    def windows(self, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column indicators (ky, H) and (kx, W) of the window positions."""
        (wh, ww), (sh, sw) = self.window, self.stride
        if wh > height or ww > width:
            raise ValueError(f"window: {self.window} is larger than the image ({height}, {width})")
        rows = _indicators(height, wh, sh, device)
        cols = _indicators(width, ww, sw, device)
        return rows, cols

    def attribute(
        self, x: torch.Tensor, target: Target, baseline: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        n, _, height, width = x.shape
        rows, cols = self.windows(height, width, x.device)
        base = baseline_like(self.baseline if baseline is None else baseline, x)
        target, clean = bind_target(self.model, x, target, self.autocast)
        per_image = rows.shape[0] * cols.shape[0]

        def make_batch(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
            index = torch.arange(start, stop, device=x.device)
            image, window = index // per_image, index % per_image
            inside = rows[window // cols.shape[0], :, None] * cols[window % cols.shape[0], None, :]
            return torch.where(inside[:, None] > 0, base[image], x[image]), image

        scores = batched_scores(
            self.model, make_batch, n * per_image, target, batch_size=self.batch_size, autocast=self.autocast
        )
        drop = (clean[:, None] - scores.view(n, per_image)).view(n, rows.shape[0], cols.shape[0])
        total = torch.einsum("nab,ay,bx->nyx", drop, rows, cols)
        count = rows.sum(0)[:, None] * cols.sum(0)[None, :]
        maps = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
        return maps[:, None].expand_as(x).contiguous()


def _indicators(size: int, window: int, stride: int, device: torch.device) -> torch.Tensor:
    """(positions, size) float 0/1: row k marks the pixels of the k-th window along one axis."""
    starts = torch.arange(0, size - window + 1, stride, device=device)
    pixels = torch.arange(size, device=device)
    return ((pixels >= starts[:, None]) & (pixels < starts[:, None] + window)).float()


@register("rise")
class RISE(Attribution):
    """Randomized Input Sampling for Explanation (Petsiuk et al., 2018).

    ``saliency = sum_i score(x * M_i) M_i / (masks * p)``: the expected score given each pixel is
    kept. Each mask is a random ``cell x cell`` binary grid (cells kept with probability ``p``)
    upsampled bilinearly to ``(cell + 1) * ceil(H / cell)`` pixels and cropped with a random shift,
    so mask edges are smooth and fall anywhere. The same masks serve every image of the batch.

    Grids and shifts (a few numbers per mask) come from a seeded generator on x's device;
    full-size masks are built per block, never all at once. Maps are (N, 1, H, W).

    Args:
        masks: number of random masks.
        cell: grid size s (s x s cells).
        p: probability of keeping a cell.
        batch_size: masked copies per forward.
        seed: seed of the masks (None: the global generator).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        masks: int = 4000,
        cell: int = 7,
        p: float = 0.5,
        batch_size: int = 64,
        seed: int | None = 0,
        **kwargs,
    ):
        super().__init__(model, **kwargs)
        self.masks = check_positive_int(masks, "masks")
        self.cell = check_positive_int(cell, "cell")
        self.p = check_in_range(p, "p", 0.0, 1.0)
        if self.p == 0.0:
            raise ValueError("p: expected a number in (0, 1], got 0 (every mask would be empty)")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.seed = seed

    def grids(self, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The low-resolution grids (masks, s, s) and crop offsets (masks, 2) of all masks."""
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=device).manual_seed(self.seed)
        s = self.cell
        grids = (torch.rand(self.masks, s, s, generator=generator, device=device) < self.p).float()
        cell_h, cell_w = math.ceil(height / s), math.ceil(width / s)
        shift_y = torch.randint(0, cell_h, (self.masks,), generator=generator, device=device)
        shift_x = torch.randint(0, cell_w, (self.masks,), generator=generator, device=device)
        return grids, torch.stack([shift_y, shift_x], dim=1)

    def upsample(self, grids: torch.Tensor, shifts: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Full-size masks (m, H, W): bilinear upsampling of the grids, cropped at the shifts."""
        s = self.cell
        size = ((s + 1) * math.ceil(height / s), (s + 1) * math.ceil(width / s))
        big = F.interpolate(grids[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        rows = shifts[:, 0, None] + torch.arange(height, device=grids.device)
        cols = shifts[:, 1, None] + torch.arange(width, device=grids.device)
        which = torch.arange(grids.shape[0], device=grids.device)
        return big[which[:, None, None], rows[:, :, None], cols[:, None, :]]

    def attribute(self, x: torch.Tensor, target: Target) -> torch.Tensor:
        n, _, height, width = x.shape
        target, _ = bind_target(self.model, x, target, self.autocast)
        grids, shifts = self.grids(height, width, x.device)
        saliency = torch.zeros(n, height, width, device=x.device)
        block = max(1, self.batch_size // n)
        for first in range(0, self.masks, block):
            last = min(first + block, self.masks)
            masks = self.upsample(grids[first:last], shifts[first:last], height, width)

            def make_batch(start: int, stop: int, masks: torch.Tensor = masks):
                index = torch.arange(start, stop, device=x.device)
                image = index % n
                return x[image] * masks[index // n, None].to(x.dtype), image

            scores = batched_scores(
                self.model,
                make_batch,
                (last - first) * n,
                target,
                batch_size=self.batch_size,
                autocast=self.autocast,
            )
            saliency += torch.einsum("mn,mhw->nhw", scores.view(last - first, n), masks)
        return (saliency / (self.masks * self.p))[:, None]
