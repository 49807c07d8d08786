"""Example-based explanations: explain a prediction by training images, in a layer's feature space.

* factual: the training images nearest to the query in the features of ``layer`` (why this class:
  "it looks like these");
* counterfactual: the nearest training images of another class (what the model sees as closest on
  the other side);
* prototypes and criticisms (MMD-critic, Kim, Khanna & Koyejo, NeurIPS 2016): prototypes chosen
  greedily to maximise the MMD objective ``J(S) = 2/(n|S|) sum_{i in S, j} k(x_i, x_j) - 1/|S|^2
  sum_{i, j in S} k(x_i, x_j)`` (the data's mean embedding minus the prototypes'); criticisms are
  the points where the witness ``w(x) = mean_j k(x, x_j) - mean_{p in S} k(x, p)`` is largest in
  absolute value (the data the prototypes explain worst), with the paper's log-determinant
  regulariser ``log det K_C`` for diverse criticisms, or the plain witness.

Features are read with the core's hooks (a forward stopped at the layer), batched on the model's
device; the kernel is never materialised as an n x n matrix (rows are computed when needed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from genxai.core.checks import check_choice, check_positive_int
from genxai.core.hooks import Trace

POOLS = ("mean", "flatten")
METRICS = ("euclidean", "cosine")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model without any."""
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def layer_features(
    model: nn.Module,
    images: torch.Tensor,
    layer: str,
    *,
    pool: str = "mean",
    batch_size: int = 256,
) -> torch.Tensor:
    """(N, D) features of ``layer`` for ``images``, ``batch_size`` at a time on the model's device.

    ``pool``: "mean" averages a (N, C, H, W) map over space (one value per channel, shift
    tolerant); "flatten" keeps every unit. The forward pass stops at the layer.
    """
    check_choice(pool, "pool", POOLS)
    check_positive_int(batch_size, "batch_size")
    if images.ndim < 2 or images.shape[0] == 0:
        raise ValueError(f"images: expected a non-empty batch (N, ...), got shape {tuple(images.shape)}")
    device = model_device(model)
    chunks = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size].to(device)
        with Trace(model, layer, stop=True, detach=True) as trace:
            model(batch)
        chunks.append(_pool(trace.require_output(), pool))
    return torch.cat(chunks)


def _pool(act: torch.Tensor, pool: str) -> torch.Tensor:
    act = act.float()
    if pool == "mean" and act.ndim > 2:
        act = act.flatten(2).mean(2)
    return act.flatten(1)


