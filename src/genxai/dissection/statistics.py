"""Streaming per-unit statistics for dissection, in memory that does not grow with the samples.

GAN Dissection (Bau et al., 2019) upsamples unit u's activation map r_u to the image size, and for
each concept c thresholds it at t_{u,c}: the mask ``r_u > t`` is compared with the concept's
segmentation s_c. The threshold maximises the information quality ratio
``IQR = I(mask; s_c) / H(mask, s_c)`` over quantile levels of r_u; the unit is then scored by
``IoU_{u,c} = |mask & s_c| / |mask | s_c|`` at that threshold. Everything here streams:

* pass 1, :class:`RunningRange`: per-unit min, max and mean (and :class:`RunningTopK`: the samples
  where each unit fires most);
* pass 2, :class:`ConceptHistogram`: per unit, a histogram of the upsampled activation over
  ``bins`` equal bins spanning pass 1's [min, max], counted over all pixels and over the pixels of
  each concept. Suffix sums of these counts give ``|r_u > t|`` and ``|r_u > t & s_c|`` at every bin
  edge t at once; with ``|s_c|`` and the pixel count that is every cell of the 2 x 2 contingency
  table, hence IoU and IQR for every candidate threshold. The state is ``units x (concepts + 1) x
  (bins + 1)`` counts, whatever the number of samples.

Thresholds and quantiles. Bin j is ``(e_{j-1}, e_j]`` for the edges ``e_0 = min < ... < e_B =
max`` (bin 0 holds the values equal to the minimum), so counts above any edge are exact. A
quantile level q maps to the bin holding the q-quantile: its upper edge ``e_j`` (the smallest edge
with ``P(r <= e_j) >= q``) is the candidate threshold. The resolution is one bin: the threshold is
within ``(max - min) / bins`` of the exact quantile, and the masked fraction ``P(r > e_j)`` is at
most ``1 - q`` and short of it by at most the mass of that one bin. :meth:`ConceptHistogram.quantiles`
interpolates inside the bin (error below one bin width). The default levels, as in the authors'
code, put the masked fraction ``1 - q`` on 100 log-spaced values from 0.001 to 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from genxai.core.checks import check_positive_int

DEFAULT_BINS = 1024


def default_levels(count: int = 100) -> torch.Tensor:
    """Quantile levels q whose masked fractions ``1 - q`` are log-spaced from 1 down to 0.001,
    ascending (float64)."""
    return (1 - torch.logspace(0, -3, count, dtype=torch.float64)).sort().values


def check_levels(levels: Sequence[float] | torch.Tensor | None) -> torch.Tensor:
    """Quantile levels as a sorted float64 tensor of distinct values in [0, 1)."""
    if levels is None:
        return default_levels()
    tensor = torch.as_tensor(levels, dtype=torch.float64).flatten()
    if tensor.numel() == 0 or not bool(((tensor >= 0) & (tensor < 1)).all()):
        raise ValueError(f"levels: expected quantile levels in [0, 1), got {tensor.tolist()[:8]}")
    return tensor.unique()


def upsample(activations: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Unit maps (N, U, h, w) -> (N, U, H, W), bilinear (every value a convex combination of the
    map's values, so the range of the upsampled map lies within the map's)."""
    if tuple(activations.shape[-2:]) == tuple(size):
        return activations.float()
    return F.interpolate(activations.float(), size=size, mode="bilinear", align_corners=False)


