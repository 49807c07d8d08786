"""A procedural "shapes" data set with ground-truth object masks, at any resolution, offline.

Each image shows one shape (circle, square, triangle, cross, ring, diamond) of random position,
size and colour, filled flat or with a texture (stripes, checker, noise), on a flat, gradient or
noise background. Every random choice of image ``i`` is a hash of ``(seed, i)``, so:

* the data set is deterministic, and image ``i`` is the same whether generated alone or in a batch;
* the scene is the same at every resolution (16, 32, 64, 224 ...): only the sampling changes;
* generation is vectorised torch over the whole batch (and runs on any device).

The mask is exactly the set of pixels drawn with the shape's colour; the foreground colour is
chosen at least 0.35 away from the background colour in every channel and textures only push it
further away, so object pixels always differ from the background around them. Labels are balanced:
image ``i`` has class ``i % len(shapes)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from genxai.core.checks import check_positive_int

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
TEXTURES = ("flat", "stripes", "checker", "noise")
BACKGROUNDS = ("flat", "gradient", "noise")

_MASK32 = 0xFFFFFFFF

# Each shape as a predicate on coordinates (dx, dy) relative to its centre, in units of its radius;
# all fit in the square [-1, 1]^2.
ShapeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_SHAPE_FNS: dict[str, ShapeFn] = {
    "circle": lambda dx, dy: dx.square() + dy.square() <= 1.0,
    "square": lambda dx, dy: torch.maximum(dx.abs(), dy.abs()) <= 0.8,
    "triangle": lambda dx, dy: (dy >= -0.9) & (dy <= 0.8) & (dx.abs() <= 0.95 * (dy + 0.9) / 1.7),
    "cross": lambda dx, dy: (
        ((dx.abs() <= 0.3) & (dy.abs() <= 0.95)) | ((dy.abs() <= 0.3) & (dx.abs() <= 0.95))
    ),
    "ring": lambda dx, dy: (dx.square() + dy.square() <= 1.0) & (dx.square() + dy.square() >= 0.5**2),
    "diamond": lambda dx, dy: dx.abs() + dy.abs() <= 1.0,
}


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x * m) mod 2^32 for uint32 values held in int64, without int64 overflow."""
    low = (x & 0xFFFF) * m
    high = (((x >> 16) * m) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32, C. Wellons) of int64 tensors, elementwise."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class _Randoms:
    """Uniform [0, 1) numbers that depend only on (seed, image index, stream, element)."""

    def __init__(self, seed: int, index: torch.Tensor) -> None:
        salt = _hash32(torch.tensor([seed & _MASK32, (seed >> 32) & _MASK32], device=index.device))
        self.key = _hash32(_hash32(index ^ salt[0]) ^ salt[1])  # (N,)
        self.stream = 0

    def __call__(self, *shape: int) -> torch.Tensor:
        """A (N, *shape) tensor; every call draws a fresh stream."""
        self.stream += 1
        count = 1
        for size in shape:
            count *= size
        element = torch.arange(count, device=self.key.device) * 0x9E3779B1 + self.stream * 0x85EBCA6B
        bits = _hash32(self.key[:, None] ^ _hash32(element)[None])
        return ((bits >> 8).float() / float(1 << 24)).view(-1, *shape)


