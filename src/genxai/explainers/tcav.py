"""Concept explanations: TCAV (Kim et al., ICML 2018).

A concept is a set of example images. Its concept activation vector (CAV) at ``layer`` is the normal
of a linear classifier that separates the concept's activations from those of a random set; the
directional derivative ``S(x) = grad_layer logit_k(x) . v_C`` says whether moving the activation
toward the concept raises class k; the TCAV score is the fraction of class-k inputs with ``S > 0``.
A concept is significant when its scores over several random sets (one CAV per random set) differ
from those of random-vs-random CAVs in a two-sided t-test, with Bonferroni's correction over the
concepts tested (``p < alpha / m``).

Activations come from the core's hooks and the gradients from the one engine
(:func:`genxai.core.engine.forward_backward`), batched on the model's device; CAVs are
L2-regularised logistic regressions fitted on the device (full batch, L-BFGS).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from genxai.core.checks import check_in_range, check_positive_int
from genxai.core.engine import forward_backward
from genxai.core.targets import ClassLogit
from genxai.explainers.examples import layer_features, model_device

CavTrainer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``trainer(concept_acts, random_acts) -> (D,) CAV`` pointing toward the concept."""


def check_concept(images: torch.Tensor | None, name: str) -> torch.Tensor:
    """A concept set as a non-empty (N, C, H, W) tensor; the error names the set."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor of images, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(
            f"{name}: the concept set is empty or not (N, C, H, W) images (shape {tuple(images.shape)})"
        )
    return images


def train_cav(
    concept: torch.Tensor, random: torch.Tensor, *, l2: float = 0.01, iterations: int = 100
) -> torch.Tensor:
    """The unit normal of an L2-regularised logistic regression, concept (label 1) vs random (0).

    Features are standardised with the pooled mean and scale for conditioning; the returned vector
    is mapped back to the raw activation space (so it is the classifier's normal there).
    """
    x = torch.cat([concept, random]).float()
    y = torch.cat([torch.ones(len(concept)), torch.zeros(len(random))]).to(x.device)
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / scale
    w = torch.zeros(z.shape[1], device=x.device, requires_grad=True)
    b = torch.zeros((), device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * w.pow(2).sum() / 2
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    cav = w.detach() / scale
    return cav / cav.norm().clamp_min(1e-12)


def directional_derivatives(
    model: nn.Module,
    images: torch.Tensor,
    layer: str,
    target: int,
    cavs: torch.Tensor,
    *,
    batch_size: int = 64,
) -> torch.Tensor:
    """(N, K): ``d logit_target / d layer . cav_k`` for each image and each of the K CAVs (K, D)."""
    check_positive_int(batch_size, "batch_size")
    device = model_device(model)
    cavs = cavs.to(device).float()
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        grads = forward_backward(model, x, ClassLogit(target), layers=[layer], input_grad=False)
        out.append(grads.gradients[layer].flatten(1).float() @ cavs.T)
    return torch.cat(out)


def ttest_pvalue(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sided Welch t-test p-value of the means of ``a`` and ``b`` (scipy's ``ttest_ind``)."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        raise ValueError("random_sets: the t-test needs at least two random sets")
    if float(a.std()) == 0 and float(b.std()) == 0:
        return 1.0 if float(a.mean()) == float(b.mean()) else 0.0
    with warnings.catch_warnings():  # one constant group (all scores 1) is a valid input, not a loss
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a.double().numpy(), b.double().numpy(), equal_var=False).pvalue)


@dataclass
class ConceptResult:
    """One concept's TCAV scores (one per random set), the random-CAV scores and the test."""

    name: str
    scores: torch.Tensor
    random_scores: torch.Tensor
    pvalue: float
    significant: bool
    cav_accuracy: list[float] = field(default_factory=list)

    @property
    def score(self) -> float:
        return float(self.scores.mean())

    def record(self) -> dict:
        return {
            "concept": self.name,
            "tcav": self.score,
            "tcav_std": float(self.scores.std()) if len(self.scores) > 1 else 0.0,
            "random_tcav": float(self.random_scores.mean()),
            "random_tcav_std": float(self.random_scores.std()) if len(self.random_scores) > 1 else 0.0,
            "p_value": self.pvalue,
            "significant": self.significant,
            "cav_accuracy": sum(self.cav_accuracy) / max(1, len(self.cav_accuracy)),
        }


def _accuracy(cav: torch.Tensor, concept: torch.Tensor, random: torch.Tensor) -> float:
    """Training accuracy of the CAV's direction with the best threshold halfway between the means."""
    pc, pr = concept @ cav, random @ cav
    cut = (pc.mean() + pr.mean()) / 2
    return float(((pc > cut).float().sum() + (pr <= cut).float().sum()) / (len(pc) + len(pr)))


class TCAV:
    """TCAV for a classifier at one layer.

    Args:
        model: the classifier (eval mode).
        layer: dotted name of the layer whose activations hold the concepts.
        random_sets: R random image sets (each (N, C, H, W)); R >= 2 for the significance test.
        alpha: the test's level before Bonferroni's correction.
        cav_trainer: ``(concept_acts, random_acts) -> CAV`` (default: :func:`train_cav`).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        random_sets: Sequence[torch.Tensor],
        *,
        alpha: float = 0.05,
        cav_trainer: CavTrainer | None = None,
        batch_size: int = 64,
    ) -> None:
        check_in_range(alpha, "alpha", 0.0, 1.0, closed=False)
        if len(random_sets) < 2:
            raise ValueError(
                f"random_sets: the significance test needs at least 2 random sets, got {len(random_sets)}"
            )
        self.model, self.layer, self.alpha, self.batch_size = model, layer, alpha, batch_size
        self.cav_trainer = cav_trainer or train_cav
        self.random_acts = [
            self.activations(check_concept(r, f"random_sets[{i}]")) for i, r in enumerate(random_sets)
        ]
        self._random_cavs: torch.Tensor | None = None

    def activations(self, images: torch.Tensor) -> torch.Tensor:
        """(N, D) flattened activations of ``layer`` (the space the CAVs live in)."""
        return layer_features(self.model, images, self.layer, pool="flatten", batch_size=self.batch_size)

    def concept_cavs(self, images: torch.Tensor, name: str = "concept") -> tuple[torch.Tensor, list[float]]:
        """(R, D) CAVs of the concept against each random set, and each CAV's training accuracy."""
        acts = self.activations(check_concept(images, name))
        cavs = [self.cav_trainer(acts, r) for r in self.random_acts]
        return torch.stack(cavs), [_accuracy(c, acts, r) for c, r in zip(cavs, self.random_acts)]

    def random_cavs(self) -> torch.Tensor:
        """(R, D) null CAVs: random set i against random set i + 1 (cyclically)."""
        if self._random_cavs is None:
            r = self.random_acts
            self._random_cavs = torch.stack(
                [self.cav_trainer(r[i], r[(i + 1) % len(r)]) for i in range(len(r))]
            )
        return self._random_cavs

    def scores(self, images: torch.Tensor, target: int, cavs: torch.Tensor) -> torch.Tensor:
        """(K,) TCAV scores: the fraction of ``images`` whose derivative along each CAV is positive."""
        derivatives = directional_derivatives(
            self.model, images, self.layer, target, cavs, batch_size=self.batch_size
        )
        return (derivatives > 0).float().mean(0).cpu()

    def interpret(
        self, images: torch.Tensor, target: int, concepts: dict[str, torch.Tensor]
    ) -> list[ConceptResult]:
        """TCAV of each named concept set for class ``target`` on ``images`` (inputs of that class)."""
        if not concepts:
            raise ValueError("concepts: no concept sets given")
        check_concept(images, "images")
        classes = _classes(self.model, images[:1])
        if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < classes:
            raise ValueError(f"target: unknown class {target!r}; the model has classes 0..{classes - 1}")
        trained = [self.concept_cavs(c, f"concepts[{name!r}]") for name, c in concepts.items()]
        # every CAV (random ones first) scored in one pass of gradients over the images
        every = self.scores(images, target, torch.cat([self.random_cavs(), *[cavs for cavs, _ in trained]]))
        r = len(self.random_acts)
        random_scores = every[:r]
        level = self.alpha / len(concepts)  # Bonferroni over the concepts tested
        results = []
        for k, (name, (_, accuracy)) in enumerate(zip(concepts, trained)):
            scores = every[r * (k + 1) : r * (k + 2)]
            pvalue = ttest_pvalue(scores, random_scores)
            results.append(ConceptResult(name, scores, random_scores, pvalue, pvalue < level, accuracy))
        return results


def _classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        out = model(x.to(model_device(model)))
    return int(out.shape[1]) if out.ndim == 2 else 1