def overlap_scores(
    mask: torch.Tensor, intersection: torch.Tensor, concept: torch.Tensor, pixels: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IoU, IQR and positive association of a binary mask against a concept, from pixel counts.

    ``mask`` = |mask|, ``intersection`` = |mask & concept|, ``concept`` = |concept| (broadcastable
    tensors), ``pixels`` the total. IQR = I(X; Y) / H(X, Y) of the two pixel indicators (0 when
    both are constant); ``positive`` is True where they are positively associated
    (P(X, Y) > P(X) P(Y)), i.e. the mask points at the concept rather than away from it.
    """
    a, i, s = mask.double(), intersection.double(), concept.double()
    union = a + s - i
    iou = torch.where(union > 0, i / union.clamp_min(1), torch.zeros_like(union))
    p11, p10, p01 = i / pixels, (a - i) / pixels, (s - i) / pixels
    p00 = (1 - p11 - p10 - p01).clamp_min(0)
    cells = torch.stack(torch.broadcast_tensors(p11, p10, p01, p00))
    joint = -torch.xlogy(cells, cells).sum(0)
    px, py = a / pixels, s / pixels
    hx = -(torch.xlogy(px, px) + torch.xlogy(1 - px, 1 - px))
    hy = -(torch.xlogy(py, py) + torch.xlogy(1 - py, 1 - py))
    mutual = (hx + hy - joint).clamp_min(0)
    iqr = torch.where(joint > 1e-12, mutual / joint.clamp_min(1e-12), torch.zeros_like(joint))
    positive = i * pixels > a * s
    return iou, iqr, positive


class RunningRange:
    """Pass 1: per-unit minimum, maximum and mean of a layer's activations (N, U, h, w)."""

    def __init__(self, units: int, device: torch.device | str | None = None) -> None:
        self.units = check_positive_int(units, "units")
        self.minimum = torch.full((units,), torch.inf, device=device)
        self.maximum = torch.full((units,), -torch.inf, device=device)
        self.total = torch.zeros(units, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, activations: torch.Tensor) -> None:
        _check_units(activations, self.units)
        x = activations.detach().float()
        self.minimum = torch.minimum(self.minimum, x.amin((0, 2, 3)))
        self.maximum = torch.maximum(self.maximum, x.amax((0, 2, 3)))
        self.total += x.double().sum((0, 2, 3))
        self.count += x.shape[0] * x.shape[2] * x.shape[3]

    @property
    def mean(self) -> torch.Tensor:
        return (self.total / max(self.count, 1)).float()

    def state_sizes(self) -> dict[str, int]:
        return {"minimum": self.minimum.numel(), "maximum": self.maximum.numel(), "total": self.total.numel()}


class RunningTopK:
    """The ``k`` largest values per unit seen so far and the sample indices they came from."""

    def __init__(self, units: int, k: int, device: torch.device | str | None = None) -> None:
        self.units = check_positive_int(units, "units")
        self.k = check_positive_int(k, "k")
        self.values = torch.full((units, k), -torch.inf, device=device)
        self.indices = torch.full((units, k), -1, dtype=torch.long, device=device)
        self.seen = 0

    def update(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        """``values`` (N, U): one score per sample and unit; ``indices`` (N,): the samples' ids."""
        if values.ndim != 2 or values.shape[1] != self.units or indices.shape != values.shape[:1]:
            raise ValueError(
                f"values: expected (N, {self.units}) with indices (N,), got {tuple(values.shape)} "
                f"and {tuple(indices.shape)}"
            )
        merged_values = torch.cat([self.values, values.detach().float().t()], dim=1)
        merged_indices = torch.cat(
            [self.indices, indices.to(self.indices.device).expand(self.units, -1)], dim=1
        )
        top = merged_values.topk(self.k, dim=1)
        self.values, self.indices = top.values, merged_indices.gather(1, top.indices)
        self.seen += values.shape[0]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices), each (U, min(k, samples seen)), largest first."""
        keep = min(self.k, self.seen)
        return self.values[:, :keep], self.indices[:, :keep]


class ConceptHistogram:
    """Pass 2: per-unit histograms of the upsampled activations, overall and per concept.

    Args:
        minimum, maximum: (U,) per-unit range from pass 1 (bins span it; values outside are
            clamped into the first/last bin).
        concepts: number of concepts C.
        bins: bins B per unit (state: U x (C + 1) x (B + 1) int64 counts).
        max_elements: bound on the temporary tensors of one update (units are processed in chunks).
    """

    def __init__(
        self,
        minimum: torch.Tensor,
        maximum: torch.Tensor,
        concepts: int,
        *,
        bins: int = DEFAULT_BINS,
        max_elements: int = 1 << 24,
    ) -> None:
        if minimum.ndim != 1 or minimum.shape != maximum.shape:
            raise ValueError(
                f"minimum, maximum: expected two (U,) tensors, got {tuple(minimum.shape)}, {tuple(maximum.shape)}"
            )
        if not bool(torch.isfinite(minimum).all() & torch.isfinite(maximum).all()):
            raise ValueError("minimum, maximum: the unit ranges must be finite (did pass 1 see any data?)")
        self.units, self.concepts = minimum.numel(), check_positive_int(concepts, "concepts")
        self.bins = check_positive_int(bins, "bins", minimum=2)
        self.max_elements = check_positive_int(max_elements, "max_elements")
        device = minimum.device
        low = minimum.float()
        high = torch.where(maximum > minimum, maximum.float(), low + 1)  # a constant unit: any span
        steps = torch.arange(bins + 1, device=device, dtype=torch.float32) / bins
        self.edges = low[:, None] + (high - low)[:, None] * steps  # (U, B + 1)
        self.edges[:, 0], self.edges[:, -1] = low, high
        self.edges = torch.cummax(self.edges, dim=1).values  # non-decreasing despite rounding
        self.low, self.scale = low, bins / (high - low)
        self.total = torch.zeros(self.units, bins + 1, dtype=torch.long, device=device)
        self.joint = torch.zeros(self.units, self.concepts, bins + 1, dtype=torch.long, device=device)
        self.concept_pixels = torch.zeros(self.concepts, dtype=torch.long, device=device)
        self.pixels = 0

    # -- counting --------------------------------------------------------------------------------
    def bin_index(self, values: torch.Tensor, units: slice) -> torch.Tensor:
        """Bin of each value (k, P) of units ``units``: the smallest j with value <= e_j."""
        edges = self.edges[units]
        guess = torch.ceil((values - self.low[units, None]) * self.scale[units, None])
        index = guess.clamp_(0, self.bins).long()
        # One correction step makes the arithmetic guess agree with the stored edges exactly.
        below = (index > 0) & (values <= edges.gather(1, (index - 1).clamp_min(0)))
        index -= below.long()
        above = (index < self.bins) & (values > edges.gather(1, index))
        return index + above.long()

    def update(self, activations: torch.Tensor, masks: torch.Tensor) -> None:
        """Add a batch: unit maps (N, U, h, w) and concept masks (N, C, H, W) bool (the maps are
        upsampled to H, W here, a chunk of units at a time)."""
        _check_units(activations, self.units)
        n, c, h, w = masks.shape
        if c != self.concepts or n != activations.shape[0] or masks.dtype != torch.bool:
            raise ValueError(
                f"masks: expected bool (N={activations.shape[0]}, C={self.concepts}, H, W), got "
                f"{masks.dtype} {tuple(masks.shape)}"
            )
        masks = masks.to(self.total.device)
        seg = masks.permute(1, 0, 2, 3).reshape(c, -1)  # (C, P)
        concept_of, pixel_of = seg.nonzero(as_tuple=True)  # every (concept, pixel) pair
        self.concept_pixels += seg.sum(1)
        pixels = n * h * w
        self.pixels += pixels
        chunk = max(1, self.max_elements // (pixels + concept_of.numel()))
        width = self.bins + 1
        for start in range(0, self.units, chunk):
            units = slice(start, min(start + chunk, self.units))
            k = units.stop - units.start
            maps = upsample(activations[:, units].to(self.total.device), (h, w))
            index = self.bin_index(maps.permute(1, 0, 2, 3).reshape(k, -1), units)  # (k, P)
            offsets = torch.arange(k, device=index.device)[:, None]
            self.total[units] += torch.bincount(
                (index + offsets * width).flatten(), minlength=k * width
            ).view(k, width)
            keys = (offsets * c + concept_of[None]) * width + index[:, pixel_of]
            self.joint[units] += torch.bincount(keys.flatten(), minlength=k * c * width).view(k, c, width)

    def state_sizes(self) -> dict[str, int]:
        """Elements of each state tensor (they never grow with the samples)."""
        return {
            "edges": self.edges.numel(),
            "total": self.total.numel(),
            "joint": self.joint.numel(),
            "concept_pixels": self.concept_pixels.numel(),
        }

    # -- reading ---------------------------------------------------------------------------------
    def _cumulative(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Counts at or below every edge: overall (U, B + 1) and per concept (U, C, B + 1), float64."""
        return self.total.double().cumsum(1), self.joint.double().cumsum(2)

    def edge_index(self, levels: torch.Tensor) -> torch.Tensor:
        """(U, L) index of the threshold edge for each level: the smallest j with P(r <= e_j) >= q."""
        below, _ = self._cumulative()
        target = levels.to(below.device, torch.float64)[None].expand(self.units, -1) * self.pixels
        return torch.searchsorted(below, target.contiguous()).clamp_max(self.bins)

    def quantiles(self, levels: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """(U, L) per-unit quantiles of the upsampled activations, linear inside the bin that holds
        each (error below one bin width)."""
        levels = torch.as_tensor(levels, dtype=torch.float64, device=self.total.device).flatten()
        below, _ = self._cumulative()
        j = self.edge_index(levels)
        lower = (j - 1).clamp_min(0)
        c0 = torch.where(j > 0, below.gather(1, lower), torch.zeros_like(below[:, :1]))
        c1 = below.gather(1, j)
        target = levels[None] * self.pixels
        frac = ((target - c0) / (c1 - c0).clamp_min(1)).clamp(0, 1)
        e0, e1 = self.edges.gather(1, lower).double(), self.edges.gather(1, j).double()
        return torch.where(j > 0, e0 + frac * (e1 - e0), e1).float()

    def counts_at(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact |r_u > e_j| (U, L) and |r_u > e_j & s_c| (U, C, L) for edge indices (U, L)."""
        below, joint_below = self._cumulative()
        mask = self.pixels - below.gather(1, index)
        inside = joint_below.gather(2, index[:, None].expand(-1, self.concepts, -1))
        return mask, self.concept_pixels.double()[None, :, None] - inside

    def scores_at_edges(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """IoU, IQR and positive association (U, C, B + 1) at every bin edge threshold."""
        index = torch.arange(self.bins + 1, device=self.total.device).expand(self.units, -1)
        mask, inter = self.counts_at(index)
        return overlap_scores(mask[:, None], inter, self.concept_pixels[None, :, None], self.pixels)

    def best_thresholds(
        self, levels: Sequence[float] | torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Per unit and concept, the candidate threshold (one per level) with the highest IQR among
        those where the mask is positively associated with the concept, and its IoU and IQR.

        Returns (U, C) tensors ``threshold``, ``level``, ``iou``, ``iqr``, ``mask_fraction``. Where no
        level gives a positive association, ``iou`` and ``iqr`` are 0 (the unit does not indicate
        the concept) and the threshold is that of the highest level.
        """
        levels = check_levels(levels).to(self.total.device)
        index = self.edge_index(levels)  # (U, L)
        mask, inter = self.counts_at(index)
        iou, iqr, positive = overlap_scores(
            mask[:, None], inter, self.concept_pixels[None, :, None], self.pixels
        )
        ranked = torch.where(positive, iqr, torch.full_like(iqr, -1.0))
        best = ranked.argmax(2, keepdim=True)  # (U, C, 1)
        none = ~positive.any(2)
        best = torch.where(none[..., None], torch.full_like(best, levels.numel() - 1), best)
        edge = index[:, None].expand(-1, self.concepts, -1).gather(2, best)[..., 0]
        zero = torch.zeros((), dtype=torch.float64, device=iou.device)
        return {
            "threshold": self.edges.gather(1, edge),
            "level": levels[best[..., 0]].float(),
            "iou": torch.where(none, zero, iou.gather(2, best)[..., 0]).float(),
            "iqr": torch.where(none, zero, iqr.gather(2, best)[..., 0]).float(),
            "mask_fraction": (
                mask[:, None].expand(-1, self.concepts, -1).gather(2, best)[..., 0] / self.pixels
            ).float(),
        }


def _check_units(activations: torch.Tensor, units: int) -> None:
    if not isinstance(activations, torch.Tensor) or activations.ndim != 4 or activations.shape[1] != units:
        got = (
            tuple(activations.shape) if isinstance(activations, torch.Tensor) else type(activations).__name__
        )
        raise ValueError(f"activations: expected unit maps (N, {units}, h, w), got {got}")


__all__ = [
    "DEFAULT_BINS",
    "ConceptHistogram",
    "RunningRange",
    "RunningTopK",
    "check_levels",
    "default_levels",
    "overlap_scores",
    "upsample",
]