def _distances(query: torch.Tensor, bank: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "cosine":
        q = torch.nn.functional.normalize(query, dim=1)
        b = torch.nn.functional.normalize(bank, dim=1)
        return 1 - q @ b.T
    return torch.cdist(query, bank)


def nearest(
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    *,
    metric: str = "euclidean",
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and distances (each (Q, k)) of the ``k`` rows of ``bank`` nearest each query row.

    ``allowed``: a (Q, N) or (N,) boolean mask of the bank rows each query may pick.
    """
    check_choice(metric, "metric", METRICS)
    check_positive_int(k, "k")
    dist = _distances(query.float(), bank.float().to(query.device), metric)
    if allowed is not None:
        allowed = allowed.to(dist.device).expand_as(dist)
        available = int(allowed.sum(1).min()) if allowed.numel() else 0
        if available < k:
            raise ValueError(f"k: {k} neighbours asked for, but a query has only {available} candidates")
        dist = dist.masked_fill(~allowed, math.inf)
    elif k > bank.shape[0]:
        raise ValueError(f"k: {k} neighbours asked for, but the bank has {bank.shape[0]} examples")
    values, index = dist.topk(k, dim=1, largest=False)
    return index, values


@dataclass
class Neighbours:
    """Per query: the predicted class, ``k`` training indices with their distances and labels."""

    predicted: torch.Tensor  # (Q,)
    index: torch.Tensor  # (Q, k)
    distance: torch.Tensor  # (Q, k)
    labels: torch.Tensor  # (Q, k)


class ExampleExplainer:
    """Factual and counterfactual training examples for a classifier's predictions.

    Args:
        model: the classifier (eval mode).
        layer: dotted name of the layer whose features define "near".
        images, labels: the training images (N, C, H, W) and their labels (N,).
        pool, metric: feature pooling ("mean", "flatten") and distance ("euclidean", "cosine").
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        classes: int | None = None,
        pool: str = "mean",
        metric: str = "euclidean",
        batch_size: int = 256,
    ) -> None:
        check_choice(metric, "metric", METRICS)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"labels: expected ({images.shape[0]},) labels for the images, got {tuple(labels.shape)}"
            )
        self.model, self.layer, self.pool, self.metric = model, layer, pool, metric
        self.batch_size = batch_size
        self.features = layer_features(model, images, layer, pool=pool, batch_size=batch_size)
        self.labels = labels.long().to(self.features.device)
        self.classes = classes if classes is not None else int(self.labels.max()) + 1

    @torch.no_grad()
    def _query(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and predicted classes of ``x`` from one forward pass per batch."""
        device = model_device(self.model)
        feats, predicted = [], []
        for start in range(0, x.shape[0], self.batch_size):
            with Trace(self.model, self.layer, detach=True) as trace:
                logits = self.model(x[start : start + self.batch_size].to(device))
            feats.append(_pool(trace.require_output(), self.pool))
            predicted.append(logits.argmax(1))
        return torch.cat(feats), torch.cat(predicted)

    def _result(self, predicted, index, distance) -> Neighbours:
        return Neighbours(predicted, index, distance, self.labels[index])

    def factual(self, x: torch.Tensor, k: int = 5, *, same_class: bool = True) -> Neighbours:
        """The ``k`` nearest training images (of the predicted class when ``same_class``)."""
        feats, predicted = self._query(x)
        allowed = self.labels[None, :] == predicted[:, None] if same_class else None
        index, distance = nearest(feats, self.features, k, metric=self.metric, allowed=allowed)
        return self._result(predicted, index, distance)

    def counterfactual(self, x: torch.Tensor, k: int = 5, *, target: int | None = None) -> Neighbours:
        """The ``k`` nearest training images of class ``target`` (None: of any other class)."""
        feats, predicted = self._query(x)
        if target is None:
            allowed = self.labels[None, :] != predicted[:, None]
        else:
            if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < self.classes:
                raise ValueError(f"target: unknown class {target!r}; expected 0..{self.classes - 1}")
            allowed = (self.labels == target)[None, :].expand(len(predicted), -1)
        index, distance = nearest(feats, self.features, k, metric=self.metric, allowed=allowed)
        return self._result(predicted, index, distance)


# --- MMD-critic -----------------------------------------------------------------------------------


def median_gamma(features: torch.Tensor, sample: int = 2048) -> float:
    """The median heuristic: ``gamma = 1 / median(||x_i - x_j||^2)`` over (a sample of) pairs."""
    x = features[:sample].float()
    d2 = torch.cdist(x, x).pow(2)
    off = d2[~torch.eye(len(x), dtype=torch.bool, device=x.device)]
    med = float(off.median()) if off.numel() else 1.0
    return 1.0 / med if med > 0 else 1.0


class RBFKernel:
    """``k(x, y) = exp(-gamma ||x - y||^2)`` with rows computed on demand (never n x n at once)."""

    def __init__(self, features: torch.Tensor, gamma: float, batch_size: int = 1024) -> None:
        self.x = features.float()
        self.sq = self.x.pow(2).sum(1)
        self.gamma = gamma
        self.batch_size = batch_size

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """(len(index), n) kernel rows of the points ``index``."""
        a = self.x[index]
        d2 = (self.sq[index][:, None] + self.sq[None, :] - 2 * a @ self.x.T).clamp_min(0)
        return torch.exp(-self.gamma * d2)

    def row_means(self) -> torch.Tensor:
        """(n,) ``mean_j k(x_i, x_j)``, in chunks of ``batch_size`` rows."""
        n = len(self.x)
        idx = torch.arange(n, device=self.x.device)
        return torch.cat(
            [self.rows(idx[s : s + self.batch_size]).mean(1) for s in range(0, n, self.batch_size)]
        )


@dataclass
class MMDCritic:
    """Prototypes and criticisms (indices into the features), the witness of every point, gamma."""

    prototypes: torch.Tensor
    criticisms: torch.Tensor
    witness: torch.Tensor
    gamma: float
    objective: list[float]  # J(S) after each greedy prototype


def select_prototypes(kernel: RBFKernel, count: int, means: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Greedy maximisation of the MMD objective J(S), all candidates scored at once per step."""
    n = len(means)
    chosen: list[int] = []
    in_set = torch.zeros(n, dtype=torch.bool, device=means.device)
    row_sum = torch.zeros(n, device=means.device)  # sum_{p in S} k(p, .)
    first = 0.0  # sum_{p in S} mean_j k(p, j)
    second = 0.0  # sum_{p, q in S} k(p, q)
    history = []
    for step in range(count):
        m = step + 1
        gain = 2.0 / m * (first + means) - (second + 2 * row_sum + 1.0) / m**2  # k(c, c) = 1
        gain = gain.masked_fill(in_set, -math.inf)
        best = int(gain.argmax())
        history.append(float(gain[best]))
        chosen.append(best)
        in_set[best] = True
        row = kernel.rows(torch.tensor([best], device=means.device))[0]
        second += 2 * float(row_sum[best]) + 1.0
        first += float(means[best])
        row_sum += row
    return torch.tensor(chosen, dtype=torch.long), history


def select_criticisms(
    kernel: RBFKernel, count: int, witness: torch.Tensor, exclude: torch.Tensor, regularizer: str | None
) -> torch.Tensor:
    """Greedy criticisms: the largest ``|witness|``, plus ``log det K_C`` when ``regularizer="logdet"``."""
    n = len(witness)
    blocked = torch.zeros(n, dtype=torch.bool, device=witness.device)
    blocked[exclude.to(witness.device)] = True
    chosen: list[int] = []
    rows = torch.empty(0, n, device=witness.device)  # K[C, :]
    for _ in range(count):
        score = witness.abs().clone()
        if regularizer == "logdet" and chosen:
            kc = rows[:, chosen]  # K_CC
            solve = torch.linalg.solve(kc + 1e-6 * torch.eye(len(chosen), device=kc.device), rows)
            schur = (1.0 - (rows * solve).sum(0)).clamp_min(1e-12)  # k(c,c) - k_cC K_CC^-1 k_Cc
            score = score + torch.log(schur)  # the log det gained by adding each candidate
        score = score.masked_fill(blocked, -math.inf)
        best = int(score.argmax())
        if not math.isfinite(float(score[best])):
            break
        chosen.append(best)
        blocked[best] = True
        rows = torch.cat([rows, kernel.rows(torch.tensor([best], device=witness.device))])
    return torch.tensor(chosen, dtype=torch.long)


def mmd_critic(
    features: torch.Tensor,
    prototypes: int,
    criticisms: int = 0,
    *,
    gamma: float | None = None,
    regularizer: str | None = "logdet",
    batch_size: int = 1024,
) -> MMDCritic:
    """MMD-critic prototypes and criticisms of ``features`` (N, D) with an RBF kernel.

    ``gamma``: the kernel's width (None: the median heuristic). ``regularizer``: "logdet" (the
    paper's diversity term) or None (the plain witness).
    """
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"features: expected a non-empty (N, D) tensor, got shape {tuple(features.shape)}")
    check_positive_int(prototypes, "prototypes")
    check_positive_int(criticisms, "criticisms", minimum=0)
    if regularizer not in ("logdet", None):
        raise ValueError(f"regularizer: expected 'logdet' or None, got {regularizer!r}")
    n = features.shape[0]
    if prototypes + criticisms > n:
        raise ValueError(
            f"prototypes: {prototypes} prototypes + {criticisms} criticisms exceed the {n} examples"
        )
    gamma = median_gamma(features) if gamma is None else float(gamma)
    if not gamma > 0:
        raise ValueError(f"gamma: expected a positive kernel width, got {gamma}")
    kernel = RBFKernel(features, gamma, batch_size)
    means = kernel.row_means()
    protos, history = select_prototypes(kernel, prototypes, means)
    witness = means - kernel.rows(protos.to(means.device)).mean(0)
    crits = select_criticisms(kernel, criticisms, witness, protos, regularizer)
    return MMDCritic(protos, crits, witness.cpu(), gamma, history)
