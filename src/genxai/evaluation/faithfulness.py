"""Faithfulness metrics: does the model still recognise what a saliency map keeps?

* Grad-CAM++ (Chattopadhyay et al., 2018): with ``Y`` the score of the clean image and ``O`` the
  score of ``x * map`` (map min-max scaled to [0, 1] per image, broadcast over colour channels),
  Average Drop ``= 100/N sum max(0, Y - O) / Y`` (lower is better), Increase in Confidence
  ``= 100/N sum 1[Y < O]`` (higher is better), and Win% (which of two methods' masked images keeps
  more score, ties counted half).
* RISE (Petsiuk et al., 2018): deletion and insertion curves. Pixels are removed from (deletion)
  or inserted into (insertion) the image most salient first, in ``steps`` increments; the area under
  the score curve over the fraction of pixels, by the trapezoid rule, is the metric (deletion:
  lower is better; insertion: higher is better).

Scores are probabilities of the target class by default (``score="probability"``, as in both
papers): the softmax over the classes, or the sigmoid of the logit for a single-logit model such as
a discriminator (:func:`genxai.core.targets.probability_target` decides); ``score="logit"`` uses the
target's raw score.

Every metric is a :class:`torchmetrics.Metric`: ``update(...)`` per batch, ``compute()`` at the
end, ``reset()`` to start over, ``metric(...)`` for one batch's value while accumulating. The
per-image values are a list state reduced by concatenation, so under ``torch.distributed``
``compute()`` returns the images of every process, rank after rank, by torchmetrics' own sync. The
one-call functions (``average_drop(model, x, maps)``) do all three on one process, never syncing.
Perturbed inputs are scored ``batch_size`` rows per forward, so memory is bounded whatever the
number of steps. The model is scored in eval mode (batch statistics would mix the images of a
chunk); every module's own mode is restored after each update, so a metric never changes the model.
"""

from __future__ import annotations

import functools
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from genxai.core.checks import check_choice, check_images, check_maps, check_positive_int
from genxai.core.engine import batched_scores, model_output
from genxai.core.maps import gaussian_blur, minmax_normalize
from genxai.core.modes import evaluation_mode
from genxai.core.targets import Target, as_target, evaluate, probability_target

SCORES = ("probability", "logit")


@dataclass
class MetricResult:
    """Per-image values (N,) and their mean."""

    per_image: torch.Tensor
    mean: float


@dataclass
class CurveResult(MetricResult):
    """Deletion/insertion: per-image AUC, its mean, the score curves (N, steps + 1) and their x axis."""

    curves: torch.Tensor
    fractions: torch.Tensor


@dataclass
class WinResult(MetricResult):
    """Win%: ``per_image`` is method A's credit (100 win, 50 tie, 0 loss); ``mean`` is A's Win%."""

    @property
    def percent_a(self) -> float:
        return self.mean

    @property
    def percent_b(self) -> float:
        return 100.0 - self.mean


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class StreamingMetric(Metric):
    """Per-image values gathered batch by batch, as a torchmetrics ``Metric``.

    Subclasses implement ``update`` and add each image's value with :meth:`_append`. The values are
    the list state ``values`` with ``dist_reduce_fx="cat"``; ``compute()`` returns them all with
    their mean (a :class:`MetricResult`), ``reset()`` forgets them. ``kwargs`` go to
    :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``, ``compute_on_cpu``, ...).
    """

    full_state_update: ClassVar[bool] = False
    is_differentiable: ClassVar[bool] = False
    higher_is_better: ClassVar[bool | None] = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def _wrap_compute(self, compute: Callable[..., Any]) -> Callable[..., Any]:
        """torchmetrics' compute (sync, cache) with a clear error before any update and (N,) results.

        torchmetrics squeezes one-element tensors of a result; one image's ``per_image`` stays (1,).
        """
        wrapped = super()._wrap_compute(compute)

        @functools.wraps(compute)
        def checked(*args: Any, **kwargs: Any) -> Any:
            if not self.update_called and not (self.sync_on_compute and _distributed()):
                raise RuntimeError(f"{type(self).__name__}: compute() called before any update()")
            result = wrapped(*args, **kwargs)
            if isinstance(result, MetricResult) and result.per_image.ndim == 0:
                result.per_image = result.per_image.reshape(1)
            return result

        return checked

    def _append(self, values: torch.Tensor) -> None:
        """Add one batch's per-image values (N,)."""
        self.values.append(values.detach().float().reshape(-1))

    def _gathered(self, name: str = "values") -> torch.Tensor:
        """A list state concatenated (every process's, after a sync); RuntimeError when empty."""
        state = getattr(self, name)
        values = dim_zero_cat(state) if not isinstance(state, list) or state else None
        if values is None or values.numel() == 0:
            raise RuntimeError(f"{type(self).__name__}: compute() called before any update()")
        return values

    def compute(self) -> MetricResult:
        """The per-image values of all batches (of all processes) and their mean."""
        per_image = self._gathered()
        return MetricResult(per_image, float(per_image.mean()))