def _value_noise(uniform: torch.Tensor, size: int) -> torch.Tensor:
    """(N, g, g) grid values -> smooth (N, size, size) noise by bilinear interpolation."""
    return F.interpolate(uniform[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def _choice(u: torch.Tensor, options: int) -> torch.Tensor:
    return (u * options).long().clamp_max(options - 1)


def generate_shapes(
    n: int,
    size: int = 32,
    seed: int = 0,
    *,
    start: int = 0,
    shapes: Sequence[str] = SHAPES,
    device: torch.device | str | None = None,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images ``start .. start + n - 1`` of the shapes data set for ``seed``.

    Returns images (n, 3, size, size) float32 in [0, 1], labels (n,) int64 (the index into
    ``shapes``) and masks (n, 1, size, size) bool. ``chunk`` images are drawn at a time.
    """
    images, labels, masks, _ = _generate(n, size, seed, start, shapes, device, chunk)
    return images, labels, masks


def generate_shapes_with_attributes(
    n: int,
    size: int = 32,
    seed: int = 0,
    *,
    start: int = 0,
    shapes: Sequence[str] = SHAPES,
    device: torch.device | str | None = None,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`generate_shapes` plus each image's drawn attributes (the same images, bit for bit).

    The fourth item maps ``"texture"`` to (n,) int64 indices into :data:`TEXTURES` (how the object
    is filled) and ``"background"`` to (n,) int64 indices into :data:`BACKGROUNDS`: ground truth
    for per-pixel texture labels (a segmenter's targets), with the mask giving the object pixels.
    """
    return _generate(n, size, seed, start, shapes, device, chunk)


def _generate(
    n: int,
    size: int,
    seed: int,
    start: int,
    shapes: Sequence[str],
    device: torch.device | str | None,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    check_positive_int(n, "n")
    check_positive_int(size, "size", minimum=8)
    check_positive_int(chunk, "chunk")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start: expected an integer >= 0, got {start!r}")
    shapes = tuple(shapes)
    unknown = [s for s in shapes if s not in _SHAPE_FNS]
    if unknown or not shapes:
        raise ValueError(f"shapes: expected names among {', '.join(SHAPES)}, got {list(shapes)}")
    parts = [
        _render(torch.arange(first, min(first + chunk, start + n), device=device), size, seed, shapes)
        for first in range(start, start + n, chunk)
    ]
    images, labels, masks, textures, backgrounds = (torch.cat(items) for items in zip(*parts))
    return images, labels, masks, {"texture": textures, "background": backgrounds}


def _fill(out: torch.Tensor, group: torch.Tensor, makers: Sequence[Callable | None]) -> torch.Tensor:
    """``out[i] = makers[group[i]](rows)``, each maker run once on the rows of its group (None: keep)."""
    for k, make in enumerate(makers):
        rows = (group == k).nonzero().flatten()
        if make is not None and rows.numel():
            out[rows] = make(rows).to(out.dtype)
    return out


def _render(
    index: torch.Tensor, size: int, seed: int, shapes: tuple[str, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, labels, masks, texture indices and background kinds of the images ``index``."""
    rand = _Randoms(seed, index)
    n, device = index.shape[0], index.device
    labels = index % len(shapes)
    plane = torch.zeros(n, size, size, device=device)

    # Geometry: radius 0.2-0.4 of the side; the centre keeps the whole shape inside the image.
    radius = 0.2 + 0.2 * rand()
    centre = radius[:, None] + (1 - 2 * radius[:, None]) * rand(2)
    grid = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    dx = (grid.view(1, 1, -1) - centre[:, 0].view(-1, 1, 1)) / radius.view(-1, 1, 1)
    dy = (grid.view(1, -1, 1) - centre[:, 1].view(-1, 1, 1)) / radius.view(-1, 1, 1)

    def shape(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda rows: _SHAPE_FNS[name](dx[rows], dy[rows])

    mask = _fill(torch.zeros_like(plane, dtype=torch.bool), labels, [shape(name) for name in shapes])

    # Background: a base colour, varied by at most +-0.1 (flat, linear gradient or smooth noise).
    base = rand(3)
    kind = _choice(rand(), len(BACKGROUNDS))
    angle = (2 * torch.pi * rand()).view(-1, 1, 1)
    cells = rand(4, 4)

    def gradient(rows: torch.Tensor) -> torch.Tensor:
        along = dx[rows] * angle[rows].cos() + dy[rows] * angle[rows].sin()
        return (along * radius[rows].view(-1, 1, 1)).clamp(-1, 1)

    def noise(rows: torch.Tensor) -> torch.Tensor:
        return 2 * _value_noise(cells[rows], size) - 1

    variation = _fill(plane.clone(), kind, [None, gradient, noise])
    background = base[:, :, None, None] + 0.1 * variation[:, None]

    # Foreground: 0.35-0.65 around the colour circle from the base in each channel, so at least
    # 0.35 away; textures in [0, 1] move it up to 0.3 further from the base (never closer).
    fg = (base + 0.35 + 0.3 * rand(3)) % 1.0
    away = torch.where(fg > base, 1.0, -1.0)[:, :, None, None]
    texture = _choice(rand(), len(TEXTURES))
    frequency = (1.5 + 1.5 * rand()).view(-1, 1, 1)
    stripe_angle = (torch.pi * rand()).view(-1, 1, 1)
    speckles = rand(8, 8)

    def stripes(rows: torch.Tensor) -> torch.Tensor:
        along = dx[rows] * stripe_angle[rows].cos() + dy[rows] * stripe_angle[rows].sin()
        return torch.frac(frequency[rows] * along + 8.0) < 0.5

    def checker(rows: torch.Tensor) -> torch.Tensor:
        cell = torch.floor(frequency[rows] * dx[rows]) + torch.floor(frequency[rows] * dy[rows])
        return cell % 2

    def speckle(rows: torch.Tensor) -> torch.Tensor:
        return _value_noise(speckles[rows], size)

    pattern = _fill(plane.clone(), texture, [None, stripes, checker, speckle])
    foreground = fg[:, :, None, None] + 0.3 * pattern[:, None] * away

    images = torch.where(mask[:, None], foreground, background).clamp(0.0, 1.0)
    return images, labels, mask[:, None], texture, kind


class ShapesDataset(Dataset):
    """The shapes data set as a torch Dataset of ``(image (3, H, W) in [0, 1], label, mask (1, H, W))``.

    Args:
        n: number of images.
        size: side in pixels (any size >= 8).
        seed: which data set; ``train=False`` draws a disjoint test set for the same seed.
        shapes: the classes, by name (label = position in this tuple).
        cache: generate all images once up front (fast to index; ``n * 3 * size^2`` floats), or
            generate each item when asked (same images; for large sizes or counts).
        attributes: items gain a fourth entry, ``{"texture": int, "background": int}`` (indices
            into :data:`TEXTURES` and :data:`BACKGROUNDS`), e.g. for per-pixel texture labels.
    """

    def __init__(
        self,
        n: int = 6000,
        size: int = 32,
        seed: int = 0,
        *,
        train: bool = True,
        shapes: Sequence[str] = SHAPES,
        cache: bool = True,
        attributes: bool = False,
    ) -> None:
        self.n = check_positive_int(n, "n")
        self.size = check_positive_int(size, "size", minimum=8)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
        self.seed = 2 * seed + (0 if train else 1)
        self.classes = list(shapes)
        self.attributes = attributes
        self._data = _generate(n, size, self.seed, 0, self.classes, None, 256) if cache else None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple:
        """``(image, label, mask)``, plus the attributes dict when ``attributes=True``."""
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} images")
        index %= self.n
        if self._data is not None:
            images, labels, masks, attrs = self._data
            row = index
        else:
            images, labels, masks, attrs = _generate(1, self.size, self.seed, index, self.classes, None, 1)
            row = 0
        item = (images[row], int(labels[row]), masks[row])
        if self.attributes:
            return (*item, {key: int(value[row]) for key, value in attrs.items()})
        return item


__all__ = [
    "BACKGROUNDS",
    "SHAPES",
    "TEXTURES",
    "ShapesDataset",
    "generate_shapes",
    "generate_shapes_with_attributes",
]
