"""KID against torchmetrics, precision/recall against a brute-force k-NN, the valid rate, FID's extras."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.image.kid import KernelInceptionDistance

from genxai.evaluation.fid import FID, ClassifierFeatures, FeatureClassifier, _Precomputed
from genxai.evaluation.paired import bootstrap_ci, compare, paired_difference, summarize
from genxai.evaluation.sample_quality import ValidityCheck, kernel_inception_distance, precision_recall


def features(n: int, shift: float, seed: int) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed)) + shift


def test_kid_equals_torchmetrics_on_the_same_features():
    real, fake = features(40, 0.0, 1), features(40, 0.3, 2)
    peer = KernelInceptionDistance(feature=_Precomputed(8), subsets=1, subset_size=40)
    peer.update(real, real=True)
    peer.update(fake, real=False)
    mean, _ = kernel_inception_distance(real, fake, subsets=1, subset_size=40)
    assert mean == pytest.approx(float(peer.compute()[0]), rel=1e-5)  # torchmetrics sums in float32


def test_kid_is_near_zero_for_one_distribution_and_grows_with_the_shift():
    same, _ = kernel_inception_distance(features(200, 0, 1), features(200, 0, 2), subset_size=100)
    far, _ = kernel_inception_distance(features(200, 0, 1), features(200, 1.0, 2), subset_size=100)
    assert abs(same) < 0.05 < far


def brute_force_pr(real: torch.Tensor, fake: torch.Tensor, k: int) -> tuple[float, float]:
    def radius(points, i):
        d = sorted(float((points[i] - points[j]).norm()) for j in range(len(points)) if j != i)
        return d[k - 1]

    def inside(q, points):
        return any(float((q - points[i]).norm()) <= radius(points, i) for i in range(len(points)))

    precision = sum(inside(f, real) for f in fake) / len(fake)
    recall = sum(inside(r, fake) for r in real) / len(real)
    return precision, recall


def test_precision_recall_equal_a_brute_force_knn():
    real, fake = features(30, 0.0, 3), features(30, 0.8, 4)
    fake[:10] = real[:10] + 0.01  # some generated points on the real manifold
    assert precision_recall(real, fake, k=3, chunk=7) == pytest.approx(brute_force_pr(real, fake, 3))


def test_validity_counts_confident_images_with_real_colours():
    real = torch.rand(200, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    check = ValidityCheck(confidence=0.9)
    check.update_real(real, torch.tensor([[10.0, 0.0]]).expand(200, 2))
    confident = torch.tensor([[10.0, 0.0], [10.0, 0.0], [0.0, 0.1], [10.0, 0.0]])
    fake = real[:4].clone()
    fake[3] = 1.0  # a white image: confident, but no real image has its colour statistics
    check.update_fake(fake, confident)
    fake_confident, fake_valid, real_valid = check.rates()
    assert (fake_confident, fake_valid) == (0.75, 0.5)
    assert 0.9 <= real_valid < 1.0  # the colour range holds 99% of each of 6 real statistics


def test_fid_reports_its_extras_named_by_their_features():
    torch.manual_seed(0)
    extractor = ClassifierFeatures(FeatureClassifier(3, num_classes=6, width=8), "shapes")
    metric = FID(extractor, "cpu", kid=True, precision_recall=True, valid=True)
    metric.update(torch.rand(32, 3, 16, 16), real=True)
    metric.update(torch.rand(32, 3, 16, 16), real=False)
    out = metric.compute()
    assert set(metric.names) == set(out)
    assert "KID (offline shapes-classifier features)" in out
    assert all(math.isfinite(v) for v in out.values())
    metric.reset_fake()
    metric.update(torch.rand(8, 3, 16, 16), real=False)
    assert math.isfinite(metric.compute()["precision k=3 (offline shapes-classifier features)"])


def test_summary_and_paired_difference_by_hand():
    s = summarize([1.0, 2.0, 4.0])
    assert s.mean == pytest.approx(7 / 3)
    assert s.se == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2 / 3))
    # two seeds: resampled means are d1, (d1+d2)/2, d2 with probabilities 1/4, 1/2, 1/4
    low, high = bootstrap_ci([1.0, 3.0])
    assert (low, high) == (1.0, 3.0)
    low, high = bootstrap_ci([1.0, 3.0], level=0.4)  # the 30% and 70% quantiles: the middle value
    assert low == high == 2.0
    d = paired_difference([3.0, 5.0, 4.0], [1.0, 2.0, 3.0])  # differences 2, 3, 1
    assert (d.mean, d.n) == (2.0, 3)
    assert d.p_value == pytest.approx(0.0741799, rel=1e-4)  # t = 2 / (1 / sqrt(3)), 2 dof


def test_compare_pairs_only_the_shared_seeds():
    out = compare({"base": {0: 1.0, 1: 2.0, 2: 3.0}, "v": {0: 2.0, 2: 3.5}}, reference="base")
    assert out["v"].n == 2 and out["v"].mean == pytest.approx(0.75)
    with pytest.raises(ValueError, match="reference"):
        compare({"base": {0: 1.0}}, reference="min_snr")