def bind_scores(model: nn.Module, x: torch.Tensor, target: Any, score: str) -> tuple[Target, torch.Tensor]:
    """The target fixed on the clean images (e.g. their predicted class) and their scores ``Y``."""
    check_choice(score, "score", SCORES)
    output = model_output(model, x)
    bound = as_target(target).bind(output)
    if score == "probability":
        bound = probability_target(bound)
    return bound, evaluate(bound, output, x.shape[0]).float()


def masked_scores(
    model: nn.Module,
    x: torch.Tensor,
    maps: Sequence[torch.Tensor],
    target: Target,
    batch_size: int,
) -> torch.Tensor:
    """Scores ``O`` of ``x * minmax(map)`` for each map set, (len(maps), N), in one chunked pass."""
    n = x.shape[0]
    scaled = torch.stack([minmax_normalize(m) for m in maps])

    def make_batch(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(start, stop, device=x.device)
        image = rows % n
        return x[image] * scaled[rows // n, image], image

    scores = batched_scores(model, make_batch, len(maps) * n, target, batch_size=batch_size)
    return scores.view(len(maps), n)


class ScoreMetric(StreamingMetric):
    """Base of the metrics that score perturbed images with a model.

    Args:
        model: the classifier (or discriminator), run in eval mode during ``update`` (its modes
            restored afterwards). The metric refers to it without owning it: ``metric.to(...)``, ``metric.train()`` and ``state_dict()`` leave it alone.
        target: default target of ``update`` (None: the predicted class / the single logit).
        score: "probability" (softmax, or sigmoid for one logit) or "logit".
        batch_size: perturbed images per forward pass.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        target: Any = None,
        score: str = "probability",
        batch_size: int = 64,
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        score = check_choice(score, "score", SCORES)
        batch_size = check_positive_int(batch_size, "batch_size")
        super().__init__(**kwargs)
        self.__dict__["model"] = model  # not a submodule: the user's model is not the metric's state
        self.target = target
        self.score = score
        self.batch_size = batch_size

    def _wrap_update(self, update: Callable[..., Any]) -> Callable[..., Any]:
        """torchmetrics' update, run with the model in eval mode (every module's mode restored)."""
        wrapped = super()._wrap_update(update)

        @functools.wraps(update)
        def in_eval_mode(*args: Any, **kwargs: Any) -> None:
            with evaluation_mode(self.model):
                wrapped(*args, **kwargs)

        return in_eval_mode

    def bind(self, x: torch.Tensor, target: Any) -> tuple[Target, torch.Tensor]:
        """This batch's target (``update``'s, else the default) bound on ``x``, and the clean scores."""
        return bind_scores(self.model, x, self.target if target is None else target, self.score)


class MaskedConfidence(ScoreMetric):
    """Base of the metrics that compare ``Y`` (clean) with ``O`` (map-masked) per image."""

    def update(self, x: torch.Tensor, maps: torch.Tensor, target: Any = None) -> None:
        """Add a batch: images (N, C, H, W) and their maps (N, 1 or C, H, W)."""
        x = check_images(x, "x")
        maps = check_maps(maps, x, "maps")
        bound, clean = self.bind(x, target)
        masked = masked_scores(self.model, x, [maps], bound, self.batch_size)[0]
        self._append(self.per_image(clean, masked))

    @abstractmethod
    def per_image(self, clean: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """The metric's value per image from ``Y`` (clean) and ``O`` (masked) scores."""


class AverageDrop(MaskedConfidence):
    """Average Drop %: ``100 * max(0, Y - O) / Y`` averaged over images (lower is better)."""

    higher_is_better = False

    def per_image(self, clean: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        bad = (clean <= 0).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"score: the clean score of images {bad} is <= 0, so a drop relative to it is undefined; "
                "use score='probability'"
            )
        return 100.0 * (clean - masked).clamp_min(0) / clean


