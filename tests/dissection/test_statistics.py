"""Streaming dissection statistics equal exact computations on the held tensors (within one bin,
exact at bin edges) and their state does not grow with the samples."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import mutual_info_score

from genxai.dissection.statistics import (
    ConceptHistogram,
    RunningRange,
    RunningTopK,
    check_levels,
    default_levels,
    overlap_scores,
    upsample,
)

SIZE = (12, 12)


def _data(n=10, units=3, concepts=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(n, units, 4, 4, generator=g)
    acts[:, 0] = acts[:, 0].relu()  # ties at zero, the minimum
    acts[:, 2] = acts[:, 2].round()  # ties everywhere: values sit on bin edges
    noise = torch.rand(n, 1, *SIZE, generator=g)
    up0 = upsample(acts[:, :1], SIZE)
    seg = torch.cat([up0 > 0.5, noise > 0.7, torch.zeros(n, 1, *SIZE, dtype=torch.bool)], dim=1)[
        :, :concepts
    ]  # related to unit 0, unrelated, empty
    return acts, seg


def _stream(acts, seg, bins, batch=3, max_elements=1 << 24):
    ranges = RunningRange(acts.shape[1])
    for start in range(0, len(acts), batch):
        ranges.update(acts[start : start + batch])
    hist = ConceptHistogram(
        ranges.minimum, ranges.maximum, seg.shape[1], bins=bins, max_elements=max_elements
    )
    for start in range(0, len(acts), batch):
        hist.update(acts[start : start + batch], seg[start : start + batch])
    return ranges, hist


def _exact_scores(x: torch.Tensor, s: torch.Tensor) -> tuple[float, float]:
    """IoU and I/H of two boolean pixel vectors, computed directly (sklearn for the MI)."""
    inter, union = (x & s).sum().item(), (x | s).sum().item()
    iou = inter / union if union else 0.0
    counts = torch.tensor([(x & s).sum(), (x & ~s).sum(), (~x & s).sum(), (~x & ~s).sum()]).double()
    p = counts[counts > 0] / counts.sum()
    joint = float(-(p * p.log()).sum())
    mi = mutual_info_score(s.numpy(), x.numpy())
    return iou, (mi / joint if joint > 1e-12 else 0.0)


def test_range_and_mean_are_exact():
    acts, seg = _data()
    ranges, _ = _stream(acts, seg, bins=8)
    assert torch.equal(ranges.minimum, acts.amin((0, 2, 3)))
    assert torch.equal(ranges.maximum, acts.amax((0, 2, 3)))
    assert torch.allclose(ranges.mean, acts.mean((0, 2, 3)), atol=1e-6)


def test_iou_and_iqr_at_every_bin_edge_equal_exact_counts():
    acts, seg = _data()
    # a small element budget forces the units to be processed one chunk at a time
    _, hist = _stream(acts, seg, bins=16, max_elements=500)
    iou, iqr, positive = hist.scores_at_edges()
    up = upsample(acts, SIZE)
    for u in range(acts.shape[1]):
        values = up[:, u].flatten()
        for c in range(seg.shape[1]):
            s = seg[:, c].flatten()
            for j in range(hist.bins + 1):
                x = values > hist.edges[u, j]
                exact_iou, exact_iqr = _exact_scores(x, s)
                assert iou[u, c, j].item() == pytest.approx(exact_iou, abs=1e-9)
                assert iqr[u, c, j].item() == pytest.approx(exact_iqr, abs=1e-9)
                p_xy, p_x, p_y = (x & s).double().mean(), x.double().mean(), s.double().mean()
                assert bool(positive[u, c, j]) == bool(p_xy > p_x * p_y + 1e-12)


def test_quantiles_within_one_bin_and_in_the_right_bin():
    acts, seg = _data(n=12, seed=3)
    bins = 64
    _, hist = _stream(acts, seg, bins=bins)
    levels = torch.tensor([0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999])
    estimate = hist.quantiles(levels)
    index = hist.edge_index(levels.double())
    up = upsample(acts, SIZE)
    for u in range(acts.shape[1]):
        values = up[:, u].flatten().sort().values
        width = (hist.edges[u, -1] - hist.edges[u, 0]).item() / bins
        for k, q in enumerate(levels.tolist()):
            exact = values[math.ceil(q * values.numel()) - 1].item()  # smallest x with P(r <= x) >= q
            j = int(index[u, k])
            assert exact <= hist.edges[u, j].item()
            assert j == 0 or exact > hist.edges[u, j - 1].item()
            assert abs(estimate[u, k].item() - exact) <= width + 1e-6


def test_best_threshold_maximises_iqr_over_levels_among_positive_masks():
    acts, seg = _data(n=8, seed=5)
    _, hist = _stream(acts, seg, bins=32)
    levels = default_levels(20)
    best = hist.best_thresholds(levels)
    up = upsample(acts, SIZE)
    for u in range(acts.shape[1]):
        values = up[:, u].flatten()
        for c in range(seg.shape[1]):
            s = seg[:, c].flatten()
            candidates = []
            for q in levels.tolist():
                # the candidate edge: the smallest edge with P(r <= e) >= q, from the held values
                below = (values[None] <= hist.edges[u][:, None]).sum(1).double()
                j = int(torch.nonzero(below >= q * values.numel())[0])
                x = values > hist.edges[u, j]
                iou, iqr = _exact_scores(x, s)
                positive = (x & s).double().mean() > x.double().mean() * s.double().mean()
                candidates.append((iqr if positive else -1.0, iou, hist.edges[u, j].item(), q))
            top = max(candidates, key=lambda t: t[0])
            if top[0] < 0:  # never positively associated: scores are 0
                assert best["iou"][u, c] == 0 and best["iqr"][u, c] == 0
                continue
            assert best["iqr"][u, c].item() == pytest.approx(top[0], abs=1e-6)
            assert best["iou"][u, c].item() == pytest.approx(top[1], abs=1e-6)
    # unit 0 is concept 0 thresholded at 0.5: nearly all of it at the best candidate; noise is not
    assert best["iou"][0, 0] > 0.9 and best["iqr"][0, 0] > 0.7
    assert (best["iqr"][:, 1] < 0.05).all()
    assert (best["iou"][:, 2] == 0).all()  # the empty concept


def test_state_does_not_grow_with_samples():
    acts, seg = _data(n=4)
    ranges, hist = _stream(acts, seg, bins=16)
    before = (ranges.state_sizes(), hist.state_sizes())
    more, more_seg = _data(n=40, seed=9)
    for start in range(0, 40, 4):
        ranges.update(more[start : start + 4])
        hist.update(more[start : start + 4], more_seg[start : start + 4])
    assert (ranges.state_sizes(), hist.state_sizes()) == before
    assert hist.state_sizes()["joint"] == 3 * 3 * 17
    assert hist.pixels == 44 * SIZE[0] * SIZE[1]
    assert int(hist.total.sum(1)[0]) == hist.pixels


def test_running_top_k_equals_top_k_of_everything():
    values = torch.randn(50, 4, generator=torch.Generator().manual_seed(2))
    top = RunningTopK(4, 5)
    for start in range(0, 50, 7):
        top.update(values[start : start + 7], torch.arange(start, min(start + 7, 50)))
    got_values, got_indices = top.result()
    expected = values.t().topk(5, dim=1)
    assert torch.equal(got_values, expected.values) and torch.equal(got_indices, expected.indices)
    assert top.values.shape == (4, 5)


def test_overlap_scores_known_tables():
    iou, iqr, positive = overlap_scores(torch.tensor(8.0), torch.tensor(8.0), torch.tensor(8.0), 16)
    assert iou.item() == 1 and iqr.item() == pytest.approx(1.0) and bool(positive)
    iou, iqr, positive = overlap_scores(torch.tensor(8.0), torch.tensor(4.0), torch.tensor(8.0), 16)
    assert (
        iou.item() == pytest.approx(1 / 3)
        and iqr.item() == pytest.approx(0.0, abs=1e-12)
        and not bool(positive)
    )
    _, _, positive = overlap_scores(torch.tensor(8.0), torch.tensor(0.0), torch.tensor(8.0), 16)
    assert not bool(positive)  # the complement: informative but pointing away


def test_bad_input():
    with pytest.raises(ValueError, match="levels"):
        check_levels([0.5, 1.0])
    with pytest.raises(ValueError, match="activations"):
        RunningRange(3).update(torch.zeros(2, 4, 3, 3))
    hist = ConceptHistogram(torch.zeros(2), torch.ones(2), 3, bins=4)
    with pytest.raises(ValueError, match="masks"):
        hist.update(torch.zeros(2, 2, 3, 3), torch.zeros(2, 2, 6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="finite"):
        ConceptHistogram(torch.full((2,), torch.inf), torch.full((2,), -torch.inf), 3)
