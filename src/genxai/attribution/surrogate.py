"""Surrogate methods: LIME and KernelSHAP on superpixels.

Both switch superpixels of an image on (keep) or off (baseline) in random coalitions z in {0, 1}^d,
score the perturbed images in batches, and fit a weighted linear model of the score on z; a
pixel's attribution is the coefficient of its superpixel. They differ only in how coalitions are
drawn and weighted and in the constraint of the fit:

* LIME (Ribeiro et al., 2016): uniform coalitions, an exponential kernel on the cosine distance
  to the full coalition, ridge regression with an intercept.
* KernelSHAP (Lundberg & Lee, 2017): coalition sizes drawn from the Shapley kernel, whose fit
  with ``sum(coef) = f(x) - f(baseline)`` gives Shapley values (exactly, with ``exact=True``).

Superpixels come from SLIC (the one CPU step, per image) or from a user segmentation. Images may
have different numbers of superpixels: columns are padded to the largest and masked out. All
images are fitted at once by :func:`weighted_least_squares`, one batched solve on the device.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from genxai.attribution.base import Attribution, register
from genxai.core.checks import baseline_like, check_images, check_in_range, check_positive_int
from genxai.core.engine import batched_scores
from genxai.core.maps import minmax_normalize
from genxai.core.targets import Target, as_target, bind_target


def weighted_least_squares(
    features: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    *,
    alpha: float = 0.0,
    mask: torch.Tensor | None = None,
    intercept: bool = True,
    total: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted ridge regression of every image at once, by batched normal equations.

    For each image n, minimises ``sum_s w_ns (y_ns - b_n - z_ns . c_n)^2 + alpha |c_n|^2`` over the
    coefficients c_n (and the unpenalised intercept b_n when ``intercept``), optionally subject to
    ``sum(c_n) = total_n`` (a Lagrange multiplier row).

    Args:
        features: z, (N, S, D).
        values: y, (N, S).
        weights: w >= 0, (N, S).
        mask: (N, D) bool, the columns each image really has; the others get coefficient 0.
        total: (N,), the value the coefficients of each image must sum to.

    Returns:
        coefficients (N, D) and intercepts (N,) (zeros without ``intercept``), float32.
        Singular systems (too few distinct samples) get the minimum-norm solution.
    """
    n, s, d = features.shape
    dtype = torch.float32 if features.device.type == "mps" else torch.float64
    mask = torch.ones(n, d, dtype=torch.bool, device=features.device) if mask is None else mask.bool()
    z = features.to(dtype) * mask[:, None, :]
    if intercept:
        z = torch.cat([z, torch.ones(n, s, 1, dtype=dtype, device=z.device)], dim=2)
    weighted = z * weights.to(dtype)[:, :, None]
    gram = weighted.transpose(1, 2) @ z
    rhs = weighted.transpose(1, 2) @ values.to(dtype)[:, :, None]
    penalty = torch.where(mask, torch.full_like(mask, alpha, dtype=dtype), torch.ones_like(mask, dtype=dtype))
    if intercept:
        penalty = torch.cat([penalty, torch.zeros(n, 1, dtype=dtype, device=z.device)], dim=1)
    gram = gram + torch.diag_embed(penalty)
    if total is not None:
        row = torch.cat([mask.to(dtype), torch.zeros(n, gram.shape[1] - d, dtype=dtype, device=z.device)], 1)
        gram = torch.cat(
            [
                torch.cat([gram, row[:, :, None]], dim=2),
                torch.cat([row, torch.zeros(n, 1, dtype=dtype, device=z.device)], dim=1)[:, None],
            ],
            dim=1,
        )
        rhs = torch.cat([rhs, total.to(dtype).view(n, 1, 1)], dim=1)
    solution, info = torch.linalg.solve_ex(gram, rhs)
    bad = (info != 0) | ~torch.isfinite(solution).flatten(1).all(dim=1)
    if bool(bad.any()):
        solution = torch.where(bad[:, None, None], torch.linalg.pinv(gram) @ rhs, solution)
    solution = solution[:, :, 0].float()
    coefficients = solution[:, :d] * mask
    bias = solution[:, d] if intercept else torch.zeros(n, device=solution.device)
    return coefficients, bias


