"""Paired comparisons over seeds: mean, standard error, paired bootstrap CI, paired t-test.

An ablation trains every variant once per seed with the same initial weights, data order and
evaluation noise, so the variant-minus-reference difference is taken seed by seed (paired), which
removes the seed-to-seed variation they share:

    compare({"baseline": [2.1, 1.9, 2.4], "noise": [2.0, 1.7, 2.2]}, reference="baseline")
    # {"noise": PairedDifference(mean=-0.17, ci_low=..., ci_high=..., p_value=..., seeds=3), ...}

The bootstrap resamples seeds with replacement (percentile interval); with few seeds its interval
is narrow and coarse, so the paired t-test's p-value is given beside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class Summary:
    """Mean and standard error (sample std / sqrt(n)) of one variant's values over seeds."""

    mean: float
    se: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class PairedDifference:
    """variant - reference over shared seeds: mean, s.e., bootstrap CI and paired t-test p-value."""

    mean: float
    se: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int
    level: float = 0.95

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary:
    """Mean and standard error of ``values`` (s.e. NaN for a single value)."""
    x = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if len(x) == 0:
        raise ValueError("values: nothing to summarize")
    se = float(x.std(unbiased=True) / math.sqrt(len(x))) if len(x) > 1 else math.nan
    return Summary(float(x.mean()), se, len(x))


def bootstrap_ci(
    differences: Sequence[float], *, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired ``differences`` (seeds resampled)."""
    d = torch.tensor([float(v) for v in differences], dtype=torch.float64)
    if len(d) == 0:
        raise ValueError("differences: nothing to resample")
    if not 0 < level < 1:
        raise ValueError(f"level: expected a number in (0, 1), got {level}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(d), (resamples, len(d)), generator=g)
    means = d[idx].mean(dim=1)
    tail = (1 - level) / 2
    return float(means.quantile(tail)), float(means.quantile(1 - tail))


def paired_t_pvalue(differences: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test that the mean difference is 0 (NaN below 2 seeds)."""
    from scipy import stats

    d = [float(v) for v in differences]
    if len(d) < 2:
        return math.nan
    if max(d) == min(d):  # no spread: the test is undefined unless every difference is 0
        return 1.0 if d[0] == 0 else 0.0
    return float(stats.ttest_1samp(d, 0.0).pvalue)


def paired_difference(
    values: Sequence[float], reference: Sequence[float], *, level: float = 0.95, seed: int = 0
) -> PairedDifference:
    """The seed-by-seed difference ``values - reference`` (same seed order in both)."""
    if len(values) != len(reference):
        raise ValueError(f"values: {len(values)} seeds against {len(reference)} of the reference")
    d = [float(a) - float(b) for a, b in zip(values, reference)]
    s = summarize(d)
    low, high = bootstrap_ci(d, level=level, seed=seed)
    return PairedDifference(s.mean, s.se, low, high, paired_t_pvalue(d), s.n, level)


def compare(
    per_seed: Mapping[str, Mapping[int, float]], reference: str, *, level: float = 0.95
) -> dict[str, PairedDifference]:
    """Paired differences of every variant to ``reference`` on the seeds both have finished."""
    if reference not in per_seed:
        raise ValueError(f"reference: {reference!r} is not among {sorted(per_seed)}")
    ref = per_seed[reference]
    out = {}
    for label, values in per_seed.items():
        seeds = sorted(set(values) & set(ref))
        if label == reference or not seeds:
            continue
        out[label] = paired_difference([values[s] for s in seeds], [ref[s] for s in seeds], level=level)
    return out
