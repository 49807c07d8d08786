"""Automatic correction of generation artifacts (Tousi et al., CVPR 2021).

An :class:`ArtifactClassifier` (:mod:`.artifact_classifier`; one logit: artifact vs good) is trained through
the loop (:func:`train_artifact_classifier`) on real against generated images, or on labelled
flawed / good ones. Its Grad-CAM, thresholded per image (top ``1 - mask_quantile`` of the map),
marks the artifact. A unit's defective score is the mean over the flagged samples (probability
>= 0.5) of the IoU of that mask with the unit's upsampled map above the unit's ``unit_quantile``
(over all samples and pixels, as GAN Dissection), streamed in three passes: ranges, histograms
(:mod:`.statistics`), IoUs. :func:`correct_artifacts` scores and ablates the worst units layer by
layer on the generator as corrected so far; :func:`fid_before_after` compares FID on the same
seeded latents without and with the ablations (ablating artifact units lowers FID).

    clf = train_artifact_classifier(G, real_data, "runs/artifacts")
    with correct_artifacts(G, ["blocks.1", "blocks.2"], clf, units_per_layer=8) as fix:
        images = G(z)                   # corrected samples
    fix.summary()                       # units per layer, artifact score before/after each layer
    fid_before_after(G, fix, reference_statistics(extractor, real_data))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from genxai.attribution import build
from genxai.core.checks import check_in_range, check_positive_int
from genxai.core.hooks import Trace, resolve_layer
from genxai.core.modes import evaluation_mode
from genxai.core.targets import DiscriminatorScore
from genxai.dissection.artifact_classifier import (
    LatentsFn,
    Range,
    artifact_probability,
    source_options,
    threshold_maps,
    to_unit_range,
)
from genxai.dissection.dissect import SeededLatents
from genxai.dissection.interventions import Units, ablate
from genxai.dissection.statistics import DEFAULT_BINS, ConceptHistogram, RunningRange, upsample
from genxai.evaluation.fid import FID


class _Source:
    """The generator's seeded samples: sample i always has the same latents (SeededLatents)."""

    def __init__(self, generator: Any, latents_fn: LatentsFn | None, value_range: Any, seed: int) -> None:
        fn, self.value_range = source_options(generator, latents_fn, value_range)
        self.generator = generator
        self.device = _device(generator)
        self.latents = SeededLatents(fn, seed, self.device)

    def run(self, start: int, stop: int, layer: str | None = None, *, until: bool = False):
        """Images in [0, 1] (None with ``until``: the forward stops at ``layer``) and the layer's output."""
        z = self.latents.rows(start, stop)
        with torch.no_grad(), evaluation_mode(self.generator):
            if layer is None:
                return to_unit_range(self.generator(z), self.value_range, stop - start), None
            with Trace(self.generator, layer, stop=until, detach=True) as trace:
                out = self.generator(z)
        acts = trace.require_output()
        if acts.ndim != 4 or acts.shape[0] != stop - start:
            raise ValueError(f"layer: {layer!r} must output unit maps (N, U, h, w), got {tuple(acts.shape)}")
        return (None if until else to_unit_range(out, self.value_range, stop - start)), acts.float()

    def chunks(self, start: int, stop: int, size: int) -> list[tuple[int, int]]:
        return [(a, min(a + size, stop)) for a in range(start, stop, size)]


def _device(module: nn.Module) -> torch.device:
    return next(iter(module.parameters()), torch.zeros(0)).device


