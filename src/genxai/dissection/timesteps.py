"""GAN Dissection of a diffusion UNet, per timestep: which channels of a block carry which concept when.

    sampler = TimestepSampler(unet, "down.1", sample, visited, (3, 32, 32))   # jobs: diffusion_sampler
    result = dissect_timesteps(sampler, segmenter, timesteps=[900, 600, 300, 0], num_samples=200)
    result.best_iou                 # (T, C): IoU of the best unit per concept at each t (emergence)
    ace = timestep_ace(sampler, segmenter, result, num_samples=32)
    ace.ace                         # (T, C): ablating each concept's best units at t only

Images are samples of a deterministic sampler (DDIM, ``eta = 0``) from seeded noise x_T (sample
i's noise depends only on ``seed`` and i, as :class:`~genxai.dissection.dissect.SeededLatents`).
This module knows no diffusion model: :class:`TimestepSampler` takes the sampler and the
denoiser call (``genxai.jobs.dissection.diffusion_sampler`` binds t with
:class:`~genxai.diffusion.guidance.TimeConditioned` and samples with DDIM, for our UNet or a
diffusers ``UNet2DModel``, whose output's ``.sample`` is taken), so any block name of either
works. While sampling, the block's output (N, U, h, w) is read at each chosen t; the *final*
sample is segmented, and each unit's map at t is scored against those masks exactly as
:func:`~genxai.dissection.dissect.dissect` scores a GAN layer (IQR-chosen thresholds, IoU),
streamed in two sampling passes: ranges, then histograms (:mod:`.statistics`); memory does not
grow with ``num_samples``.

ACE per timestep (:func:`timestep_ace`): for each t and concept, the ``units`` channels with the
highest IoU for that concept at t are set to 0 at that step only; the ACE is the mean change of
the concept's pixel fraction in the final sample. A concept the block carries at t that sampling
restores later has IoU without effect; both curves over t are in the report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genxai.core.checks import check_in_range, check_positive_int
from genxai.core.hooks import Trace, resolve_layer
from genxai.core.modes import evaluation_mode
from genxai.dissection.dissect import SeededLatents
from genxai.dissection.interventions import ablate
from genxai.dissection.segmenter import check_concept_masks, check_segmenter
from genxai.dissection.statistics import DEFAULT_BINS, ConceptHistogram, RunningRange, check_levels

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], Any]
"""``denoise(x_t, t) -> eps`` (or an object whose ``.sample`` is eps, as diffusers returns)."""
SampleFn = Callable[[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor], torch.Tensor]
"""``sample(model_fn, x_T) -> x_0`` in [-1, 1]: a deterministic sampler calling ``model_fn(x_t, t)``."""


class TimestepSampler:
    """Samples of seeded noise through ``sample``, reading ``layer`` of ``model`` at the timesteps
    in ``read`` and ablating units at those in ``ablations``; the model in eval mode, no grad, its
    hooks always removed.

    Args:
        model: the denoiser whose block is read (a UNet); ``denoise`` calls it.
        layer: dotted name of the block (our UNet's ``down.1``, diffusers' ``down_blocks.1``, ...).
        sample: ``sample(model_fn, x_T) -> x_0`` in [-1, 1], deterministic given x_T (DDIM, eta 0).
        visited: the timesteps ``sample`` calls the model at (the choosable ones).
        image_shape: (C, H, W) of x_T; sample i's noise depends only on ``seed`` and i.
        denoise: ``denoise(x_t, t) -> eps`` (default: ``model(x_t, t)``); the job binds t with
            :class:`~genxai.diffusion.guidance.TimeConditioned`.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module,
        sample: SampleFn,
        visited: Sequence[int],
        image_shape: Sequence[int],
        *,
        denoise: DenoiseFn | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        description: str = "",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: expected a torch.nn.Module eps(x, t), got {type(model).__name__}")
        self.layer, _ = resolve_layer(model, layer)
        shape = tuple(image_shape)
        if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
            raise ValueError(f"image_shape: expected (C, H, W), got {image_shape!r}")
        check_positive_int(seed, "seed", minimum=0)
        self.visited = [int(t) for t in visited]
        if not self.visited:
            raise ValueError("visited: expected the timesteps the sampler visits, got none")
        self.model, self.sample, self.shape, self.seed = model, sample, shape, seed
        self.denoise = denoise if denoise is not None else model
        self.description = description or f"a {len(self.visited)}-step sampler"
        params = next(model.parameters(), None)
        home = params.device if params is not None else torch.device("cpu")
        self.device = torch.device(device) if device is not None else home
        self.noise = SeededLatents(
            lambda n, generator: torch.randn(n, *shape, generator=generator), seed, self.device
        )

    def check_timesteps(self, timesteps: Sequence[int] | None, count: int = 5) -> list[int]:
        """The chosen timesteps, largest first (each one the sampler visits); default ``count`` of them."""
        if timesteps is None:
            picks = torch.linspace(0, len(self.visited) - 1, min(count, len(self.visited))).round().long()
            return sorted({self.visited[i] for i in picks.tolist()}, reverse=True)
        chosen = list(timesteps)
        wrong = [t for t in chosen if isinstance(t, bool) or not isinstance(t, int) or t not in self.visited]
        if not chosen or wrong or len(set(chosen)) != len(chosen):
            shown = ", ".join(map(str, self.visited[:: max(1, len(self.visited) // 10)]))
            raise ValueError(
                f"timesteps: {wrong or chosen} are not distinct timesteps of {self.description}; it "
                f"visits {len(self.visited)} from {self.visited[0]} to {self.visited[-1]} (e.g. {shown})"
            )
        return sorted(chosen, reverse=True)

    def run(
        self,
        start: int,
        stop: int,
        *,
        read: Sequence[int] = (),
        ablations: dict[int, list[int]] | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Final samples ``start .. stop - 1`` in [0, 1] and the layer's output at each t of ``read``."""
        ablations = ablations or {}
        acts: dict[int, torch.Tensor] = {}

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            step = int(t.flatten()[0])
            with ExitStack() as stack:
                if step in ablations:
                    stack.enter_context(ablate(self.model, self.layer, ablations[step]))
                trace = Trace(self.model, self.layer, detach=True) if step in read else None
                if trace is not None:
                    stack.enter_context(trace)
                out = self.denoise(x, t)
            if trace is not None:
                found = trace.require_output()
                if found.ndim != 4 or found.shape[0] != x.shape[0]:
                    raise ValueError(
                        f"layer: {self.layer!r} must output unit maps (N, U, h, w), got {tuple(found.shape)}"
                    )
                acts[step] = found.float()
            return getattr(out, "sample", out)

        x_T = self.noise.rows(start, stop)
        with torch.no_grad(), evaluation_mode(self.model):
            x = self.sample(model_fn, x_T)
        missing = [t for t in read if t not in acts]
        if missing:
            raise ValueError(f"timesteps: the sampler never called the model at {missing}")
        return ((x.float() + 1) / 2).clamp(0, 1), acts


@dataclass
class TimestepDissection:
    """Per chosen timestep t (largest first) and unit and concept: (T, U, C) ``iou``, ``iqr`` and
    ``threshold`` as :class:`~genxai.dissection.dissect.Dissection` has them for one layer."""

    layer: str
    concepts: list[str]
    timesteps: list[int]
    iou: torch.Tensor
    iqr: torch.Tensor
    threshold: torch.Tensor
    concept_fraction: torch.Tensor
    num_samples: int
    sampler: str
    seed: int
    iou_bar: float
    iqr_bar: float
    image_shape: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def units(self) -> int:
        return self.iou.shape[1]

    @property
    def unit_concept(self) -> torch.Tensor:
        """(T, U) each unit's concept at t: highest IoU among concepts passing the IQR bar, if any."""
        return torch.where(self.iqr > self.iqr_bar, self.iou, self.iou - 2).argmax(2)

    @property
    def interpretable(self) -> torch.Tensor:
        """(T, U) bool: the unit's concept passes both bars at t."""
        pick = self.unit_concept[..., None]
        return (self.iou.gather(2, pick)[..., 0] > self.iou_bar) & (
            self.iqr.gather(2, pick)[..., 0] > self.iqr_bar
        )

    def _ranked(self) -> torch.Tensor:
        """(T, U, C) IoU, raised by 1 where the IQR passes the bar: those units rank first."""
        return torch.where(self.iqr > self.iqr_bar, self.iou + 1, self.iou)

    @property
    def best_unit(self) -> torch.Tensor:
        """(T, C) per concept at t the unit with the highest IoU among those whose IQR passes the
        bar (among all when none does)."""
        return self._ranked().argmax(1)

    @property
    def best_iou(self) -> torch.Tensor:
        """(T, C) the highest IoU among units whose IQR for the concept passes the bar (0 if none):
        the concept-emergence curves (a unit unrelated to the concept with a large mask is left out)."""
        return torch.where(self.iqr > self.iqr_bar, self.iou, torch.zeros_like(self.iou)).amax(1)

    def top_units(self, count: int) -> torch.Tensor:
        """(T, C, count) per concept at t the ``count`` units ranked as :attr:`best_unit`."""
        return self._ranked().topk(min(count, self.units), dim=1).indices.transpose(1, 2)

    def summary(self) -> dict[str, Any]:
        """JSON-able: settings, per t the interpretable units per concept and the best unit per concept."""
        per_t = []
        for i, t in enumerate(self.timesteps):
            good = self.interpretable[i]
            counts = torch.bincount(self.unit_concept[i][good], minlength=len(self.concepts)).tolist()
            per_t.append(
                {
                    "t": t,
                    "interpretable": int(good.sum()),
                    "concept_counts": dict(zip(self.concepts, counts)),
                    "best_unit": dict(zip(self.concepts, self.best_unit[i].tolist())),
                    "best_iou": dict(zip(self.concepts, self.best_iou[i].tolist())),
                }
            )
        keys = ("layer", "concepts", "timesteps", "num_samples", "sampler", "seed", "iou_bar", "iqr_bar")
        return {
            **{k: getattr(self, k) for k in keys},
            "units": self.units,
            "image_shape": self.image_shape,
            "concept_fraction": dict(zip(self.concepts, self.concept_fraction.tolist())),
            "per_timestep": per_t,
            "meta": self.meta,
        }

    def save(self, folder: str | Path) -> Path:
        """``folder/timesteps.safetensors`` (iou, iqr, threshold, concept_fraction)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: getattr(self, k).contiguous() for k in ("iou", "iqr", "threshold", "concept_fraction")}
        save_file(tensors, str(folder / "timesteps.safetensors"))
        return folder


def dissect_timesteps(
    sampler: TimestepSampler,
    segmenter: Any,
    *,
    timesteps: Sequence[int] | None = None,
    num_samples: int = 200,
    batch_size: int = 32,
    seed: int = 0,
    iou_bar: float = 0.04,
    iqr_bar: float = 0.01,
    levels: Sequence[float] | torch.Tensor | None = None,
    bins: int = DEFAULT_BINS,
    progress: bool = False,
) -> TimestepDissection:
    """Dissect the sampler's layer at each of ``timesteps`` (default: 5 of those it visits) against
    the concepts ``segmenter`` finds in the final samples; see the module's description."""
    concepts = check_segmenter(segmenter)
    chosen = sampler.check_timesteps(timesteps)
    check_positive_int(num_samples, "num_samples")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(bins, "bins", minimum=2)
    check_in_range(iou_bar, "iou_bar", 0.0, 1.0)
    check_in_range(iqr_bar, "iqr_bar", 0.0, 1.0)
    levels = check_levels(levels)
    chunks = [(a, min(a + batch_size, num_samples)) for a in range(0, num_samples, batch_size)]
    from tqdm.auto import tqdm

    ranges: dict[int, RunningRange] = {}
    with tqdm(total=2 * len(chunks), disable=not progress, desc=f"dissect {sampler.layer} over t") as bar:
        for a, b in chunks:  # pass 1: each unit's range at each t
            images, acts = sampler.run(a, b, read=chosen)
            if not ranges:
                check_concept_masks(segmenter.concept_masks(images), images, concepts)
            for t in chosen:
                ranges.setdefault(t, RunningRange(acts[t].shape[1], acts[t].device)).update(acts[t])
            bar.update(1)
        hists = {
            t: ConceptHistogram(r.minimum, r.maximum, len(concepts), bins=bins) for t, r in ranges.items()
        }
        for a, b in chunks:  # pass 2: the same samples, histograms against the final masks
            images, acts = sampler.run(a, b, read=chosen)
            masks = check_concept_masks(segmenter.concept_masks(images), images, concepts)
            for t in chosen:
                hists[t].update(acts[t], masks.to(acts[t].device))
            bar.update(1)
    best = [hists[t].best_thresholds(levels) for t in chosen]
    first = hists[chosen[0]]
    return TimestepDissection(
        layer=sampler.layer,
        concepts=concepts,
        timesteps=chosen,
        iou=torch.stack([b["iou"] for b in best]).cpu(),
        iqr=torch.stack([b["iqr"] for b in best]).cpu(),
        threshold=torch.stack([b["threshold"] for b in best]).float().cpu(),
        concept_fraction=(first.concept_pixels.double() / first.pixels).float().cpu(),
        num_samples=num_samples,
        sampler=sampler.description,
        seed=sampler.seed,
        iou_bar=float(iou_bar),
        iqr_bar=float(iqr_bar),
        image_shape=list(sampler.shape),
    )


@dataclass
class TimestepACE:
    """(T, C) ``ace``: the mean change of each concept's pixel fraction in the final samples when
    its ``units`` (T, C, k) are ablated at step t only (NaN for concepts left out); ``baseline`` (C,)
    the fractions without edits."""

    timesteps: list[int]
    concepts: list[str]
    units: torch.Tensor
    ace: torch.Tensor
    baseline: torch.Tensor
    num_samples: int

    def summary(self) -> dict[str, Any]:
        rows = []
        for i, t in enumerate(self.timesteps):
            for j, c in enumerate(self.concepts):
                if not math.isnan(float(self.ace[i, j])):
                    rows.append(
                        {
                            "t": t,
                            "concept": c,
                            "units": self.units[i, j].tolist(),
                            "ace": float(self.ace[i, j]),
                        }
                    )
        return {
            "num_samples": self.num_samples,
            "baseline": dict(zip(self.concepts, self.baseline.tolist())),
            "ace": rows,
        }


def timestep_ace(
    sampler: TimestepSampler,
    segmenter: Any,
    result: TimestepDissection,
    *,
    units: int = 1,
    concepts: Sequence[str] | None = None,
    num_samples: int = 32,
    batch_size: int = 32,
    progress: bool = False,
) -> TimestepACE:
    """ACE per timestep of ``result``: for each t and concept (default: those present in the
    samples), ablate the concept's ``units`` best units at t only, over the first ``num_samples``
    samples of ``sampler`` (with the dissection's seed: the first dissected ones)."""
    names = check_segmenter(segmenter)
    if names != result.concepts:
        raise ValueError(f"segmenter: its concepts {names} differ from the dissection's {result.concepts}")
    if sampler.layer != result.layer:
        raise ValueError(f"layer: the dissection is of {result.layer!r}, got {sampler.layer!r}")
    check_positive_int(units, "units")
    check_positive_int(num_samples, "num_samples")
    check_positive_int(batch_size, "batch_size")
    if concepts is None:
        picked = [j for j, f in enumerate(result.concept_fraction.tolist()) if f > 0]
    else:
        unknown = [c for c in concepts if c not in names]
        if unknown or not concepts:
            raise ValueError(f"concepts: {unknown or 'none'} given; expected names among {names}")
        picked = [names.index(c) for c in concepts]
    top = result.top_units(units)  # (T, C, k)
    chunks = [(a, min(a + batch_size, num_samples)) for a in range(0, num_samples, batch_size)]

    def fractions(ablations: dict[int, list[int]] | None) -> torch.Tensor:
        total = torch.zeros(len(names), dtype=torch.float64)
        for a, b in chunks:
            images, _ = sampler.run(a, b, ablations=ablations)
            masks = check_concept_masks(segmenter.concept_masks(images), images, names)
            total += masks.flatten(2).float().mean(2).sum(0).double().cpu()
        return total / num_samples

    from tqdm.auto import tqdm

    ace = torch.full((len(result.timesteps), len(names)), float("nan"))
    with tqdm(total=1 + len(result.timesteps) * len(picked), disable=not progress, desc="ACE over t") as bar:
        baseline = fractions(None)
        bar.update(1)
        for i, t in enumerate(result.timesteps):
            for j in picked:
                moved = fractions({t: top[i, j].tolist()})
                ace[i, j] = float(moved[j] - baseline[j])
                bar.update(1)
    return TimestepACE(result.timesteps, names, top, ace, baseline.float(), num_samples)


__all__ = ["TimestepACE", "TimestepDissection", "TimestepSampler", "dissect_timesteps", "timestep_ace"]
