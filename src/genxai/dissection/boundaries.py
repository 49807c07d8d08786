"""Generative boundaries and regions of a layer (E-GBAS: Jeon, Jeong & Choi, AAAI 2020).

Each unit u of a layer has a pre-activation h_u(z), a function of the latent z (name the layer
whose output feeds the ReLU-like activation: the conv, linear or norm before it; naming the ReLU
itself gives the same sides). Its zero set {z : h_u(z) = 0} is the unit's *generative boundary*;
the sides z takes of a set of boundaries define its *generative region*. E-GBAS asks for the
smallest set of boundaries whose region around a sample z0 keeps z0's semantics, and samples
inside that region to explore what the generator keeps there.

How it is done here (the membership test is exact: the sign of each pre-activation, one forward
pass up to the layer; for a piecewise-linear layer of the latent the regions are polytopes):

* :func:`smallest_boundary_set` samples latents uniformly in a ball around z0, records for each
  which units keep z0's side (a conv channel keeps its side when every position does; ``per=
  "neuron"`` treats each position as its own unit) and whether ``semantics`` (e.g. a classifier's
  label or a segmenter's concept presence) of its image equals z0's. Greedily it adds the unit
  whose boundary gives the purest region (the fraction of the samples inside that keep the
  semantics; ties go to the larger region) until the purity target, then drops every unit the
  target does not need.
* :func:`sample_region` casts rays from z0, finds where each leaves the region (a grid, then
  bisection), samples inside along the rays, keeps the points just outside, and reports, per unit,
  how often crossing its boundary changes the semantics: which units bound the concept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from genxai.core.checks import check_choice, check_finite, check_positive_int
from genxai.core.hooks import Trace, resolve_layer

Semantics = Callable[[torch.Tensor], torch.Tensor]
"""``images -> (N,)`` labels (ints or bools); a sample keeps z0's semantics when its label equals z0's."""


def _check_z0(z0: Any) -> torch.Tensor:
    if not isinstance(z0, torch.Tensor) or z0.ndim < 2 or z0.shape[0] != 1:
        shape = tuple(z0.shape) if isinstance(z0, torch.Tensor) else type(z0).__name__
        raise ValueError(f"z0: expected one latent with a batch dimension of 1 (e.g. z[:1]), got {shape}")
    if not z0.is_floating_point():
        raise ValueError(f"z0: expected a floating-point latent, got dtype {z0.dtype}")
    check_finite(z0, "z0")
    return z0


def _check_radius(radius: Any) -> float:
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not radius > 0:
        raise ValueError(f"radius: expected a number > 0, got {radius!r}")
    return float(radius)


def _labels(semantics: Semantics, images: Any, n: int) -> torch.Tensor:
    labels = semantics(images)
    if not isinstance(labels, torch.Tensor) or labels.shape != (n,):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"semantics: expected one label per image, shape ({n},), got {shape}")
    return labels


def _agreement(output: torch.Tensor, side0: torch.Tensor, per: str) -> torch.Tensor:
    """(N, d) bool: unit u keeps z0's side. ``side0`` is z0's (1, C, ...) sign pattern."""
    same = (output > 0) == side0
    if per == "channel":
        return same.flatten(2).all(2) if same.ndim > 2 else same
    return same.flatten(1)


class _Region:
    """The layer, z0's side of every boundary, and batched membership tests of latents."""

    def __init__(
        self, generator: nn.Module, layer: str | nn.Module, z0: torch.Tensor, per: str, batch_size: int
    ) -> None:
        self.generator = generator
        self.layer, _ = resolve_layer(generator, layer)
        self.z0 = _check_z0(z0)
        self.per = check_choice(per, "per", ("channel", "neuron"))
        self.batch_size = check_positive_int(batch_size, "batch_size")
        with torch.no_grad(), Trace(generator, self.layer, stop=True) as trace:
            generator(z0)
        output = trace.require_output()
        if not isinstance(output, torch.Tensor) or output.ndim < 2:
            raise ValueError(f"layer: {self.layer!r} must output a tensor of shape (N, C, ...)")
        self.side0 = output > 0
        self.units = _agreement(output, self.side0, self.per).shape[1]

    def agreement(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, d) bool, each latent run only as far as the layer."""
        parts = []
        with torch.no_grad():
            for start in range(0, latents.shape[0], self.batch_size):
                with Trace(self.generator, self.layer, stop=True) as trace:
                    self.generator(latents[start : start + self.batch_size])
                parts.append(_agreement(trace.require_output(), self.side0, self.per))
        return torch.cat(parts)

    def agreement_and_labels(
        self, latents: torch.Tensor, semantics: Semantics
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Agreement (N, d) and the semantics labels of the generated images, one full pass."""
        agree, labels = [], []
        with torch.no_grad():
            for start in range(0, latents.shape[0], self.batch_size):
                chunk = latents[start : start + self.batch_size]
                with Trace(self.generator, self.layer) as trace:
                    images = self.generator(chunk)
                agree.append(_agreement(trace.require_output(), self.side0, self.per))
                labels.append(_labels(semantics, images, chunk.shape[0]))
        return torch.cat(agree), torch.cat(labels)

    def check_units(self, units: Any) -> torch.Tensor:
        if isinstance(units, torch.Tensor):
            units = units.tolist()
        if not isinstance(units, (list, tuple)) or not all(
            isinstance(u, int) and not isinstance(u, bool) for u in units
        ):
            raise ValueError(f"units: expected a list of unit indices, got {units!r}")
        bad = [u for u in units if not 0 <= u < self.units]
        if bad:
            raise ValueError(
                f"units: {bad} out of range for {self.layer!r} with {self.units} units "
                f"(per={self.per!r}; valid: 0..{self.units - 1})"
            )
        return torch.tensor(units, dtype=torch.long, device=self.z0.device)

    def directions(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` uniform unit directions in latent space, shaped like the latents."""
        noise = torch.randn(n, self.z0[0].numel(), generator=generator, device=self.z0.device)
        noise = noise / noise.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return noise.to(self.z0.dtype).view(n, *self.z0.shape[1:])


def _rng(z0: torch.Tensor, seed: int) -> torch.Generator:
    return torch.Generator(device=z0.device).manual_seed(seed)


@dataclass
class BoundarySet:
    """The smallest set of boundaries found for z0 at a layer, and how well its region keeps z0's
    semantics among the sampled neighbours.

    ``units``: the boundary units (per channel or per neuron, flattened); ``side``: z0's side of
    every boundary (pre-activation > 0), shape of the layer output; ``purity``: fraction of the
    samples inside the region whose semantics equal z0's; ``coverage``: fraction of all samples
    inside; ``initial_purity``: the same fraction over every sample (no boundary); ``reached``:
    whether the purity target was met; ``history``: the purity after each greedy addition."""

    units: torch.Tensor
    side: torch.Tensor
    purity: float
    coverage: float
    initial_purity: float
    reached: bool
    history: list[float]


def _purity(inside: torch.Tensor, keep: torch.Tensor) -> float:
    return float((inside & keep).sum()) / max(int(inside.sum()), 1)


def smallest_boundary_set(
    generator: nn.Module,
    layer: str | nn.Module,
    z0: torch.Tensor,
    semantics: Semantics,
    *,
    samples: int = 2048,
    radius: float = 1.0,
    purity: float = 0.95,
    per: str = "channel",
    max_units: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> BoundarySet:
    """The smallest set of ``layer``'s boundaries whose region around ``z0`` keeps its semantics.

    ``samples`` latents uniform in the ball of ``radius`` around z0 (z0 itself included) are the
    test set; the greedy growth and the pruning are described in the module docstring. ``purity``
    is the fraction of the region's samples that must keep z0's label."""
    region = _Region(generator, layer, z0, per, batch_size)
    check_positive_int(samples, "samples")
    radius = _check_radius(radius)
    if isinstance(purity, bool) or not isinstance(purity, (int, float)) or not 0 < purity <= 1:
        raise ValueError(f"purity: expected a number in (0, 1], got {purity!r}")
    limit = region.units if max_units is None else check_positive_int(max_units, "max_units")

    directions = region.directions(samples, _rng(z0, seed))
    dim = z0[0].numel()
    r = radius * torch.rand(samples, generator=_rng(z0, seed + 1), device=z0.device) ** (1.0 / dim)
    latents = torch.cat([z0, z0 + r.to(z0.dtype).view(-1, *([1] * (z0.ndim - 1))) * directions])
    agree, labels = region.agreement_and_labels(latents, semantics)
    keep = labels == labels[0]

    agree_f, inside = agree.float(), torch.ones(latents.shape[0], dtype=torch.bool, device=agree.device)
    chosen: list[int] = []
    history: list[float] = []
    current = initial = _purity(inside, keep)
    while current < purity and len(chosen) < limit:
        n_in = agree_f.T @ inside.float()  # samples left inside if unit u is added (z0 always is)
        n_keep = agree_f.T @ (inside & keep).float()
        score = n_keep / n_in
        if chosen:
            score[chosen] = -math.inf
        tie = score >= score.max() - 1e-9
        unit = int(torch.where(tie, n_in, torch.full_like(n_in, -1.0)).argmax())
        chosen.append(unit)
        inside = inside & agree[:, unit]
        current = _purity(inside, keep)
        history.append(current)
    if current >= purity:  # drop the units the target does not need, latest first
        for unit in list(reversed(chosen)):
            rest = [u for u in chosen if u != unit]
            trial = agree[:, rest].all(1) if rest else torch.ones_like(inside)
            if _purity(trial, keep) >= purity:
                chosen, inside, current = rest, trial, _purity(trial, keep)
    return BoundarySet(
        units=torch.tensor(chosen, dtype=torch.long, device=z0.device),
        side=region.side0[0],
        purity=current,
        coverage=float(inside.float().mean()),
        initial_purity=initial,
        reached=current >= purity,
        history=history,
    )


@dataclass
class RegionSamples:
    """Latents inside the region of ``units`` around z0 and just outside it.

    ``crossed[i, j]``: outside sample i is on the other side of ``units[j]``'s boundary. With
    semantics: ``inside_kept``/``outside_kept`` say which samples keep z0's label, and
    ``change_rate[j]`` is the fraction of the outside samples crossing ``units[j]`` that lose it
    (NaN when no ray left through that boundary): the units that bound the concept score high."""

    units: torch.Tensor
    inside: torch.Tensor
    outside: torch.Tensor
    crossed: torch.Tensor
    inside_kept: torch.Tensor | None = None
    outside_kept: torch.Tensor | None = None
    change_rate: torch.Tensor | None = None


def sample_region(
    generator: nn.Module,
    layer: str | nn.Module,
    z0: torch.Tensor,
    units: Any,
    n: int,
    *,
    radius: float = 1.0,
    steps: int = 16,
    refine: int = 10,
    semantics: Semantics | None = None,
    per: str = "channel",
    batch_size: int = 256,
    seed: int = 0,
) -> RegionSamples:
    """Explore the region of ``units``' boundaries around ``z0`` along ``n`` random rays.

    Each ray is tested at ``steps`` points up to ``radius``; where it leaves the region, ``refine``
    bisection steps (all rays at once) put the outside point just past the boundary. One inside
    point per ray is drawn uniformly on its inside segment, then checked (a region of a deep layer
    need not be convex), so every returned inside latent is inside."""
    region = _Region(generator, layer, z0, per, batch_size)
    index = region.check_units(units)
    if index.numel() == 0:
        raise ValueError("units: expected at least one unit")
    check_positive_int(n, "n")
    check_positive_int(steps, "steps")
    check_positive_int(refine, "refine", minimum=0)
    radius = _check_radius(radius)
    shape = (-1, *([1] * (z0.ndim - 1)))

    def inside(latents: torch.Tensor) -> torch.Tensor:
        return region.agreement(latents)[:, index].all(1)

    directions = region.directions(n, _rng(z0, seed))
    grid = radius * torch.arange(1, steps + 1, device=z0.device, dtype=z0.dtype) / steps
    points = z0 + (grid.view(1, steps, 1) * directions.flatten(1).unsqueeze(1)).view(n * steps, *z0.shape[1:])
    on_grid = inside(points).view(n, steps)
    exits = ~on_grid.all(1)
    first_out = (~on_grid).float().argmax(1)  # first grid point outside (0 where none)
    zero = torch.zeros(1, device=z0.device, dtype=z0.dtype)
    lo = torch.where(exits, torch.cat([zero, grid])[first_out], grid[-1].expand(n))
    hi = torch.where(exits, grid[first_out], grid[-1].expand(n))
    if bool(exits.any()) and refine:
        rays = exits.nonzero().flatten()
        ray_dirs = directions[rays]
        lo_r, hi_r = lo[rays], hi[rays]
        for _ in range(refine):  # bisection keeps lo inside and hi outside
            mid = (lo_r + hi_r) / 2
            ok = inside(z0 + mid.view(shape) * ray_dirs)
            lo_r, hi_r = torch.where(ok, mid, lo_r), torch.where(ok, hi_r, mid)
        lo[rays], hi[rays] = lo_r, hi_r

    t = torch.rand(n, generator=_rng(z0, seed + 1), device=z0.device).to(z0.dtype) * lo
    candidates = z0 + t.view(shape) * directions
    inside_latents = candidates[inside(candidates)]
    outside_latents = (z0 + hi.view(shape) * directions)[exits]
    crossed = (
        ~region.agreement(outside_latents)[:, index]
        if outside_latents.shape[0]
        else torch.zeros(0, index.numel(), dtype=torch.bool, device=z0.device)
    )
    result = RegionSamples(units=index, inside=inside_latents, outside=outside_latents, crossed=crossed)
    if semantics is not None:
        everything = torch.cat([z0, inside_latents, outside_latents])
        _, labels = region.agreement_and_labels(everything, semantics)
        kept = labels == labels[0]
        result.inside_kept = kept[1 : 1 + inside_latents.shape[0]]
        result.outside_kept = kept[1 + inside_latents.shape[0] :]
        changed = (~result.outside_kept).float()
        counts = crossed.float().sum(0)
        rate = (crossed.float() * changed.unsqueeze(1)).sum(0) / counts.clamp_min(1)
        result.change_rate = torch.where(counts > 0, rate, torch.full_like(rate, math.nan))
    return result