@dataclass
class ScoreSettings:
    """How :func:`defective_scores` and :func:`correct_artifacts` score units (fields: also keywords)."""

    num_samples: int = 1000  # seeded samples scored; memory is bounded by batch_size
    batch_size: int = 32
    seed: int = 0
    cam_layer: str | None = None  # the classifier's Grad-CAM layer (None: its default_layer)
    mask_quantile: float = 0.9  # artifact mask: each Grad-CAM map above its own quantile
    unit_quantile: float = 0.99  # unit mask: the upsampled map above the unit's quantile
    flagged_only: bool = True  # average over the samples flagged (artifact probability >= 0.5)
    bins: int = DEFAULT_BINS  # histogram bins per unit (quantile resolution: range / bins)
    max_elements: int = 1 << 24  # bound on one temporary tensor

    def __post_init__(self) -> None:
        for name in ("num_samples", "batch_size", "max_elements"):
            check_positive_int(getattr(self, name), name)
        check_positive_int(self.seed, "seed", minimum=0)
        check_positive_int(self.bins, "bins", minimum=2)
        check_in_range(self.mask_quantile, "mask_quantile", 0.0, 1.0, closed=False)
        check_in_range(self.unit_quantile, "unit_quantile", 0.0, 1.0, closed=False)
        if not isinstance(self.flagged_only, bool):
            raise ValueError(f"flagged_only: expected True or False, got {self.flagged_only!r}")

    @classmethod
    def of(cls, settings: ScoreSettings | None, overrides: dict[str, Any]) -> ScoreSettings:
        """``settings`` (default: the defaults) with keyword ``overrides``, checked."""
        if settings is not None and not isinstance(settings, cls):
            raise ValueError(f"settings: expected a ScoreSettings or None, got {type(settings).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = [key for key in overrides if key not in names]
        if unknown:
            raise ValueError(f"{unknown[0]}: not an argument here; settings: {', '.join(names)}")
        return replace(settings if settings is not None else cls(), **overrides)


@dataclass
class DefectScores:
    """Per unit of ``layer`` (U,): ``scores`` the mean IoU of its mask with the artifact mask over
    the ``samples`` used (the flagged ones with ``flagged_only``), ``thresholds`` its activation
    quantile; ``artifact_score`` the mean artifact probability over all ``num_samples``."""

    layer: str
    scores: torch.Tensor
    thresholds: torch.Tensor
    samples: int
    num_samples: int
    artifact_score: float

    def ranking(self) -> torch.Tensor:
        """Units, most defective first (ties by unit index)."""
        return torch.argsort(self.scores, descending=True, stable=True)


def _check_classifier(classifier: Any, cam_layer: Any, images: torch.Tensor) -> Any:
    if not isinstance(classifier, nn.Module):
        raise ValueError(f"classifier: expected a torch.nn.Module, got {type(classifier).__name__}")
    artifact_probability(classifier, images.to(_device(classifier)))
    return build("gradcam", classifier, layer=cam_layer)


def _thresholds(source: _Source, layer: str, opt: ScoreSettings, size: tuple[int, int]) -> torch.Tensor:
    """Each unit's ``unit_quantile`` of its upsampled map: pass 1 the ranges, pass 2 histograms."""
    ranges = None
    for a, b in source.chunks(0, opt.num_samples, opt.batch_size):
        acts = source.run(a, b, layer, until=True)[1]
        ranges = ranges if ranges is not None else RunningRange(acts.shape[1], acts.device)
        ranges.update(acts)
    hist = ConceptHistogram(ranges.minimum, ranges.maximum, 1, bins=opt.bins, max_elements=opt.max_elements)
    for a, b in source.chunks(0, opt.num_samples, opt.batch_size):
        acts = source.run(a, b, layer, until=True)[1]  # one empty concept: only the unit counts matter
        hist.update(acts, torch.zeros(b - a, 1, *size, dtype=torch.bool, device=acts.device))
    return hist.quantiles([opt.unit_quantile])[:, 0]


def _scores(source: _Source, layer: str, classifier: nn.Module, cam: Any, opt: ScoreSettings) -> DefectScores:
    size = tuple(source.run(0, 1)[0].shape[-2:])
    thresholds = _thresholds(source, layer, opt, size)
    units = thresholds.numel()
    total = torch.zeros(units, dtype=torch.float64, device=source.device)
    used, probability = 0, 0.0
    for a, b in source.chunks(0, opt.num_samples, opt.batch_size):  # pass 3: the IoUs
        images, acts = source.run(a, b, layer)
        x = images.to(_device(classifier))
        p = artifact_probability(classifier, x)
        probability += float(p.sum())
        keep = (p >= 0.5) if opt.flagged_only else torch.ones_like(p, dtype=torch.bool)
        if not bool(keep.any()):
            continue
        x, acts = x[keep], acts[keep.to(acts.device)]
        mask = threshold_maps(cam(x, target=DiscriminatorScore()), opt.mask_quantile).to(acts.device)
        used += x.shape[0]
        step = max(1, opt.max_elements // (x.shape[0] * size[0] * size[1]))
        for u in range(0, units, step):
            unit_mask = upsample(acts[:, u : u + step], size) > thresholds[u : u + step, None, None]
            inter = (unit_mask & mask).sum((2, 3)).double()
            union = (unit_mask | mask).sum((2, 3)).double()
            total[u : u + step] += torch.where(union > 0, inter / union.clamp_min(1), 0.0).sum(0)
    scores, n = (total / max(used, 1)).float().cpu(), opt.num_samples
    return DefectScores(layer, scores, thresholds.cpu(), used, n, probability / n)


def defective_scores(
    generator: nn.Module,
    layer: str | nn.Module,
    classifier: nn.Module,
    settings: ScoreSettings | None = None,
    *,
    latents_fn: LatentsFn | None = None,
    value_range: Range | None = None,
    **overrides: Any,
) -> DefectScores:
    """Every unit's defective score on ``layer`` (see the module's description), over
    ``num_samples`` seeded samples (:class:`ScoreSettings`, or its fields as keywords).
    ``latents_fn`` (default ``generator.latents``) and ``value_range`` (default
    ``generator.value_range`` or (-1, 1)) as for :func:`~genxai.dissection.dissect.dissect`."""
    opt = ScoreSettings.of(settings, overrides)
    source = _Source(generator, latents_fn, value_range, opt.seed)
    name, _ = resolve_layer(generator, layer)
    cam = _check_classifier(classifier, opt.cam_layer, source.run(0, 1, name)[0])
    result = _scores(source, name, classifier, cam, opt)
    if result.samples == 0:
        raise ValueError(
            f"classifier: none of the {opt.num_samples} samples was flagged as an artifact "
            "(probability >= 0.5); use more samples or flagged_only=False"
        )
    return result


# --- correction ---------------------------------------------------------------------------------


@dataclass
class CorrectionStep:
    """One layer of the correction: the units ablated (none when no sample was flagged any more),
    the scores they were chosen by, and the mean artifact probability before and after."""

    layer: str
    units: list[int]
    scores: DefectScores
    artifact_before: float
    artifact_after: float


@dataclass
class Correction(AbstractContextManager):
    """The ablations :func:`correct_artifacts` chose, on the generator until :meth:`close` (or the
    end of a ``with`` block); :meth:`ablations` applies them again later."""

    generator: nn.Module
    steps: list[CorrectionStep] = field(default_factory=list)
    artifact_before: float = float("nan")
    active: bool = True
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)

    @property
    def units(self) -> dict[str, list[int]]:
        """The ablated units per layer, in correction order."""
        return {step.layer: list(step.units) for step in self.steps if step.units}

    @property
    def artifact_after(self) -> float:
        return self.steps[-1].artifact_after if self.steps else self.artifact_before

    def ablations(self, generator: nn.Module | None = None) -> ExitStack:
        """The same ablations on ``generator`` (default: the corrected one), as one context manager."""
        return _ablations(generator if generator is not None else self.generator, self.units)

    def summary(self) -> dict[str, Any]:
        """JSON-able: the artifact score before and after, the units, each layer's unit scores."""
        before, after = self.artifact_before, self.artifact_after
        keep = ("layer", "units", "artifact_before", "artifact_after")
        steps = [{**{k: getattr(s, k) for k in keep}, "scores": s.scores.scores.tolist()} for s in self.steps]
        return {"artifact_before": before, "artifact_after": after, "units": self.units, "steps": steps}

    def close(self) -> None:
        self._stack.close()
        self.active = False

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _ablations(generator: nn.Module, units: Mapping[str, Units]) -> ExitStack:
    stack = ExitStack()
    try:
        for layer, chosen in units.items():
            stack.enter_context(ablate(generator, layer, chosen))
    except BaseException:
        stack.close()
        raise
    return stack


def _mean_probability(source: _Source, classifier: nn.Module, start: int, stop: int, bs: int) -> float:
    total = 0.0
    for a, b in source.chunks(start, stop, bs):
        total += float(artifact_probability(classifier, source.run(a, b)[0].to(_device(classifier))).sum())
    return total / (stop - start)


def _layer_list(generator: nn.Module, layers: Any, units_per_layer: Any) -> tuple[list[str], list[int]]:
    names = [layers] if isinstance(layers, (str, nn.Module)) else layers
    if not isinstance(names, Sequence) or not names:
        raise ValueError(f"layers: expected a non-empty list of layer names, got {layers!r}")
    names = [resolve_layer(generator, layer)[0] for layer in names]
    if len(set(names)) != len(names):
        raise ValueError(f"layers: each layer once, got {names}")
    counts = [units_per_layer] * len(names) if isinstance(units_per_layer, int) else units_per_layer
    if not isinstance(counts, Sequence) or len(counts) != len(names):
        raise ValueError(
            f"units_per_layer: expected an integer >= 1 or one per layer ({len(names)}), got {units_per_layer!r}"
        )
    return names, [check_positive_int(count, "units_per_layer") for count in counts]


def correct_artifacts(
    generator: nn.Module,
    layers: str | Sequence[str],
    classifier: nn.Module,
    *,
    units_per_layer: int | Sequence[int],
    settings: ScoreSettings | None = None,
    eval_samples: int | None = None,
    latents_fn: LatentsFn | None = None,
    value_range: Range | None = None,
    **overrides: Any,
) -> Correction:
    """Sequential correction: for each of ``layers`` in order, score its units on the generator as
    corrected so far (:func:`defective_scores`, same settings) and ablate the ``units_per_layer``
    worst (one number, or one per layer); a layer where no sample is flagged any more is left as
    it is. The mean artifact probability is measured before and after each layer on
    ``eval_samples`` (default ``num_samples``) held-out samples (indices after the scored ones).
    The ablations stay until the returned :class:`Correction` is closed; after an error none stays.
    """
    opt = ScoreSettings.of(settings, overrides)
    names, counts = _layer_list(generator, layers, units_per_layer)
    eval_samples = opt.num_samples if eval_samples is None else eval_samples
    check_positive_int(eval_samples, "eval_samples")
    source = _Source(generator, latents_fn, value_range, opt.seed)
    for name, count in zip(names, counts):
        images, acts = source.run(0, 1, name)
        if count > acts.shape[1]:
            raise ValueError(f"units_per_layer: {count} is more than the {acts.shape[1]} units of {name!r}")
    cam = _check_classifier(classifier, opt.cam_layer, images)
    correction = Correction(generator)
    held_out = (opt.num_samples, opt.num_samples + eval_samples, opt.batch_size)
    try:
        correction.artifact_before = before = _mean_probability(source, classifier, *held_out)
        for name, count in zip(names, counts):
            scores = _scores(source, name, classifier, cam, opt)
            units = scores.ranking()[:count].tolist() if scores.samples else []
            if units:
                correction._stack.enter_context(ablate(generator, name, units))
            after = _mean_probability(source, classifier, *held_out) if units else before
            correction.steps.append(CorrectionStep(name, units, scores, before, after))
            before = after
    except BaseException:
        correction.close()
        raise
    return correction


def fid_before_after(
    generator: nn.Module,
    correction: Correction | Mapping[str, Units],
    reference: FID,
    *,
    num_samples: int = 1000,
    batch_size: int = 64,
    seed: int = 0,
    latents_fn: LatentsFn | None = None,
    value_range: Range | None = None,
) -> dict[str, dict[str, float]]:
    """``{"before": ..., "after": ...}``: FID (and IS where the features have logits) of
    ``num_samples`` seeded samples without and with the ablations of ``correction`` (a closed
    :class:`Correction` or ``{layer: units}``) against the real statistics of ``reference``
    (:func:`~genxai.evaluation.fid.reference_statistics` with the chosen feature extractor), which
    keeps them and no generated ones."""
    if isinstance(correction, Correction) and correction.active:
        raise ValueError("correction: still on the generator; close it first (for the 'before' samples)")
    if not isinstance(correction, (Correction, Mapping)):
        raise ValueError(f"correction: expected a Correction or {{layer: units}}, got {type(correction)}")
    if not isinstance(reference, FID):
        raise ValueError(f"reference: expected an FID with real statistics, got {type(reference).__name__}")
    units = correction.units if isinstance(correction, Correction) else dict(correction)
    check_positive_int(num_samples, "num_samples", minimum=2)
    check_positive_int(batch_size, "batch_size")
    check_positive_int(seed, "seed", minimum=0)
    source = _Source(generator, latents_fn, value_range, seed)
    _ablations(generator, units).close()  # checks layers and units before the long work
    results = {}
    try:
        for phase in ("before", "after"):
            reference.reset_fake()
            with _ablations(generator, units) if phase == "after" else nullcontext():
                for a, b in source.chunks(0, num_samples, batch_size):
                    reference.update(source.run(a, b)[0], real=False)
            results[phase] = reference.compute()
    finally:
        reference.reset_fake()
    return results
