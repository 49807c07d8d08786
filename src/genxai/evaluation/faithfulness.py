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

Scores are softmax probabilities of the target class by default (``score="probability"``; a
single-logit model's score goes through a sigmoid), as in both papers; ``score="logit"`` uses the
target's raw score. Every metric streams: ``update(...)`` per batch, ``compute()`` at the end,
``reset()`` to start over; the one-call functions do all three. Perturbed inputs are scored
``batch_size`` rows per forward, so memory is bounded whatever the number of steps. Put the model
in eval mode first (batch statistics would mix the images of a chunk).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from genxai.core.checks import check_choice, check_images, check_maps, check_positive_int
from genxai.core.engine import batched_scores, model_output
from genxai.core.targets import (
    ClassLogit,
    ClassProbability,
    DiscriminatorScore,
    Select,
    Target,
    as_target,
    evaluate,
)

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


class StreamingMetric:
    """Per-image values gathered batch by batch: ``update`` (in subclasses), ``compute``, ``reset``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self._values: list[torch.Tensor] = []

    def _check_updated(self) -> None:
        if not self._values:
            raise RuntimeError(f"{type(self).__name__}: compute() called before any update()")

    def compute(self) -> MetricResult:
        """The per-image values of all batches and their mean."""
        self._check_updated()
        per_image = torch.cat(self._values)
        return MetricResult(per_image, float(per_image.mean()))


def minmax(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale each image's map to [0, 1] (over all its channels); a flat map becomes zeros."""
    flat = maps.flatten(1)
    shape = (-1,) + (1,) * (maps.ndim - 1)
    low, high = flat.amin(dim=1).view(shape), flat.amax(dim=1).view(shape)
    span = high - low
    return torch.where(span > eps, (maps - low) / span.clamp_min(eps), torch.zeros_like(maps))


class Sigmoid(Target):
    """The sigmoid of another target's score: a single-logit model's probability."""

    def __init__(self, inner: Target) -> None:
        self.inner = inner
        self.layer = inner.layer

    def __call__(self, output: Any) -> torch.Tensor:
        return torch.sigmoid(self.inner(output).float())

    def take(self, index: torch.Tensor) -> Target:
        return Sigmoid(self.inner.take(index))

    def __repr__(self) -> str:
        return f"Sigmoid({self.inner!r})"


def probability_target(target: Target) -> Target:
    """The probability version of a bound class or discriminator target."""
    if isinstance(target, (ClassProbability, Sigmoid)):
        return target
    if isinstance(target, ClassLogit):
        return ClassProbability(target.index)
    if isinstance(target, DiscriminatorScore):
        return Sigmoid(target)
    if isinstance(target, Select):
        return Select(target.key, probability_target(target.target))
    raise ValueError(
        f"score: 'probability' needs a class index or a discriminator target, got {target!r}; "
        "pass score='logit' to use this target's score as it is"
    )


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
    scaled = torch.stack([minmax(m) for m in maps])

    def make_batch(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(start, stop, device=x.device)
        image = rows % n
        return x[image] * scaled[rows // n, image], image

    scores = batched_scores(model, make_batch, len(maps) * n, target, batch_size=batch_size)
    return scores.view(len(maps), n)


class ScoreMetric(StreamingMetric):
    """Base of the metrics that score perturbed images with a model.

    Args:
        model: the classifier (or discriminator) in eval mode.
        target: default target of ``update`` (None: the predicted class / the single logit).
        score: "probability" (softmax, or sigmoid for one logit) or "logit".
        batch_size: perturbed images per forward pass.
    """

    def __init__(
        self, model: nn.Module, *, target: Any = None, score: str = "probability", batch_size: int = 64
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.target = target
        self.score = check_choice(score, "score", SCORES)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        super().__init__()

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
        self._values.append(self.per_image(clean, masked))

    @abstractmethod
    def per_image(self, clean: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """The metric's value per image from ``Y`` (clean) and ``O`` (masked) scores."""


class AverageDrop(MaskedConfidence):
    """Average Drop %: ``100 * max(0, Y - O) / Y`` averaged over images (lower is better)."""

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

    def per_image(self, clean: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        return 100.0 * (clean < masked).float()


class WinPercent(ScoreMetric):
    """Win% of method A over method B: whose masked image keeps more score (ties count half)."""

    def update(self, x: torch.Tensor, maps_a: torch.Tensor, maps_b: torch.Tensor, target: Any = None) -> None:
        """Add a batch: images and the two methods' maps for them."""
        x = check_images(x, "x")
        maps_a = check_maps(maps_a, x, "maps_a")
        maps_b = check_maps(maps_b, x, "maps_b")
        if maps_a.shape[1] != maps_b.shape[1]:
            maps_a, maps_b = maps_a.expand(x.shape), maps_b.expand(x.shape)
        bound, _ = self.bind(x, target)
        kept_a, kept_b = masked_scores(self.model, x, [maps_a, maps_b], bound, self.batch_size)
        self._values.append(100.0 * (kept_a > kept_b).float() + 50.0 * (kept_a == kept_b).float())

    def compute(self) -> WinResult:
        result = super().compute()
        return WinResult(result.per_image, result.mean)


def blur(x: torch.Tensor, kernel_size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """RISE's insertion start: a Gaussian blur (11 x 11, sigma 5; smaller kernels on tiny images)."""
    limit = min(x.shape[-2:])
    kernel_size = min(kernel_size, limit if limit % 2 else limit - 1)
    return gaussian_blur(x, [kernel_size, kernel_size], [sigma, sigma]) if kernel_size > 1 else x.clone()


def _baseline(baseline: float | str | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(baseline, str):
        check_choice(baseline, "baseline", ("blur", "mean"))
        return blur(x) if baseline == "blur" else x.mean(dim=(2, 3), keepdim=True).expand_as(x)
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
        model: the classifier (or discriminator) in eval mode.
        steps: number of increments; the curve has ``steps + 1`` points, pixel fractions k/steps.
        baseline: value of removed pixels (deletion) or the starting image (insertion): a number,
            a tensor broadcastable to x, "blur" (RISE's blurred image) or "mean" (per-channel mean).
        target, score, batch_size: as in :class:`ScoreMetric`.
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
    ) -> None:
        self.steps = check_positive_int(steps, "steps")
        self.baseline = self.default_baseline if baseline is None else baseline
        super().__init__(model, target=target, score=score, batch_size=batch_size)

    def reset(self) -> None:
        super().reset()
        self._curves: list[torch.Tensor] = []

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
        self._curves.append(curves)
        self._values.append(torch.trapezoid(curves, counts.float() / pixels, dim=1))

    def compute(self) -> CurveResult:
        result = super().compute()
        fractions = torch.linspace(0, 1, self.steps + 1, device=result.per_image.device)
        return CurveResult(result.per_image, result.mean, torch.cat(self._curves), fractions)


class Deletion(PixelCurve):
    """Deletion AUC (RISE): most salient pixels set to the baseline (default 0) first; lower is better."""

    insert = False
    default_baseline = 0.0


class Insertion(PixelCurve):
    """Insertion AUC (RISE): from a blurred image, most salient pixels restored first; higher is better."""

    insert = True
    default_baseline = "blur"


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
    metric = AverageDrop(model, target=target, score=score, batch_size=batch_size)
    metric.update(x, maps)
    return metric.compute()


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
    metric = IncreaseInConfidence(model, target=target, score=score, batch_size=batch_size)
    metric.update(x, maps)
    return metric.compute()


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
    metric = WinPercent(model, target=target, score=score, batch_size=batch_size)
    metric.update(x, maps_a, maps_b)
    return metric.compute()


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
    metric = Deletion(
        model, steps=steps, baseline=baseline, target=target, score=score, batch_size=batch_size
    )
    metric.update(x, maps)
    return metric.compute()


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
    metric = Insertion(
        model, steps=steps, baseline=baseline, target=target, score=score, batch_size=batch_size
    )
    metric.update(x, maps)
    return metric.compute()


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
    "blur",
    "deletion",
    "increase_in_confidence",
    "insertion",
    "minmax",
    "win_percent",
]
