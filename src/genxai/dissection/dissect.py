"""GAN Dissection (Bau et al., 2019): which units of a generator's layer draw which concepts.

    result = dissect(generator, "blocks.2", segmenter, num_samples=1000, batch_size=64, seed=0)
    result.interpretable            # units whose best concept passes the IoU (and IQR) bar
    result.concept_counts           # {"circle": 5, "stripes": 2, ...}
    result.save("runs/dissect")     # results.json + dissection.safetensors
    tiles = gallery(generator, "blocks.2", result, result.interpretable[:8])

The generator is any module mapping latents to images in [-1, 1] (or ``value_range``); the layer
is one of its submodules, read with a :class:`~genxai.core.hooks.Trace` (removed on every exit).
Latents are seeded per sample index (:class:`SeededLatents`), so the two passes over the samples
(:mod:`genxai.dissection.statistics`: unit ranges, then histograms) see the same images without
holding them, and a unit's top samples regenerate later from their indices alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from genxai.core.checks import check_in_range, check_positive_int
from genxai.core.hooks import Trace, resolve_layer
from genxai.dissection.segmenter import check_concept_masks, check_segmenter
from genxai.dissection.statistics import (
    DEFAULT_BINS,
    ConceptHistogram,
    RunningRange,
    RunningTopK,
    check_levels,
    upsample,
)

LatentsFn = Callable[..., torch.Tensor]
"""``latents_fn(n, generator=torch.Generator) -> (n, ...)`` latents (the signature of ``G.latents``)."""

LATENT_BLOCK = 256
"""Latents are drawn in blocks of this many samples; sample i is row ``i % 256`` of block ``i // 256``."""

QUANTILE_LEVELS = (0.5, 0.9, 0.99, 0.995, 0.999)
"""Per-unit quantiles kept in every result."""


