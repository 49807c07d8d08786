"""Example-based explanations: nearest neighbours by hand, MMD-critic on a mixture, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genxai.explainers.examples import ExampleExplainer, layer_features, mmd_critic, nearest


class Tiny(nn.Module):
    """Features = the image's mean per channel (layer ``feat``); logits = those means."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feat(x))


def _images(values: list[list[float]]) -> torch.Tensor:
    return torch.tensor(values)[:, :, None, None].expand(-1, -1, 4, 4).clone()


def test_layer_features_are_batched_and_pooled():
    x = torch.randn(10, 2, 4, 4)
    feats = layer_features(Tiny(), x, "feat", pool="mean", batch_size=3)
    assert torch.allclose(feats, x.mean((2, 3)), atol=1e-6)
    assert layer_features(Tiny(), x, "feat", pool="flatten", batch_size=4).shape == (10, 2)


def test_factual_and_counterfactual_neighbours_by_hand():
    # class 0 images have a larger channel 0; feature space = channel means
    train = _images([[1.0, 0.0], [0.9, 0.1], [3.0, 0.0], [0.0, 1.0], [0.2, 0.8], [0.0, 3.0]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    explainer = ExampleExplainer(Tiny(), "feat", train, labels)
    query = _images([[0.95, 0.05]])
    fact = explainer.factual(query, k=2)
    assert fact.predicted.tolist() == [0]
    assert fact.index.tolist() == [[0, 1]] or fact.index.tolist() == [[1, 0]]
    assert (fact.labels == 0).all()
    counter = explainer.counterfactual(query, k=1)
    assert counter.index.tolist() == [[4]]  # the nearest class-1 image
    assert counter.labels.tolist() == [[1]]
    assert torch.allclose(counter.distance, torch.tensor([[((0.95 - 0.2) ** 2 + 0.75**2) ** 0.5]]))


def test_unknown_class_and_too_many_neighbours_are_clear_errors():
    train = _images([[1.0, 0.0], [0.0, 1.0]])
    explainer = ExampleExplainer(Tiny(), "feat", train, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target: unknown class 5"):
        explainer.counterfactual(train[:1], k=1, target=5)
    with pytest.raises(ValueError, match="k: 3 neighbours"):
        explainer.factual(train[:1], k=3)
    with pytest.raises(ValueError, match="layer: no module named 'nope'"):
        ExampleExplainer(Tiny(), "nope", train, torch.tensor([0, 1]))


def test_nearest_cosine_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    q, bank = torch.randn(5, 8, generator=g), torch.randn(40, 8, generator=g)
    index, _ = nearest(q, bank, 3, metric="cosine")
    sims = torch.nn.functional.cosine_similarity(q[:, None], bank[None], dim=2)
    assert torch.equal(index, sims.topk(3, dim=1).indices)


def _mixture(sizes, centres, seed=0):
    g = torch.Generator().manual_seed(seed)
    points = [torch.tensor(c) + 0.3 * torch.randn(n, 2, generator=g) for n, c in zip(sizes, centres)]
    labels = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    return torch.cat(points), labels


def test_mmd_critic_picks_one_prototype_per_mode():
    centres = [[0.0, 0.0], [6.0, 0.0], [0.0, 6.0], [6.0, 6.0]]
    x, labels = _mixture([60, 50, 40, 30], centres)
    result = mmd_critic(x, prototypes=4, criticisms=3, gamma=0.5)
    assert sorted(labels[result.prototypes].tolist()) == [0, 1, 2, 3]
    # each prototype sits near its mode's centre (the mode's densest region)
    for p in result.prototypes.tolist():
        assert (x[p] - torch.tensor(centres[int(labels[p])])).norm() < 0.6
    assert not set(result.criticisms.tolist()) & set(result.prototypes.tolist())
    # the objective grows with each prototype while a new mode is covered
    assert all(b > a for a, b in zip(result.objective, result.objective[1:]))


def test_mmd_critic_criticisms_follow_the_witness_and_the_logdet_objective():
    x, _ = _mixture([50, 12], [[0.0, 0.0], [2.0, 0.0]])
    gamma = 0.5
    plain = mmd_critic(x, prototypes=2, criticisms=4, gamma=gamma, regularizer=None)
    logdet = mmd_critic(x, prototypes=2, criticisms=4, gamma=gamma)
    # the witness by hand: data mean embedding minus the prototypes' mean embedding
    k = torch.exp(-gamma * torch.cdist(x.double(), x.double()).pow(2))
    witness = k.mean(1) - k[:, plain.prototypes].mean(1)
    assert torch.allclose(plain.witness.double(), witness, atol=1e-5)
    # plain: the largest |witness| outside the prototypes
    order = [i for i in witness.abs().argsort(descending=True).tolist() if i not in plain.prototypes.tolist()]
    assert plain.criticisms.tolist() == order[:4]
    # logdet: brute-force greedy on sum |w| + log det K_C
    chosen: list[int] = []
    for _ in range(4):
        best, value = -1, -float("inf")
        for c in range(len(x)):
            if c in chosen or c in plain.prototypes.tolist():
                continue
            idx = [*chosen, c]
            v = float(witness[idx].abs().sum() + torch.logdet(k[idx][:, idx]))
            if v > value:
                best, value = c, v
        chosen.append(best)
    assert logdet.criticisms.tolist() == chosen
    spread = lambda idx: torch.pdist(x[idx]).min()  # noqa: E731
    assert spread(logdet.criticisms) >= spread(plain.criticisms)


def test_mmd_critic_bad_input():
    with pytest.raises(ValueError, match="features"):
        mmd_critic(torch.empty(0, 2), prototypes=1)
    with pytest.raises(ValueError, match="prototypes"):
        mmd_critic(torch.randn(3, 2), prototypes=3, criticisms=1)
