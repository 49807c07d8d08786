"""A hand-built generator whose unit 1 at layer ``units`` is exactly where it draws a red square.

Latents (N, 4 + 3 * 64): the square's corner and size (cells of an 8 x 8 grid), the unit's
intensity, and the values of three noise units. The layer ``units`` outputs (N, 4, 8, 8): unit 1
is ``intensity x indicator(square)``, units 0, 2 and 3 are uniform noise. The image (32 x 32, in
[-1, 1]) is red on the square's cells (nearest-upsampled indicator) and grey elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

GRID, SIZE, CONCEPT_UNIT = 8, 32, 1


class Planted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.units = nn.Identity()
        self.render = nn.Identity()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device

    def latents(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.rand(n, 4 + 3 * GRID * GRID, generator=generator)

    def indicator(self, z: torch.Tensor) -> torch.Tensor:
        cells = torch.arange(GRID, device=z.device)
        side = 2 + (z[:, 2] * 3).long().clamp_max(2)  # 2..4 cells
        x0 = (z[:, 0] * (GRID - side + 1)).long()
        y0 = (z[:, 1] * (GRID - side + 1)).long()
        inside_x = (cells[None] >= x0[:, None]) & (cells[None] < (x0 + side)[:, None])
        inside_y = (cells[None] >= y0[:, None]) & (cells[None] < (y0 + side)[:, None])
        return (inside_y[:, :, None] & inside_x[:, None, :]).float()  # (N, 8, 8)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        square = self.indicator(z)
        noise = z[:, 4:].view(-1, 3, GRID, GRID)
        intensity = (1 + z[:, 3]).view(-1, 1, 1)
        acts = torch.stack([noise[:, 0], intensity * square, noise[:, 1], noise[:, 2]], dim=1)
        acts = self.units(acts + 0 * self.anchor)
        drawn = torch.nn.functional.interpolate(square[:, None], scale_factor=SIZE // GRID) > 0
        red = torch.tensor([1.0, -1.0, -1.0], device=z.device).view(1, 3, 1, 1)
        grey = torch.zeros(1, 3, 1, 1, device=z.device)
        return self.render(torch.where(drawn, red, grey))


class RedSegmenter:
    """Concepts ``background`` and ``red``, read off the colours (images in [0, 1])."""

    def __init__(self) -> None:
        self.concepts = ["background", "red"]

    def concept_masks(self, images: torch.Tensor) -> torch.Tensor:
        red = (images[:, 0] > 0.75) & (images[:, 1] < 0.25)
        return torch.stack([~red, red], dim=1)
