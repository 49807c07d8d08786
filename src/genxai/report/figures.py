"""Pictures of explanations: colour maps, overlays, image grids and PNG files.

Everything is batched torch on tensors in [0, 1]; a colormap is a 256-entry lookup table taken
from matplotlib once and indexed with the quantised map (no per-pixel Python).

    heat = overlay(images, maps, cmap="jet")          # (N, 3, H, W) in [0, 1]
    save_png(heat[0], "overlay.png")
    save_png(grid(torch.stack([images, heat], 1)), "grid.png")   # rows images, columns panels
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from genxai.attribution.base import reduce_channels
from genxai.core.maps import minmax_normalize


@lru_cache(maxsize=8)
def _lookup_table(cmap: str) -> torch.Tensor:
    """(256, 3) float32 RGB rows of matplotlib's colormap ``cmap``."""
    import matplotlib

    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(
            f"cmap: unknown matplotlib colormap {cmap!r} (e.g. 'jet', 'inferno', 'viridis')"
        ) from None
    return torch.from_numpy(colormap(torch.linspace(0, 1, 256).numpy())[:, :3]).float()


def as_heatmap(maps: torch.Tensor) -> torch.Tensor:
    """Any attribution output, (N, C, H, W) or (N, H, W), as (N, 1, H, W) in [0, 1].

    Several channels are reduced by their largest magnitude (Simonyan et al.); each map is then
    min-max scaled on its own (a flat map becomes zeros).
    """
    maps = maps.detach().float()
    if maps.ndim == 3:
        maps = maps.unsqueeze(1)
    if maps.ndim != 4:
        raise ValueError(f"maps: expected shape (N, C, H, W) or (N, H, W), got {tuple(maps.shape)}")
    if maps.shape[1] > 1:
        maps = reduce_channels(maps, "max_abs")
    return minmax_normalize(maps)


def colorize(maps: torch.Tensor, cmap: str = "jet") -> torch.Tensor:
    """(N, 1, H, W) maps in [0, 1] -> (N, 3, H, W) RGB through a matplotlib colormap."""
    maps = maps.detach().float()
    if maps.ndim == 3:
        maps = maps.unsqueeze(1)
    table = _lookup_table(cmap).to(maps.device)
    index = (maps[:, 0].clamp(0, 1) * 255).round().long()
    return table[index].permute(0, 3, 1, 2).contiguous()


def overlay(
    images: torch.Tensor, maps: torch.Tensor, *, alpha: float = 0.5, cmap: str = "jet"
) -> torch.Tensor:
    """Blend a colorized map over each image: ``(1 - alpha) * image + alpha * colour``.

    ``images``: (N, C, H, W) in [0, 1] (grey images are repeated to RGB); ``maps``: any attribution
    output for them, normalized with :func:`as_heatmap` and resized to the images if needed.
    """
    images = to_rgb(images.detach().float())
    heat = as_heatmap(maps)
    if heat.shape[-2:] != images.shape[-2:]:
        heat = F.interpolate(heat, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return ((1 - alpha) * images + alpha * colorize(heat, cmap).to(images.device)).clamp(0, 1)


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """(N, 1|3, H, W) -> (N, 3, H, W)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def grid(tiles: torch.Tensor, *, pad: int = 2, fill: float = 1.0) -> torch.Tensor:
    """(rows, cols, 3, H, W) tiles -> one (3, H', W') image with ``pad`` pixels of ``fill`` between."""
    if tiles.ndim != 5:
        raise ValueError(f"tiles: expected shape (rows, cols, C, H, W), got {tuple(tiles.shape)}")
    rows, cols, c, h, w = tiles.shape
    padded = F.pad(tiles.float(), (pad, 0, pad, 0), value=fill)
    image = padded.permute(2, 0, 3, 1, 4).reshape(c, rows * (h + pad), cols * (w + pad))
    return F.pad(image, (0, pad, 0, pad), value=fill)


def upscale(image: torch.Tensor, min_size: int) -> torch.Tensor:
    """Nearest-neighbour enlarge (C, H, W) or (N, C, H, W) so the short side is at least ``min_size``."""
    factor = -(-min_size // min(image.shape[-2:]))
    if factor <= 1:
        return image
    batch = image if image.ndim == 4 else image.unsqueeze(0)
    out = F.interpolate(batch, scale_factor=factor, mode="nearest")
    return out if image.ndim == 4 else out[0]


def to_pil(image: torch.Tensor) -> Image.Image:
    """A (C, H, W) tensor in [0, 1] (C = 1 or 3) as an 8-bit PIL image."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image: expected shape (1 or 3, H, W), got {tuple(image.shape)}")
    array = (image.detach().float().clamp(0, 1) * 255).round().byte().cpu().permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if image.shape[0] == 1 else array)


def save_png(image: torch.Tensor, path: str | Path, *, min_size: int = 0) -> Path:
    """Write a (C, H, W) tensor in [0, 1] as PNG (parents created); enlarge to ``min_size`` first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(upscale(image, min_size) if min_size else image).save(path)
    return path


def real_images_figure(
    images: torch.Tensor | Dataset, path: str | Path, *, count: int = 32, columns: int = 8, tile: int = 64
) -> Path:
    """A grid of real training images, to set beside generated samples; written as PNG at ``path``.

    ``images``: (N, C, H, W) in [0, 1] (C = 1 or 3), or a data set whose items are an image or
    ``(image, ...)``; its first ``count`` images are shown, ``columns`` per row, each enlarged
    (nearest) to at least ``tile`` pixels.
    """
    if isinstance(images, Dataset):
        from genxai.data.batches import image_of

        images = torch.stack([image_of(images[i]) for i in range(min(count, len(images)))])
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or len(images) == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a data set or (N, 1 or 3, H, W) images, got {shape}")
    pictures = upscale(to_rgb(images[:count].detach().float().cpu().clamp(0, 1)), tile)
    cols = min(columns, len(pictures))
    rows = -(-len(pictures) // cols)
    blank = torch.ones(rows * cols - len(pictures), *pictures.shape[1:])  # white cells end the last row
    return save_png(grid(torch.cat([pictures, blank]).view(rows, cols, *pictures.shape[1:])), path)


def with_colorbar(
    image: torch.Tensor, cmap: str = "jet", *, low: str = "0", high: str = "1", label: str = ""
) -> torch.Tensor:
    """A (3, H, W) picture of maps with a horizontal colour bar under it: ``cmap`` from ``low``
    (left) to ``high`` (right), the ends and ``label`` written beneath, so a PNG read on its own
    says what its colours mean."""
    from PIL import ImageDraw, ImageFont

    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image: expected shape (3, H, W), got {tuple(image.shape)}")
    _, height, width = image.shape
    bar = colorize(torch.linspace(0, 1, width).expand(1, 1, max(6, height // 24), width), cmap)[0]
    text = Image.new("RGB", (width, 28 if label else 14), "white")
    draw, font = ImageDraw.Draw(text), ImageFont.load_default()
    draw.text((0, 1), low, fill="black", font=font)
    draw.text((width - draw.textlength(high, font=font), 1), high, fill="black", font=font)
    if label:  # a line of its own, centred
        draw.text(
            (max(0, (width - draw.textlength(label, font=font)) / 2), 14), label, fill="black", font=font
        )
    words = torch.from_numpy(np.array(text)).permute(2, 0, 1).float() / 255
    gap = torch.ones(3, 3, width)
    return torch.cat([image.detach().float().cpu(), gap, bar, words], dim=1)
