"""Gradient methods: Saliency, SmoothGrad, Input x Gradient, Integrated Gradients.

All return maps of the input's shape (N, C, H, W). SmoothGrad and Integrated Gradients evaluate
many copies of each image; they run ``internal_batch_size`` rows per forward/backward so memory
stays bounded, with per-image targets following their image.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from genxai.attribution.base import Attribution, register
from genxai.core.checks import baseline_like, check_choice, check_in_range, check_positive_int
from genxai.core.engine import forward_backward, model_output
from genxai.core.targets import Target


def _input_gradient(attribution: Attribution, x: torch.Tensor, target: Target) -> torch.Tensor:
    return forward_backward(attribution.model, x, target, autocast=attribution.autocast).input_grad


@register("saliency", "gradient", "vanilla")
class Saliency(Attribution):
    """|d score / d x| (Simonyan et al., 2013). ``abs=False`` keeps the signed gradient."""

    def __init__(self, model: nn.Module, *, abs: bool = True, **kwargs):
        super().__init__(model, **kwargs)
        self.abs = abs

    def attribute(self, x: torch.Tensor, target: Target) -> torch.Tensor:
        grad = _input_gradient(self, x, target)
        return grad.abs() if self.abs else grad


@register("inputxgradient", "input_x_gradient", "gradientxinput")
class InputXGradient(Attribution):
    """x * d score / d x (Shrikumar et al., 2016)."""

    def attribute(self, x: torch.Tensor, target: Target) -> torch.Tensor:
        return x * _input_gradient(self, x, target)


def _repeated_gradients(
    attribution: Attribution,
    x: torch.Tensor,
    target: Target,
    copies: int,
    make_rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    row_weights: torch.Tensor,
    batch_size: int,
    square: bool = False,
) -> torch.Tensor:
    """Sum over k of ``row_weights[k] * grad(make_rows(image, k))`` for each image, in chunks.

    ``square``: accumulate squared gradients instead (SmoothGrad-Squared).

    Row r of the virtual (N * copies) batch is copy ``r % copies`` of image ``r // copies``;
    ``make_rows(image_index, copy_index)`` builds the inputs of a chunk of rows.
    """
    n = x.shape[0]
    total = n * copies
    out = torch.zeros_like(x, dtype=torch.float32)
    for start in range(0, total, batch_size):
        rows = torch.arange(start, min(start + batch_size, total), device=x.device)
        image, copy = rows // copies, rows % copies
        grad = forward_backward(
            attribution.model, make_rows(image, copy), target.take(image), autocast=attribution.autocast
        ).input_grad.float()
        weights = row_weights.to(x.device)[copy].view(-1, 1, 1, 1)
        out.index_add_(0, image, (grad.square() if square else grad) * weights)
        del grad  # not alive during the next chunk's forward: peak memory is one chunk's
    return out


@register("smoothgrad", "smooth_grad")
class SmoothGrad(Attribution):
    """Mean gradient over noisy copies (Smilkov et al., 2017).

    Args:
        samples: noisy copies per image.
        sigma: noise std as a fraction of each image's value range (the paper's 10-20%).
        squared: average squared gradients (SmoothGrad-Squared) instead of gradients.
        abs: return the magnitude of the averaged gradient (as Saliency does).
        internal_batch_size: rows per forward/backward.
        seed: seed of the noise (None: the global generator).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        samples: int = 25,
        sigma: float = 0.15,
        squared: bool = False,
        abs: bool = True,
        internal_batch_size: int = 64,
        seed: int | None = 0,
        **kwargs,
    ):
        super().__init__(model, **kwargs)
        self.samples = check_positive_int(samples, "samples")
        self.sigma = check_in_range(sigma, "sigma", 0.0, 10.0)
        self.squared = squared
        self.abs = abs
        self.internal_batch_size = check_positive_int(internal_batch_size, "internal_batch_size")
        self.seed = seed

    def attribute(self, x: torch.Tensor, target: Target) -> torch.Tensor:
        target = target.bind(model_output(self.model, x, self.autocast))
        n = x.shape[0]
        span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).clamp_min(1e-6)
        std = (self.sigma * span).view(-1, 1, 1, 1)
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=x.device).manual_seed(self.seed)
        noise = torch.randn(
            (n * self.samples, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype
        )

        def make_rows(image: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
            return x[image] + std[image] * noise[image * self.samples + copy]

        weights = torch.full((self.samples,), 1.0 / self.samples)
        grad = _repeated_gradients(
            self, x, target, self.samples, make_rows, weights, self.internal_batch_size, square=self.squared
        )
        return grad.abs() if self.abs and not self.squared else grad


def integration_points(steps: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Points alpha in [0, 1] and weights of a quadrature rule for the path integral."""
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        alphas, weights = (nodes + 1) / 2, weights / 2
    elif method == "riemann_trapezoid":
        alphas = np.linspace(0.0, 1.0, steps)
        weights = np.full(steps, 1.0 / (steps - 1)) if steps > 1 else np.ones(1)
        if steps > 1:
            weights[0] = weights[-1] = 0.5 / (steps - 1)
    elif method in ("riemann_left", "riemann_right", "riemann_middle"):
        offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[method]
        alphas = (np.arange(steps) + offset) / steps
        weights = np.full(steps, 1.0 / steps)
    else:
        raise ValueError(
            "method: expected 'gausslegendre', 'riemann_trapezoid', 'riemann_left', 'riemann_right' or "
            f"'riemann_middle', got {method!r}"
        )
    return torch.tensor(alphas, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64)


@register("integratedgradients", "ig", "integrated_gradients")
class IntegratedGradients(Attribution):
    """(x - x') * integral of grad along the straight path x' -> x (Sundararajan et al., 2017).

    Completeness: the attributions of an image sum to ``score(x) - score(baseline)`` up to the
    quadrature error (Gauss-Legendre by default, as Captum).

    Args:
        steps: quadrature points per image.
        method: 'gausslegendre' or a Riemann rule ('riemann_trapezoid', 'riemann_left', ...).
        baseline: 0 (default), a float, or a tensor broadcastable to ``x``; per call, ``baseline=``
            overrides it.
        internal_batch_size: rows per forward/backward, so any number of steps fits in memory.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        steps: int = 50,
        method: str = "gausslegendre",
        baseline: float | torch.Tensor = 0.0,
        internal_batch_size: int = 64,
        **kwargs,
    ):
        super().__init__(model, **kwargs)
        self.steps = check_positive_int(steps, "steps")
        self.method = check_choice(
            method,
            "method",
            ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle"),
        )
        self.alphas, self.weights = integration_points(self.steps, method)
        self.baseline = baseline
        self.internal_batch_size = check_positive_int(internal_batch_size, "internal_batch_size")

    def attribute(
        self, x: torch.Tensor, target: Target, baseline: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        base = baseline_like(self.baseline if baseline is None else baseline, x)
        target = target.bind(model_output(self.model, x, self.autocast))
        alphas = self.alphas.to(x.device, x.dtype).view(-1, 1, 1, 1)
        delta = x - base

        def make_rows(image: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
            return base[image] + alphas[step] * delta[image]

        grad = _repeated_gradients(
            self, x, target, self.steps, make_rows, self.weights.float(), self.internal_batch_size
        )
        return delta * grad