def relabel(segmentation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels of each image renumbered 0..d_n-1 (in sorted order), and d_n: loop-free.

    Args:
        segmentation: (N, H, W) integer labels.

    Returns:
        (N, H, W) long labels and (N,) long counts of superpixels.
    """
    n = segmentation.shape[0]
    flat = segmentation.reshape(n, -1).long()
    flat = flat - flat.amin(dim=1, keepdim=True)
    span = int(flat.max()) + 1
    keyed = flat + span * torch.arange(n, device=flat.device)[:, None]
    unique, inverse = torch.unique(keyed, return_inverse=True)
    counts = torch.bincount(unique // span, minlength=n)
    first = torch.cumsum(counts, 0) - counts
    return (inverse - first[:, None]).view_as(segmentation), counts


def slic_segments(x: torch.Tensor, segments: int, compactness: float = 10.0) -> torch.Tensor:
    """SLIC superpixels (Achanta et al., 2012) of each image: (N, H, W) long labels on x's device.

    Runs ``skimage.segmentation.slic`` per image on the CPU (each image min-max scaled to [0, 1];
    RGB images are clustered in Lab space, others on their raw channels).
    """
    from skimage.segmentation import slic

    check_positive_int(segments, "segments")
    images = minmax_normalize(x.detach().float()).cpu().numpy()
    labels = []
    for image in images:
        if image.shape[0] == 1:
            labels.append(slic(image[0], n_segments=segments, compactness=compactness, channel_axis=None))
        else:
            labels.append(
                slic(
                    image,
                    n_segments=segments,
                    compactness=compactness,
                    channel_axis=0,
                    convert2lab=image.shape[0] == 3,
                )
            )
    return torch.from_numpy(np.stack(labels)).to(x.device).long()


def check_segmentation(segmentation: Any, x: torch.Tensor) -> torch.Tensor:
    """A user segmentation as (N, H, W) long on x's device: from (N, H, W), (N, 1, H, W) or (H, W)."""
    if not isinstance(segmentation, torch.Tensor):
        raise TypeError(f"segmentation: expected an integer torch.Tensor, got {type(segmentation).__name__}")
    if segmentation.is_floating_point() or segmentation.is_complex():
        raise TypeError(f"segmentation: expected integer labels, got dtype {segmentation.dtype}")
    n, _, height, width = x.shape
    seg = segmentation.to(x.device).long()
    if seg.ndim == 4 and seg.shape[1] == 1:
        seg = seg[:, 0]
    if seg.ndim == 2:
        seg = seg.expand(n, -1, -1)
    if seg.shape != (n, height, width):
        raise ValueError(
            f"segmentation: expected shape ({n}, {height}, {width}) matching x {tuple(x.shape)}, "
            f"got {tuple(segmentation.shape)}"
        )
    return seg


@dataclass
class SurrogateFit:
    """A fitted surrogate: per-superpixel coefficients and the data they were fitted on.

    Attributes:
        coefficients: (N, D) coefficient of each superpixel (0 in padded columns).
        intercept: (N,) the surrogate's value at the empty coalition.
        segmentation: (N, H, W) superpixel label of each pixel, 0..d_n-1.
        features: (N,) number of superpixels d_n of each image (D = the largest).
        samples: (N, S, D) the coalitions z (1 = superpixel kept).
        scores: (N, S) the model's score of each perturbed image.
        weights: (N, S) the weight of each sample in the fit.
    """

    coefficients: torch.Tensor
    intercept: torch.Tensor
    segmentation: torch.Tensor
    features: torch.Tensor
    samples: torch.Tensor
    scores: torch.Tensor
    weights: torch.Tensor

    def maps(self, channels: int = 1) -> torch.Tensor:
        """(N, channels, H, W): each pixel carries its superpixel's coefficient."""
        n, height, width = self.segmentation.shape
        pixels = self.coefficients.gather(1, self.segmentation.reshape(n, -1)).view(n, 1, height, width)
        return pixels.expand(n, channels, height, width).contiguous()


class Surrogate(Attribution):
    """Shared machinery of LIME and KernelSHAP; a subclass states how coalitions are drawn and fitted.

    Args:
        samples: coalitions per image (forward passes per image); use clearly more than the
            number of superpixels, or the fit is underdetermined (minimum-norm solution).
        segments: SLIC's ``n_segments`` when no ``segmentation`` is given at call time.
        compactness: SLIC's compactness.
        baseline: value of switched-off superpixels: a number, a tensor broadcastable to ``x``, or
            ``"mean"`` (each superpixel's mean colour).
        batch_size: perturbed images per forward.
        seed: seed of the coalitions (None: the global generator).

    Call: ``method(x, target, segmentation=None, baseline=None)``; :meth:`fit` returns the
    coefficients and the fitted data.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        samples: int = 256,
        segments: int = 50,
        compactness: float = 10.0,
        baseline: float | str | torch.Tensor = 0.0,
        batch_size: int = 64,
        seed: int | None = 0,
        **kwargs,
    ):
        super().__init__(model, **kwargs)
        self.samples = check_positive_int(samples, "samples")
        self.segments = check_positive_int(segments, "segments")
        self.compactness = check_in_range(compactness, "compactness", 0.0, math.inf, closed=False)
        self.baseline = baseline
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.seed = seed

    @abstractmethod
    def coalitions(
        self, features: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Coalitions (N, S, D) in {0, 1} (0 in padded columns) and their kernel weights (N, S)."""

    @abstractmethod
    def regress(
        self, samples: torch.Tensor, scores: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Coefficients (N, D) and intercepts (N,) of the surrogate."""

    def attribute(
        self,
        x: torch.Tensor,
        target: Target,
        segmentation: torch.Tensor | None = None,
        baseline: float | str | torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self._fit(x, target, segmentation, baseline).maps(x.shape[1])

    def fit(
        self,
        x: torch.Tensor,
        target: Any = None,
        segmentation: torch.Tensor | None = None,
        baseline: float | str | torch.Tensor | None = None,
    ) -> SurrogateFit:
        """The fitted surrogate of each image (coefficients per superpixel and the samples)."""
        return self._fit(check_images(x, "x"), as_target(target), segmentation, baseline)

    def _fit(
        self,
        x: torch.Tensor,
        target: Target,
        segmentation: torch.Tensor | None,
        baseline: float | str | torch.Tensor | None,
    ) -> SurrogateFit:
        if segmentation is None:
            segmentation = slic_segments(x, self.segments, self.compactness)
        labels, features = relabel(check_segmentation(segmentation, x))
        base = self._baseline(x, labels, features, self.baseline if baseline is None else baseline)
        target, _ = bind_target(self.model, x, target, self.autocast)
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=x.device).manual_seed(self.seed)
        mask = torch.arange(int(features.max()), device=x.device) < features[:, None]
        samples, weights = self.coalitions(features, generator)
        scores = self._scores(x, base, labels, samples, target)
        coefficients, intercept = self.regress(samples, scores, weights, mask)
        return SurrogateFit(coefficients, intercept, labels, features, samples, scores, weights)

    def _baseline(
        self, x: torch.Tensor, labels: torch.Tensor, features: torch.Tensor, baseline: Any
    ) -> torch.Tensor:
        if isinstance(baseline, str):
            if baseline != "mean":
                raise ValueError(f"baseline: expected a number, a tensor or 'mean', got {baseline!r}")
            return superpixel_means(x, labels, int(features.max()))
        return baseline_like(baseline, x)

    def _scores(
        self, x: torch.Tensor, base: torch.Tensor, labels: torch.Tensor, samples: torch.Tensor, target: Target
    ) -> torch.Tensor:
        n, per_image, _ = samples.shape
        flat = labels.reshape(n, -1)

        def make_batch(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
            index = torch.arange(start, stop, device=x.device)
            image = index // per_image
            kept = samples[image, index % per_image].gather(1, flat[image]).view(-1, 1, *x.shape[2:])
            return torch.where(kept > 0, x[image], base[image]), image

        scores = batched_scores(
            self.model, make_batch, n * per_image, target, batch_size=self.batch_size, autocast=self.autocast
        )
        return scores.view(n, per_image)


def superpixel_means(x: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """An image of x's shape where each pixel has its superpixel's mean colour (per channel)."""
    n, c = x.shape[:2]
    index = labels.reshape(n, 1, -1).expand(n, c, -1)
    sums = torch.zeros(n, c, count, device=x.device, dtype=x.dtype).scatter_add_(2, index, x.flatten(2))
    sizes = torch.zeros(n, 1, count, device=x.device, dtype=x.dtype).scatter_add_(
        2, index[:, :1], torch.ones_like(x[:, :1].flatten(2))
    )
    return (sums / sizes.clamp_min(1)).gather(2, index).view_as(x)


@register("lime")
class LIME(Surrogate):
    """Local Interpretable Model-agnostic Explanations (Ribeiro et al., 2016), on superpixels.

    Coalitions are uniform bits (the first is the full image); each is weighted by
    ``exp(-D^2 / (2 width^2))`` with ``D`` the cosine distance of z to the all-ones coalition (LIME's
    image kernel ``sqrt(exp(-D^2 / width^2))``, the form of Captum's exponential kernel), and a
    weighted ridge regression with intercept gives each superpixel's coefficient.

    Args:
        kernel_width: the kernel's width (LIME's 0.25).
        alpha: ridge penalty (LIME's default ``Ridge(alpha=1)``); 0 gives least squares.
        See :class:`Surrogate` for the others.
    """

    def __init__(self, model: nn.Module, *, kernel_width: float = 0.25, alpha: float = 1.0, **kwargs):
        super().__init__(model, **kwargs)
        self.kernel_width = check_in_range(kernel_width, "kernel_width", 0.0, math.inf, closed=False)
        self.alpha = check_in_range(alpha, "alpha", 0.0, math.inf)

    def coalitions(
        self, features: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, d = features.shape[0], int(features.max())
        mask = torch.arange(d, device=features.device) < features[:, None]
        samples = torch.rand(n, self.samples, d, generator=generator, device=features.device) < 0.5
        samples[:, 0] = True
        samples = (samples & mask[:, None, :]).float()
        kept = samples.sum(dim=2)
        distance = 1.0 - torch.sqrt(kept / features[:, None].float())
        return samples, torch.exp(-distance.square() / (2 * self.kernel_width**2))

    def regress(
        self, samples: torch.Tensor, scores: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return weighted_least_squares(samples, scores, weights, alpha=self.alpha, mask=mask)


@register("kernelshap", "shap")
class KernelSHAP(Surrogate):
    """Kernel SHAP (Lundberg & Lee, 2017): Shapley values of superpixels by weighted regression.

    Coalition z of size k in 1..d-1 has the Shapley kernel weight
    ``pi(z) = (d - 1) / (C(d, k) k (d - k))``; sizes are sampled in proportion to the kernel's mass
    per size and subsets uniformly, so sampled coalitions have equal weight (as Captum and shap).
    The empty and full coalitions (infinite weight) enter as exact constraints: the intercept is
    ``f(baseline)`` and the coefficients sum to ``f(x) - f(baseline)`` (efficiency). With
    ``exact=True`` all 2^d coalitions are enumerated with their kernel weights, which gives the
    exact Shapley values of the superpixel game (d <= 16).

    The first two samples of each image are the full and the empty coalition.

    Args:
        exact: enumerate all coalitions (``samples`` is then ignored).
        alpha: ridge penalty (0: the Shapley regression).
        See :class:`Surrogate` for the others.
    """

    max_exact_features: int = 16

    def __init__(self, model: nn.Module, *, exact: bool = False, alpha: float = 0.0, **kwargs):
        super().__init__(model, **kwargs)
        self.exact = bool(exact)
        self.alpha = check_in_range(alpha, "alpha", 0.0, math.inf)
        if not self.exact and self.samples < 3:
            raise ValueError(
                f"samples: expected an integer >= 3 (full, empty and at least one coalition), got {self.samples}"
            )

    def coalitions(
        self, features: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, d, device = features.shape[0], int(features.max()), features.device
        mask = torch.arange(d, device=device) < features[:, None]
        if self.exact:
            if d > self.max_exact_features:
                raise ValueError(
                    f"exact: enumerating 2^{d} coalitions is too many; use at most "
                    f"{self.max_exact_features} superpixels (segments=) or exact=False"
                )
            bits = 2 ** torch.arange(d, device=device)
            drawn = (torch.arange(2**d, device=device)[:, None] & bits) > 0
            drawn = drawn.expand(n, -1, -1)
        else:
            drawn = self._sample(features, mask, generator)
        inside = ~(drawn & ~mask[:, None, :]).any(dim=2)
        drawn = drawn & mask[:, None, :]
        ends = torch.stack([mask, torch.zeros_like(mask)], dim=1)
        samples = torch.cat([ends, drawn], dim=1).float()
        size = samples.sum(dim=2)
        dn = features[:, None].double()
        kernel = (dn - 1) / (_binomial(dn, size.double()) * size * (dn - size))
        proper = (size > 0) & (size < dn)
        weights = torch.where(proper, kernel if self.exact else torch.ones_like(kernel), 0.0)
        weights[:, 2:] *= inside
        weights[:, :2] = 0.0
        return samples, weights.float()

    def _sample(self, features: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None):
        """Coalitions with sizes from the Shapley kernel and uniformly random members: (N, S - 2, D)."""
        n, d, device = features.shape[0], mask.shape[1], features.device
        count = self.samples - 2
        if d < 2:
            return torch.zeros(n, count, d, dtype=torch.bool, device=device)
        sizes = torch.arange(1, d, device=device, dtype=torch.float64)
        dn = features[:, None].double()
        mass = torch.where(sizes < dn, (dn - 1) / (sizes * (dn - sizes)), 0.0)
        mass = torch.where(features[:, None] > 1, mass, 1.0)
        size = torch.multinomial(mass, count, replacement=True, generator=generator) + 1
        keys = torch.rand(n, count, d, generator=generator, device=device).masked_fill(~mask[:, None, :], 2.0)
        rank = keys.argsort(dim=2).argsort(dim=2)
        return rank < size[:, :, None]

    def regress(
        self, samples: torch.Tensor, scores: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        full, empty = scores[:, 0], scores[:, 1]
        coefficients, _ = weighted_least_squares(
            samples[:, 2:],
            scores[:, 2:] - empty[:, None],
            weights[:, 2:],
            alpha=self.alpha,
            mask=mask,
            intercept=False,
            total=full - empty,
        )
        return coefficients, empty


def _binomial(n: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """C(n, k) for float tensors, through log-gamma (exact enough for d <= 64)."""
    return torch.exp(torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)).round()
