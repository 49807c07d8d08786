"""Sample-quality metrics beyond FID that work at small sample counts, on stored features.

* :func:`kernel_inception_distance`: KID (Binkowski et al. 2018), the unbiased MMD^2 with the cubic
  polynomial kernel ``k(x, y) = (x . y / d + 1)^3``, averaged over random subsets; the same
  estimator as torchmetrics' ``KernelInceptionDistance`` (which it equals on the same features and
  subsets), computed once from features that FID's pass already extracted.
* :func:`precision_recall`: improved precision and recall (Kynkaanniemi et al. 2019): each set's
  manifold is the union of balls around its points with the radius to the k-th nearest neighbour
  (k = 3); precision = share of generated points inside the real manifold, recall = share of real
  points inside the generated one. Batched distances, never an (N, N) matrix beyond ``chunk`` rows.
* :class:`ValidityCheck`: for data whose classes a classifier trained on real data knows (the
  bundled shapes): a sample is *valid* when the classifier is confident (max softmax >= 0.5 of 6
  classes: on the bundled shapes the offline classifier is right on 91% of held-out images and
  this confident on as many) and its per-channel colour mean and spread lie inside the range of
  99% of the real images. The same rate of the real images is the reference.

:class:`genxai.evaluation.fid.FID` keeps the features these need when asked (``kid=True`` ...).
"""

from __future__ import annotations

import torch

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PR_NEIGHBOURS = 3
CONFIDENCE = 0.5


def _polynomial_mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 between two equal-sized sets with k(a, b) = (a . b / d + 1)^3."""
    m, d = x.shape
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    off = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return off - 2 * kxy.mean()


def kernel_inception_distance(
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """KID between feature sets (N, D) and (M, D): (mean, std over ``subsets`` random subsets).

    ``subset_size`` is capped at the smaller set; subsets are drawn without replacement within a
    subset (torchmetrics' scheme). In float64, like torchmetrics.
    """
    real, fake = real.double(), fake.double()
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError(
            f"KID needs at least 2 real and 2 generated samples, got {len(real)} and {len(fake)}"
        )
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(0)
    values = []
    for _ in range(subsets):
        i = torch.randperm(len(real), generator=generator)[:size].to(real.device)
        j = torch.randperm(len(fake), generator=generator)[:size].to(fake.device)
        values.append(_polynomial_mmd(real[i], fake[j]))
    kid = torch.stack(values)
    return float(kid.mean()), float(kid.std(unbiased=False))


def _kth_neighbour_radii(points: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of every point to its k-th nearest other point of the same set."""
    radii = []
    for start in range(0, len(points), chunk):
        d = torch.cdist(points[start : start + chunk], points)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the 1st is the point itself (distance 0)
    return torch.cat(radii)


def _inside(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    """For every query: is it within the radius of some point of the set?"""
    hits = []
    for start in range(0, len(queries), chunk):
        d = torch.cdist(queries[start : start + chunk], points)
        hits.append((d <= radii.unsqueeze(0)).any(dim=1))
    return torch.cat(hits)


def precision_recall(
    real: torch.Tensor, fake: torch.Tensor, *, k: int = PR_NEIGHBOURS, chunk: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall of ``fake`` against ``real`` features (k-NN manifolds).

    The paper compares sets of equal size: when one is larger, its first ``min(N, M)`` points are used.
    """
    n = min(len(real), len(fake))
    if n <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, got {n}")
    real, fake = real[:n].float(), fake[:n].float()
    real_radii = _kth_neighbour_radii(real, k, chunk)
    fake_radii = _kth_neighbour_radii(fake, k, chunk)
    precision = _inside(fake, real, real_radii, chunk).float().mean()
    recall = _inside(real, fake, fake_radii, chunk).float().mean()
    return float(precision), float(recall)


def colour_statistics(images: torch.Tensor) -> torch.Tensor:
    """Per image: the mean and standard deviation of each channel, (N, 2C), images in [0, 1]."""
    flat = images.float().flatten(2)
    return torch.cat([flat.mean(dim=2), flat.std(dim=2)], dim=1)


class ValidityCheck:
    """Is a generated image a valid sample of the data? Confident class and real colour statistics.

    Feed real images (their colour statistics set the accepted range: the central ``coverage`` of
    each statistic) and generated images, each with the classifier's logits; ``rates()`` gives the
    share of generated images that are confident, that are confident *and* inside the colour
    range, and the latter share of the real images (the reference a perfect model would reach).
    """

    def __init__(self, confidence: float = CONFIDENCE, coverage: float = 0.99) -> None:
        self.confidence = confidence
        self.coverage = coverage
        self.real: list[torch.Tensor] = []
        self.real_confident: list[torch.Tensor] = []
        self.reset_fake()

    def reset_fake(self) -> None:
        self.fake_stats: list[torch.Tensor] = []
        self.fake_confident: list[torch.Tensor] = []

    def _confident(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits.float().softmax(dim=1).amax(dim=1) >= self.confidence).cpu()

    def update_real(self, images: torch.Tensor, logits: torch.Tensor) -> None:
        self.real.append(colour_statistics(images).cpu())
        self.real_confident.append(self._confident(logits))

    def update_fake(self, images: torch.Tensor, logits: torch.Tensor) -> None:
        self.fake_stats.append(colour_statistics(images).cpu())
        self.fake_confident.append(self._confident(logits))

    def rates(self) -> tuple[float, float, float]:
        """(confident rate, valid rate) of the generated images fed so far, and the real images'
        valid rate."""
        if not self.real or not self.fake_stats:
            raise ValueError("validity: feed real and generated images first")
        real = torch.cat(self.real)
        tail = (1 - self.coverage) / 2
        low, high = real.quantile(tail, dim=0), real.quantile(1 - tail, dim=0)

        def valid(stats: torch.Tensor, confident: torch.Tensor) -> float:
            return float((confident & ((stats >= low) & (stats <= high)).all(dim=1)).float().mean())

        confident = torch.cat(self.fake_confident)
        reference = valid(real, torch.cat(self.real_confident))
        return float(confident.float().mean()), valid(torch.cat(self.fake_stats), confident), reference