class IncreaseInConfidence(MaskedConfidence):
    """Increase in Confidence %: share of images whose masked score exceeds the clean one."""

    higher_is_better = True

    def per_image(self, clean: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        return 100.0 * (clean < masked).float()


class WinPercent(ScoreMetric):
    """Win% of method A over method B: whose masked image keeps more score (ties count half)."""

    higher_is_better = True

    def update(self, x: torch.Tensor, maps_a: torch.Tensor, maps_b: torch.Tensor, target: Any = None) -> None:
        """Add a batch: images and the two methods' maps for them."""
        x = check_images(x, "x")
        maps_a = check_maps(maps_a, x, "maps_a")
        maps_b = check_maps(maps_b, x, "maps_b")
        if maps_a.shape[1] != maps_b.shape[1]:
            maps_a, maps_b = maps_a.expand(x.shape), maps_b.expand(x.shape)
        bound, _ = self.bind(x, target)
        kept_a, kept_b = masked_scores(self.model, x, [maps_a, maps_b], bound, self.batch_size)
        self._append(100.0 * (kept_a > kept_b).float() + 50.0 * (kept_a == kept_b).float())

    def compute(self) -> WinResult:
        result = super().compute()
        return WinResult(result.per_image, result.mean)


def _rise_blur(x: torch.Tensor) -> torch.Tensor:
    """RISE's insertion start: an 11 x 11 Gaussian blur (radius 5), sigma 5, reflect padding.

    Images under 11 px get the largest odd kernel that fits (radius ``(side - 1) // 2``); under
    3 px there is none and the image is returned as a copy.
    """
    radius = min(5, (min(x.shape[-2:]) - 1) // 2)
    return gaussian_blur(x, 5.0, radius=radius, padding="reflect") if radius >= 1 else x.clone()


def _baseline(baseline: float | str | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(baseline, str):
        check_choice(baseline, "baseline", ("blur", "mean"))
        return _rise_blur(x) if baseline == "blur" else x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline))
    if not isinstance(baseline, torch.Tensor):
        raise TypeError(
            f"baseline: expected a number, 'blur', 'mean' or a tensor, got {type(baseline).__name__}"
        )
    try:
        return torch.broadcast_to(baseline.to(x.device, x.dtype), x.shape)
    except RuntimeError as err:
        raise ValueError(
            f"baseline: shape {tuple(baseline.shape)} does not broadcast to x {tuple(x.shape)}"
        ) from err


def pixel_ranks(maps: torch.Tensor) -> torch.Tensor:
    """(N, H*W) rank of each pixel, 0 = most salient (channels averaged; ties: row-major order)."""
    saliency = maps.mean(dim=1).flatten(1)
    order = torch.sort(saliency, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


class PixelCurve(ScoreMetric):
    """Base of deletion and insertion: the score curve as pixels change most salient first.

    Args:
        model: the classifier (or discriminator), run in eval mode during ``update``.
        steps: number of increments; the curve has ``steps + 1`` points, pixel fractions k/steps.
        baseline: value of removed pixels (deletion) or the starting image (insertion): a number,
            a tensor broadcastable to x, "blur" (RISE's blurred image) or "mean" (per-channel mean).
        target, score, batch_size, kwargs: as in :class:`ScoreMetric`.

    The curves are a second list state (flattened, concatenated across processes like the AUCs).
    """

    insert: ClassVar[bool]
    default_baseline: ClassVar[float | str]

    def __init__(
        self,
        model: nn.Module,
        *,
        steps: int = 100,
        baseline: float | str | torch.Tensor | None = None,
        target: Any = None,
        score: str = "probability",
        batch_size: int = 64,
        **kwargs: Any,
    ) -> None:
        steps = check_positive_int(steps, "steps")
        super().__init__(model, target=target, score=score, batch_size=batch_size, **kwargs)
        self.steps = steps
        self.baseline = self.default_baseline if baseline is None else baseline
        self.add_state("curves", default=[], dist_reduce_fx="cat")

    def update(self, x: torch.Tensor, maps: torch.Tensor, target: Any = None) -> None:
        """Add a batch: images (N, C, H, W) and their maps (N, 1 or C, H, W)."""
        x = check_images(x, "x")
        maps = check_maps(maps, x, "maps")
        bound, _ = self.bind(x, target)
        n, points = x.shape[0], self.steps + 1
        pixels = x.shape[-2] * x.shape[-1]
        counts = torch.round(torch.linspace(0, pixels, points, device=x.device)).long()
        ranks = pixel_ranks(maps)
        base = _baseline(self.baseline, x)
        start, end = (base, x) if self.insert else (x, base)

        def make_batch(first: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
            rows = torch.arange(first, stop, device=x.device)
            image, step = rows // points, rows % points
            changed = (ranks[image] < counts[step][:, None]).view(-1, 1, *x.shape[-2:])
            return torch.where(changed, end[image], start[image]), image

        curves = batched_scores(self.model, make_batch, n * points, bound, batch_size=self.batch_size)
        curves = curves.view(n, points)
        # flattened, so a process without images contributes the empty (0,) tensor torchmetrics makes
        self.curves.append(curves.reshape(-1))
        self._append(torch.trapezoid(curves, counts.float() / pixels, dim=1))

    def compute(self) -> CurveResult:
        result = super().compute()
        curves = self._gathered("curves").view(-1, self.steps + 1)
        fractions = torch.linspace(0, 1, self.steps + 1, device=curves.device)
        return CurveResult(result.per_image, result.mean, curves, fractions)


class Deletion(PixelCurve):
    """Deletion AUC (RISE): most salient pixels set to the baseline (default 0) first; lower is better."""

    insert = False
    default_baseline = 0.0
    higher_is_better = False


class Insertion(PixelCurve):
    """Insertion AUC (RISE): from a blurred image, most salient pixels restored first; higher is better."""

    insert = True
    default_baseline = "blur"
    higher_is_better = True


def _once(cls: type[ScoreMetric], model: nn.Module, *inputs: torch.Tensor, **options: Any) -> MetricResult:
    """``cls`` over one batch: built without cross-process sync (safe inside a distributed run),
    updated once, computed."""
    metric = cls(model, sync_on_compute=False, **options)
    metric.update(*inputs)
    return metric.compute()


def average_drop(
    model: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    target: Any = None,
    *,
    score: str = "probability",
    batch_size: int = 64,
) -> MetricResult:
    """Average Drop % of ``maps`` for ``x`` (Grad-CAM++); see :class:`AverageDrop`."""
    return _once(AverageDrop, model, x, maps, target=target, score=score, batch_size=batch_size)


def increase_in_confidence(
    model: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    target: Any = None,
    *,
    score: str = "probability",
    batch_size: int = 64,
) -> MetricResult:
    """Increase in Confidence % of ``maps`` for ``x`` (Grad-CAM++); see :class:`IncreaseInConfidence`."""
    return _once(IncreaseInConfidence, model, x, maps, target=target, score=score, batch_size=batch_size)


def win_percent(
    model: nn.Module,
    x: torch.Tensor,
    maps_a: torch.Tensor,
    maps_b: torch.Tensor,
    target: Any = None,
    *,
    score: str = "probability",
    batch_size: int = 64,
) -> WinResult:
    """Win% of method A (``maps_a``) against method B (``maps_b``); see :class:`WinPercent`."""
    return _once(WinPercent, model, x, maps_a, maps_b, target=target, score=score, batch_size=batch_size)


def deletion(
    model: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    target: Any = None,
    *,
    steps: int = 100,
    baseline: float | str | torch.Tensor = 0.0,
    score: str = "probability",
    batch_size: int = 64,
) -> CurveResult:
    """Deletion AUC and curves (RISE); see :class:`Deletion`."""
    options = {"steps": steps, "baseline": baseline, "score": score, "batch_size": batch_size}
    return _once(Deletion, model, x, maps, target=target, **options)


def insertion(
    model: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    target: Any = None,
    *,
    steps: int = 100,
    baseline: float | str | torch.Tensor = "blur",
    score: str = "probability",
    batch_size: int = 64,
) -> CurveResult:
    """Insertion AUC and curves (RISE); see :class:`Insertion`."""
    options = {"steps": steps, "baseline": baseline, "score": score, "batch_size": batch_size}
    return _once(Insertion, model, x, maps, target=target, **options)


__all__ = [
    "AverageDrop",
    "CurveResult",
    "Deletion",
    "IncreaseInConfidence",
    "Insertion",
    "MaskedConfidence",
    "MetricResult",
    "PixelCurve",
    "ScoreMetric",
    "StreamingMetric",
    "WinPercent",
    "WinResult",
    "average_drop",
    "deletion",
    "increase_in_confidence",
    "insertion",
    "win_percent",
]