class SeededLatents:
    """The latents of sample i, from a generator seeded by ``(seed, i // LATENT_BLOCK)``: any
    range or subset of samples regenerates the same latents, whatever the batch size."""

    def __init__(self, fn: LatentsFn, seed: int, device: torch.device | str) -> None:
        self.fn, self.seed, self.device = fn, seed, torch.device(device)
        self._cached: tuple[int, torch.Tensor] | None = None

    def block(self, b: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != b:
            rng = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
            z = self.fn(LATENT_BLOCK, generator=rng)
            if not isinstance(z, torch.Tensor) or z.ndim < 1 or z.shape[0] != LATENT_BLOCK:
                got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
                raise ValueError(
                    f"latents_fn: expected a tensor of {LATENT_BLOCK} latents for n={LATENT_BLOCK}, got {got}"
                )
            self._cached = (b, z.to(self.device))
        return self._cached[1]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Latents of samples ``start .. stop - 1``."""
        first, last = start // LATENT_BLOCK, (stop - 1) // LATENT_BLOCK
        parts = [self.block(b) for b in range(first, last + 1)]
        z = parts[0] if len(parts) == 1 else torch.cat(parts)
        offset = start - first * LATENT_BLOCK
        return z[offset : offset + stop - start]

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        """Latents of the given sample indices (one block drawn per distinct block)."""
        indices = indices.flatten().long().cpu()
        blocks = (indices // LATENT_BLOCK).unique()
        z = torch.cat([self.block(b) for b in blocks.tolist()])
        rows = torch.searchsorted(blocks, indices // LATENT_BLOCK) * LATENT_BLOCK + indices % LATENT_BLOCK
        return z[rows.to(z.device)]


@dataclass
class Dissection:
    """The result of :func:`dissect`: per unit and concept, the IQR-chosen threshold and its scores.

    (U, C) tensors ``iou``, ``iqr``, ``threshold``, ``level`` (quantile level of the threshold) and
    ``mask_fraction``; per unit ``unit_concept`` (its best concept: the highest IoU among concepts
    whose IQR passes ``iqr_bar``, else the highest IoU), range, mean and quantiles; the samples where
    each unit fires most (``top_samples``, by the unit's spatial maximum).
    """

    layer: str
    concepts: list[str]
    iou: torch.Tensor
    iqr: torch.Tensor
    threshold: torch.Tensor
    level: torch.Tensor
    mask_fraction: torch.Tensor
    unit_concept: torch.Tensor
    minimum: torch.Tensor
    maximum: torch.Tensor
    mean: torch.Tensor
    quantile_levels: torch.Tensor
    quantiles: torch.Tensor
    concept_fraction: torch.Tensor
    top_values: torch.Tensor
    top_samples: torch.Tensor
    levels: torch.Tensor
    num_samples: int
    seed: int
    iou_bar: float
    iqr_bar: float
    bins: int
    image_size: list[int]
    activation_size: list[int]
    value_range: list[float]
    concept_groups: dict[str, str] | None = None
    latent_block: int = LATENT_BLOCK
    meta: dict[str, Any] = field(default_factory=dict)

    TENSORS = (
        "iou", "iqr", "threshold", "level", "mask_fraction", "unit_concept", "minimum", "maximum", "mean",
        "quantile_levels", "quantiles", "concept_fraction", "top_values", "top_samples", "levels",
    )  # fmt: skip

    @property
    def units(self) -> int:
        return self.iou.shape[0]

    def _of_unit(self, table: torch.Tensor) -> torch.Tensor:
        return table.gather(1, self.unit_concept[:, None])[:, 0]

    @property
    def unit_iou(self) -> torch.Tensor:
        return self._of_unit(self.iou)

    @property
    def unit_iqr(self) -> torch.Tensor:
        return self._of_unit(self.iqr)

    @property
    def unit_threshold(self) -> torch.Tensor:
        return self._of_unit(self.threshold)

    @property
    def unit_level(self) -> torch.Tensor:
        return self._of_unit(self.level)

    @property
    def interpretable_mask(self) -> torch.Tensor:
        """(U,) bool: IoU above ``iou_bar`` and IQR above ``iqr_bar`` for the unit's best concept."""
        return (self.unit_iou > self.iou_bar) & (self.unit_iqr > self.iqr_bar)

    @property
    def interpretable(self) -> list[int]:
        """The interpretable units, highest IoU first."""
        units = self.interpretable_mask.nonzero().flatten()
        return units[self.unit_iou[units].argsort(descending=True, stable=True)].tolist()

    @property
    def concept_counts(self) -> dict[str, int]:
        """Interpretable units per concept (every concept, most units first)."""
        counts = torch.bincount(self.unit_concept[self.interpretable_mask], minlength=len(self.concepts))
        order = sorted(range(len(self.concepts)), key=lambda c: (-int(counts[c]), c))
        return {self.concepts[c]: int(counts[c]) for c in order}

    def units_of(self, concept: str) -> list[int]:
        """Interpretable units whose best concept is ``concept``, highest IoU first."""
        if concept not in self.concepts:
            raise ValueError(f"concept: {concept!r} is not one of {', '.join(self.concepts)}")
        c = self.concepts.index(concept)
        return [u for u in self.interpretable if int(self.unit_concept[u]) == c]

    def records(self) -> list[dict[str, Any]]:
        """One JSON-able row per unit: best concept, IoU, IQR, threshold, level, interpretable, top samples."""
        iou, iqr, thr, lvl = (
            t.tolist() for t in (self.unit_iou, self.unit_iqr, self.unit_threshold, self.unit_level)
        )
        good, concept = self.interpretable_mask.tolist(), self.unit_concept.tolist()
        top = self.top_samples.tolist()
        return [
            {
                "unit": u,
                "concept": self.concepts[concept[u]],
                "iou": iou[u],
                "iqr": iqr[u],
                "threshold": thr[u],
                "level": lvl[u],
                "interpretable": good[u],
                "top_samples": top[u],
            }
            for u in range(self.units)
        ]

    def summary(self) -> dict[str, Any]:
        """The JSON of ``results.json``: settings, counts per concept and the per-unit records."""
        return {
            "layer": self.layer,
            "units": self.units,
            "concepts": self.concepts,
            "concept_groups": self.concept_groups,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "iou_bar": self.iou_bar,
            "iqr_bar": self.iqr_bar,
            "bins": self.bins,
            "image_size": self.image_size,
            "activation_size": self.activation_size,
            "value_range": self.value_range,
            "latent_block": self.latent_block,
            "interpretable": self.interpretable,
            "concept_counts": self.concept_counts,
            "concept_fraction": dict(zip(self.concepts, self.concept_fraction.tolist())),
            "meta": self.meta,
            "unit_records": self.records(),
        }

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/results.json`` (summary) and ``folder/dissection.safetensors`` (tensors)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in self.TENSORS}
        save_file(tensors, folder / "dissection.safetensors")
        (folder / "results.json").write_text(json.dumps(self.summary(), indent=2))
        return folder / "results.json"

    @classmethod
    def load(cls, folder: str | Path) -> Dissection:
        """The result saved by :meth:`save`."""
        folder = Path(folder)
        if not (folder / "results.json").is_file() or not (folder / "dissection.safetensors").is_file():
            raise FileNotFoundError(f"dissection: no results.json and dissection.safetensors in {folder}")
        summary = json.loads((folder / "results.json").read_text())
        tensors = load_file(folder / "dissection.safetensors")
        names = {f.name for f in fields(cls)} - set(cls.TENSORS)
        return cls(**tensors, **{k: v for k, v in summary.items() if k in names})


def dissect(
    generator: nn.Module,
    layer: str | nn.Module,
    segmenter: Any,
    *,
    num_samples: int = 1000,
    batch_size: int = 32,
    seed: int = 0,
    latents_fn: LatentsFn | None = None,
    device: torch.device | str | None = None,
    iou_bar: float = 0.04,
    iqr_bar: float = 0.01,
    top_k: int = 8,
    levels: Sequence[float] | torch.Tensor | None = None,
    bins: int = DEFAULT_BINS,
    value_range: tuple[float, float] | None = None,
    progress: bool = False,
) -> Dissection:
    """Dissect ``layer`` of ``generator`` against the concepts of ``segmenter``.

    Args:
        generator: a module, latents -> images (N, C, H, W) in ``value_range``.
        layer: dotted name (or the module) whose output (N, U, h, w) holds the units.
        segmenter: any :class:`~genxai.dissection.segmenter.Segmenter` (``concepts`` and
            ``concept_masks(images in [0, 1])``).
        num_samples: generated images; ``batch_size`` at a time (memory does not grow with it).
        seed: the latents' seed; with ``latents_fn`` (default: ``generator.latents``) it fixes every sample.
        device: where the generator runs (default: its parameters' device; it is not moved).
        iou_bar, iqr_bar: a unit is interpretable when its best concept's IoU exceeds ``iou_bar``
            (the paper: 0.04-0.05) and its IQR exceeds ``iqr_bar`` (the authors' code: 0.01; it keeps
            units unrelated to every concept out even where a large mask overlaps a large concept).
        top_k: samples kept per unit for the gallery (by the unit's spatial maximum).
        levels: candidate quantile levels (default :func:`~genxai.dissection.statistics.default_levels`).
        bins: histogram bins per unit (threshold resolution (max - min) / bins).
        value_range: the generator's output range (default ``generator.value_range`` or (-1, 1)).
        progress: show a progress bar.
    """
    concepts = check_segmenter(segmenter)
    setup = _setup(generator, layer, latents_fn, device, value_range, seed)
    check_positive_int(num_samples, "num_samples")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(top_k, "top_k")
    check_positive_int(bins, "bins", minimum=2)
    check_in_range(iou_bar, "iou_bar", 0.0, 1.0)
    check_in_range(iqr_bar, "iqr_bar", 0.0, 1.0)
    levels = check_levels(levels)
    total = 2 * math.ceil(num_samples / batch_size)
    bar = _progress(total, progress, f"dissect {setup.layer}")
    with bar, setup.running() as run:
        ranges = topk = None
        for start, images, acts in run(num_samples, batch_size, bar):  # pass 1: ranges, top samples
            if ranges is None:  # the first batch: check everything before the long work
                check_concept_masks(segmenter.concept_masks(images), images, concepts)
                ranges = RunningRange(acts.shape[1], device=setup.device)
                topk = RunningTopK(acts.shape[1], min(top_k, num_samples), device=setup.device)
                shapes = (list(images.shape[-2:]), list(acts.shape[-2:]))
            ranges.update(acts)
            topk.update(acts.amax((2, 3)), torch.arange(start, start + len(acts), device=setup.device))
        hist = ConceptHistogram(ranges.minimum, ranges.maximum, len(concepts), bins=bins)
        for _, images, acts in run(num_samples, batch_size, bar):  # pass 2: the same samples again
            masks = check_concept_masks(segmenter.concept_masks(images), images, concepts)
            hist.update(acts, masks.to(setup.device))
    best = hist.best_thresholds(levels)
    iou, iqr = best["iou"], best["iqr"]
    qualified = torch.where(iqr > iqr_bar, iou, iou - 2)  # concepts passing the IQR bar rank first
    top_values, top_samples = topk.result()
    quantile_levels = torch.tensor(QUANTILE_LEVELS, dtype=torch.float64)
    groups = getattr(segmenter, "concept_groups", None)
    return Dissection(
        layer=setup.layer,
        concepts=concepts,
        iou=iou.cpu(),
        iqr=iqr.cpu(),
        threshold=best["threshold"].cpu(),
        level=best["level"].cpu(),
        mask_fraction=best["mask_fraction"].cpu(),
        unit_concept=qualified.argmax(1).cpu(),
        minimum=ranges.minimum.cpu(),
        maximum=ranges.maximum.cpu(),
        mean=ranges.mean.cpu(),
        quantile_levels=quantile_levels.float(),
        quantiles=hist.quantiles(quantile_levels).cpu(),
        concept_fraction=(hist.concept_pixels.double() / hist.pixels).float().cpu(),
        top_values=top_values.cpu(),
        top_samples=top_samples.cpu(),
        levels=levels.float().cpu(),
        num_samples=num_samples,
        seed=seed,
        iou_bar=float(iou_bar),
        iqr_bar=float(iqr_bar),
        bins=bins,
        image_size=shapes[0],
        activation_size=shapes[1],
        value_range=list(setup.value_range),
        concept_groups=dict(groups) if isinstance(groups, dict) else None,
    )


def gallery(
    generator: nn.Module,
    layer: str | nn.Module | None,
    dissection: Dissection,
    units: Sequence[int],
    *,
    count: int | None = None,
    batch_size: int = 64,
    latents_fn: LatentsFn | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Regenerate each unit's top samples and threshold its upsampled map there.

    ``layer`` must be the dissected layer (None: ``dissection.layer``); ``latents_fn`` the same as
    for :func:`dissect`. Returns ``units`` (K,), ``samples`` (K, S), ``images`` (K, S, C, H, W) in
    [0, 1], ``heat`` (K, S, 1, H, W) the upsampled unit maps and ``masks`` (K, S, 1, H, W) bool,
    ``heat > threshold`` of the unit's best concept. Drawing them is :mod:`genxai.report`'s job.
    """
    layer = dissection.layer if layer is None else layer
    setup = _setup(generator, layer, latents_fn, device, tuple(dissection.value_range), dissection.seed)
    if setup.layer != dissection.layer:
        raise ValueError(f"layer: the dissection is of {dissection.layer!r}, got {setup.layer!r}")
    units_t = torch.as_tensor(list(units), dtype=torch.long).flatten()
    if units_t.numel() == 0 or bool(((units_t < 0) | (units_t >= dissection.units)).any()):
        raise ValueError(
            f"units: expected unit indices in [0, {dissection.units}), got {units_t.tolist()[:8]}"
        )
    available = dissection.top_samples.shape[1]
    count = available if count is None else count
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= available:
        raise ValueError(
            f"count: expected an integer in [1, {available}] (the samples kept per unit), got {count!r}"
        )
    check_positive_int(batch_size, "batch_size")
    samples = dissection.top_samples[units_t, :count]  # (K, S)
    unique = samples.unique()
    images, maps = [], []
    with setup.running() as run:
        for start in range(0, unique.numel(), batch_size):
            z = setup.latents.take(unique[start : start + batch_size])
            x, acts = run.forward(z)
            if acts.shape[1] != dissection.units:
                raise ValueError(
                    f"layer: {setup.layer!r} has {acts.shape[1]} units, the dissection {dissection.units}"
                )
            images.append(x.cpu())
            maps.append(acts[:, units_t.to(acts.device)].float().cpu())
    images_t, maps_t = torch.cat(images), torch.cat(maps)  # (M, C, H, W), (M, K, h, w)
    position = torch.searchsorted(unique, samples)  # (K, S) rows of the unique samples
    heat = upsample(maps_t, tuple(images_t.shape[-2:]))[position, torch.arange(len(units_t))[:, None]]
    thresholds = dissection.unit_threshold[units_t].float()
    return {
        "units": units_t,
        "samples": samples,
        "images": images_t[position],
        "heat": heat[:, :, None],
        "masks": (heat > thresholds[:, None, None, None])[:, :, None],
    }


# --- running the generator ----------------------------------------------------------------------


@dataclass
class _Setup:
    generator: nn.Module
    layer: str
    latents: SeededLatents
    device: torch.device
    value_range: tuple[float, float]

    def running(self) -> _Running:
        return _Running(self)


class _Running:
    """Inside: the generator in eval mode under no_grad with ``layer`` traced; on exit (however it
    is left) the hook is removed and every module's mode restored."""

    def __init__(self, setup: _Setup) -> None:
        self.setup = setup

    def __enter__(self) -> _Running:
        self.modes = [(m, m.training) for m in self.setup.generator.modules()]
        self.grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            self.setup.generator.eval()
            self.trace = Trace(self.setup.generator, self.setup.layer, detach=True)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if hasattr(self, "trace"):
            self.trace.close()
        for module, training in self.modes:
            module.training = training
        torch.set_grad_enabled(self.grad)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] and the layer's output for latents ``z``."""
        self.trace.output = None
        out = self.setup.generator(z)
        acts = self.trace.require_output()
        if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != z.shape[0]:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"generator: expected images (N={z.shape[0]}, C, H, W), got {got}")
        if acts.ndim != 4 or acts.shape[0] != z.shape[0]:
            raise ValueError(
                f"layer: {self.setup.layer!r} must output unit maps (N, U, h, w), got {tuple(acts.shape)}"
            )
        low, high = self.setup.value_range
        images = ((out.float() - low) / (high - low)).clamp(0, 1)
        return images, acts.to(self.setup.device)

    def __call__(
        self, num_samples: int, batch_size: int, bar: Any
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(first sample index, images, activations)`` for every batch of the samples, in order."""
        for start in range(0, num_samples, batch_size):
            stop = min(start + batch_size, num_samples)
            images, acts = self.forward(self.setup.latents.rows(start, stop))
            yield start, images, acts
            bar.update(1)


def _setup(
    generator: Any,
    layer: str | nn.Module,
    latents_fn: LatentsFn | None,
    device: torch.device | str | None,
    value_range: tuple[float, float] | None,
    seed: int,
) -> _Setup:
    if not isinstance(generator, nn.Module):
        raise ValueError(
            f"generator: expected a torch.nn.Module (latents -> images), got {type(generator).__name__}"
        )
    name, _ = resolve_layer(generator, layer)
    fn = latents_fn if latents_fn is not None else getattr(generator, "latents", None)
    if not callable(fn):
        raise ValueError(
            f"latents_fn: {type(generator).__name__} has no latents(n, generator=...) method; pass "
            "latents_fn=lambda n, generator: torch.randn(n, DIM, generator=generator)"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
    params = next(generator.parameters(), None)
    home = params.device if params is not None else torch.device("cpu")
    device = torch.device(device) if device is not None else home
    if params is not None and device.type != home.type:
        raise ValueError(
            f"device: the generator's parameters are on {home}, not {device}; move it first (generator.to(device))"
        )
    value_range = value_range if value_range is not None else getattr(generator, "value_range", (-1.0, 1.0))
    try:
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValueError(f"value_range: expected (low, high), got {value_range!r}") from None
    if not high > low:
        raise ValueError(f"value_range: expected low < high, got {value_range!r}")
    return _Setup(generator, name, SeededLatents(fn, seed, device), device, (low, high))


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, dynamic_ncols=True)


__all__ = ["LATENT_BLOCK", "Dissection", "LatentsFn", "SeededLatents", "dissect", "gallery"]
