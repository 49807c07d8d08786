"""Localisation metrics: does a saliency map point at the object a ground-truth mask marks?

* Pointing game (Zhang et al., 2016): a hit when the map's maximum lies in the object mask, or
  within ``tolerance`` pixels of it (Zhang et al. use 15 px at 224 x 224). Ties between maxima go
  to the first in row-major order, so the result is deterministic. Values are 1 (hit) or 0; the
  mean is the accuracy.
* Energy (Score-CAM's energy-based pointing game; Grad-CAM++'s ``Loc``): the share of the map's
  energy inside the mask, ``sum_in L / (sum_in L + sum_out L)``, with ``L`` the map min-max scaled
  to [0, 1] per image and, for ``Loc^c_I(delta)``, values below ``threshold = delta`` set to 0.
  A map with no energy left scores 0.

Maps are (N, H, W) or (N, 1, H, W) (reduce colour channels first); masks the same shapes, bool or
numbers (non-zero = object), at the maps' resolution. Every image needs a non-empty mask. Neither
metric involves the model's score. :class:`PointingGame` and :class:`LocalizationEnergy` are
torchmetrics metrics like the faithfulness ones (per-image values concatenated across processes).
"""

from __future__ import annotations

from typing import Any

import torch

from genxai.core.checks import check_finite, check_in_range
from genxai.core.maps import minmax_normalize
from genxai.evaluation.faithfulness import MetricResult, StreamingMetric


def check_masks(masks: Any, maps: torch.Tensor) -> torch.Tensor:
    """Masks as a bool (N, 1, H, W) tensor matching ``maps``, each with at least one object pixel."""
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks: expected a torch.Tensor, got {type(masks).__name__}")
    if masks.ndim == 3:
        masks = masks.unsqueeze(1)
    if (
        masks.ndim != 4
        or masks.shape[1] != 1
        or masks.shape[0] != maps.shape[0]
        or masks.shape[-2:] != maps.shape[-2:]
    ):
        raise ValueError(
            f"masks: expected shape (N, 1, H, W) or (N, H, W) matching maps {tuple(maps.shape)}, "
            f"got {tuple(masks.shape)}"
        )
    masks = masks.to(maps.device) != 0
    empty = (~masks.flatten(1).any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"masks: images {empty} have an empty mask; every image needs an object")
    return masks


def check_single_maps(maps: Any) -> torch.Tensor:
    """Maps as a finite float (N, 1, H, W) tensor."""
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"maps: expected a torch.Tensor, got {type(maps).__name__}")
    if maps.ndim == 3:
        maps = maps.unsqueeze(1)
    if maps.ndim != 4 or maps.shape[1] != 1 or maps.shape[0] == 0:
        raise ValueError(
            f"maps: expected shape (N, 1, H, W) or (N, H, W), got {tuple(maps.shape)}; reduce colour "
            "channels first (e.g. genxai.attribution.reduce_channels)"
        )
    return check_finite(maps.float(), "maps")


def pointing_hits(maps: torch.Tensor, masks: torch.Tensor, tolerance: float = 0.0) -> torch.Tensor:
    """(N,) 1.0 where the map's maximum is within ``tolerance`` pixels of the mask, else 0.0."""
    maps = check_single_maps(maps)
    masks = check_masks(masks, maps)
    tolerance = check_in_range(tolerance, "tolerance", 0.0, float("inf"))
    height, width = maps.shape[-2:]
    peak = maps.flatten(1).argmax(dim=1)  # the first maximum in row-major order
    row, col = (peak // width).view(-1, 1, 1), (peak % width).view(-1, 1, 1)
    rows = torch.arange(height, device=maps.device).view(1, -1, 1)
    cols = torch.arange(width, device=maps.device).view(1, 1, -1)
    near = (rows - row).square() + (cols - col).square() <= tolerance**2
    return (near & masks[:, 0]).flatten(1).any(dim=1).float()


def energy_ratio(maps: torch.Tensor, masks: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """(N,) share of each min-max scaled map's energy inside the mask; values below ``threshold`` dropped."""
    maps = check_single_maps(maps)
    masks = check_masks(masks, maps)
    threshold = check_in_range(threshold, "threshold", 0.0, 1.0)
    energy = minmax_normalize(maps)
    energy = torch.where(energy >= threshold, energy, torch.zeros_like(energy)).flatten(1)
    inside = (energy * masks.flatten(1)).sum(dim=1)
    total = energy.sum(dim=1)
    return torch.where(total > 0, inside / total.clamp_min(1e-12), torch.zeros_like(total))


class PointingGame(StreamingMetric):
    """Pointing-game accuracy over batches: ``update(maps, masks)``; see the module docstring.

    ``kwargs`` go to :class:`torchmetrics.Metric`.
    """

    higher_is_better = True

    def __init__(self, *, tolerance: float = 0.0, **kwargs: Any) -> None:
        tolerance = check_in_range(tolerance, "tolerance", 0.0, float("inf"))
        super().__init__(**kwargs)
        self.tolerance = tolerance

    def update(self, maps: torch.Tensor, masks: torch.Tensor) -> None:
        """Add a batch of maps and their object masks."""
        self._append(pointing_hits(maps, masks, self.tolerance))


class LocalizationEnergy(StreamingMetric):
    """Grad-CAM++'s ``Loc^c_I(delta)`` (``threshold=delta``; 0 gives the energy pointing game).

    ``kwargs`` go to :class:`torchmetrics.Metric`.
    """

    higher_is_better = True

    def __init__(self, *, threshold: float = 0.0, **kwargs: Any) -> None:
        threshold = check_in_range(threshold, "threshold", 0.0, 1.0)
        super().__init__(**kwargs)
        self.threshold = threshold

    def update(self, maps: torch.Tensor, masks: torch.Tensor) -> None:
        """Add a batch of maps and their object masks."""
        self._append(energy_ratio(maps, masks, self.threshold))


def _result(values: torch.Tensor) -> MetricResult:
    return MetricResult(values, float(values.mean()))


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, *, tolerance: float = 0.0) -> MetricResult:
    """Pointing game: per-image hits (1/0) and the accuracy; ``tolerance`` in pixels."""
    return _result(pointing_hits(maps, masks, tolerance))


def localization_energy(maps: torch.Tensor, masks: torch.Tensor, *, threshold: float = 0.0) -> MetricResult:
    """Grad-CAM++'s Loc: energy inside the mask / total energy of the map thresholded at ``threshold``."""
    return _result(energy_ratio(maps, masks, threshold))


def energy_pointing(maps: torch.Tensor, masks: torch.Tensor) -> MetricResult:
    """Energy-based pointing game (Score-CAM): the share of the map's energy inside the mask."""
    return localization_energy(maps, masks, threshold=0.0)


__all__ = [
    "LocalizationEnergy",
    "PointingGame",
    "energy_pointing",
    "localization_energy",
    "pointing_game",
]
