"""LRP rules: how one layer hands the relevance of its outputs ``R_out`` to its inputs ``a``.

Every rule is one generic step (Bach et al., 2015; Montavon et al., 2019) with its own choice of
modified inputs and parameters (the *terms*)::

    z   = sum_t layer(x_t; weight_t, bias_t)       # x_t, weight_t, bias_t: modified a, W, b
    s   = R_out / stabilize(z)
    R_in = sum_t x_t * d z / d x_t . s              # a gradient: one autograd call

Flat and WSquare use ``x_t = 1``, so there the product with the input drops out. AlphaBeta and
Gamma run the step twice (positive and negative parts) and combine the results.

A rule is attached to a module by :func:`attach` (a context manager): the module's ``forward``
is replaced (through :class:`genxai.core.patching.Patch`) by one that runs the original forward
inside a ``torch.autograd.Function`` whose backward applies the rule, so the gradient that flows
backward *is* the relevance. Nothing else of the module changes and leaving the context restores
``forward`` exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from genxai.core.checks import check_in_range
from genxai.core.patching import Patch

Modifier = Callable[[torch.Tensor], torch.Tensor]

CONVOLUTIONS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
DENSE = (nn.Linear,)
# Layers whose weight and bias a rule may rewrite (the linear maps LRP's rules are defined on).
LINEAR_LAYERS = DENSE + CONVOLUTIONS


def stabilize(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``z`` moved away from zero by ``epsilon`` along its sign (0 counts as positive): a safe divisor."""
    sign = (z >= 0).to(z) * 2 - 1
    return z + sign * epsilon


# --- parameter modifiers ------------------------------------------------------------------------


def keep(p: torch.Tensor) -> torch.Tensor:
    return p


def zero(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p)


def ones(p: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(p)


def positive(p: torch.Tensor) -> torch.Tensor:
    return p.clamp(min=0)


def negative(p: torch.Tensor) -> torch.Tensor:
    return p.clamp(max=0)


def square(p: torch.Tensor) -> torch.Tensor:
    return p * p


def minus_positive(p: torch.Tensor) -> torch.Tensor:
    return -p.clamp(min=0)


def minus_negative(p: torch.Tensor) -> torch.Tensor:
    return -p.clamp(max=0)


# --- what a rule sees of a layer ----------------------------------------------------------------


def linear_map(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The linear map of a Linear/Conv/ConvTranspose ``module`` with the given weight and bias."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[len(module.kernel_size) - 1]
        return conv(
            x,
            weight,
            bias,
            module.stride,
            module.padding,
            module.output_padding,
            module.groups,
            module.dilation,
        )
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module._conv_forward(x, weight, bias)
    raise TypeError(f"rule: cannot modify the parameters of a {type(module).__name__}")


class Layer:
    """A module as a rule uses it: ``layer(x)`` is its own forward; ``layer(x, weight=positive,
    bias=zero)`` the same linear map with modified parameters (weight and bias as at forward time)."""

    def __init__(self, module: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.module = module
        self.forward = forward
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        self.weight = weight.detach() if isinstance(weight, torch.Tensor) else None
        self.bias = bias.detach() if isinstance(bias, torch.Tensor) else None

    def __call__(self, x: torch.Tensor, weight: Modifier = keep, bias: Modifier = keep) -> torch.Tensor:
        if not isinstance(self.module, LINEAR_LAYERS) or self.weight is None:
            if weight is not keep or bias is not keep:
                raise TypeError(f"rule: cannot modify the parameters of a {type(self.module).__name__}")
            return self.forward(x)
        new_bias = None if self.bias is None else bias(self.bias)
        return linear_map(self.module, x, weight(self.weight), new_bias)


class Term(NamedTuple):
    """One summand of a rule's ``z``: an input and how weight and bias are modified for it."""

    input: torch.Tensor
    weight: Modifier = keep
    bias: Modifier = keep


def redistribute(layer: Layer, terms: list[Term], relevance: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The generic LRP step: ``sum_t x_t * dz/dx_t . (R / stabilize(z))`` with ``z = sum_t layer(x_t)``."""
    inputs = [term.input.detach().requires_grad_(True) for term in terms]
    with torch.enable_grad():
        z = sum(layer(x, term.weight, term.bias) for x, term in zip(inputs, terms))
    s = (relevance / stabilize(z.detach(), epsilon)).to(z.dtype)
    grads = torch.autograd.grad(z, inputs, s)
    return sum(x.detach() * g for x, g in zip(inputs, grads))


# --- the rules ----------------------------------------------------------------------------------


class Rule:
    """Base class: subclasses state their :meth:`terms` (or override :meth:`relevance`).

    ``stabilizer``: the epsilon of :func:`stabilize` (only guards against division by zero).
    ``modifies_params``: the rule rewrites weight/bias, so it needs a Linear/Conv layer.
    """

    modifies_params: ClassVar[bool] = True
    uses_input: ClassVar[bool] = True

    def __init__(self, stabilizer: float = 1e-6) -> None:
        self.epsilon = check_in_range(stabilizer, "stabilizer", 0.0, float("inf"))

    def terms(self, a: torch.Tensor) -> list[Term]:
        raise NotImplementedError

    def relevance(self, layer: Layer, a: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        """Relevance of the layer's input ``a`` given the relevance of its output."""
        return redistribute(layer, self.terms(a), relevance, self.epsilon)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Epsilon(Rule):
    """LRP-epsilon: ``z = W a + b`` stabilised by ``epsilon`` (``epsilon=0`` is LRP-0)."""

    modifies_params = False

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = check_in_range(epsilon, "epsilon", 0.0, float("inf"))

    def terms(self, a: torch.Tensor) -> list[Term]:
        return [Term(a)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.epsilon:g})"


class Norm(Epsilon):
    """Epsilon with ``epsilon`` only as a stabiliser, for layers without parameters: average pooling
    and sums redistribute relevance in proportion to each input's share of the output."""

    def __init__(self, stabilizer: float = 1e-6) -> None:
        Rule.__init__(self, stabilizer)


class AlphaBeta(Rule):
    """LRP-alpha-beta: ``alpha`` times the positive contributions minus ``beta`` times the negative
    ones, each part normalised on its own (``alpha - beta = 1`` keeps relevance conserved)."""

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6) -> None:
        super().__init__(stabilizer)
        if not (alpha >= 0 and beta >= 0 and abs(alpha - beta - 1.0) < 1e-12):
            raise ValueError(
                f"alpha, beta: expected alpha >= 0, beta >= 0, alpha - beta = 1, got {alpha}, {beta}"
            )
        self.alpha, self.beta = float(alpha), float(beta)

    def relevance(self, layer: Layer, a: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        pos, neg = a.clamp(min=0), a.clamp(max=0)
        excite = [Term(pos, positive, positive), Term(neg, negative, zero)]
        result = self.alpha * redistribute(layer, excite, relevance, self.epsilon)
        if self.beta:
            inhibit = [Term(pos, negative, negative), Term(neg, positive, zero)]
            result = result - self.beta * redistribute(layer, inhibit, relevance, self.epsilon)
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.alpha:g}, {self.beta:g})"


class ZPlus(AlphaBeta):
    """LRP-z+: only positive contributions (alpha=1, beta=0; deep Taylor for ReLU layers)."""

    def __init__(self, stabilizer: float = 1e-6) -> None:
        super().__init__(alpha=1.0, beta=0.0, stabilizer=stabilizer)

    def __repr__(self) -> str:
        return "ZPlus()"


class Gamma(Rule):
    """LRP-gamma (generalised): positive contributions boosted by ``gamma`` where the output is
    positive, negative ones where it is negative."""

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6) -> None:
        super().__init__(stabilizer)
        self.gamma = check_in_range(gamma, "gamma", 0.0, float("inf"))

    def relevance(self, layer: Layer, a: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma

        def boost_positive(p: torch.Tensor) -> torch.Tensor:
            return p + gamma * p.clamp(min=0)

        def boost_negative(p: torch.Tensor) -> torch.Tensor:
            return p + gamma * p.clamp(max=0)

        z = layer(a)
        pos, neg = a.clamp(min=0), a.clamp(max=0)
        rising = [Term(pos, boost_positive, boost_positive), Term(neg, boost_negative, zero)]
        falling = [Term(pos, boost_negative, boost_negative), Term(neg, boost_positive, zero)]
        return redistribute(layer, rising, relevance * (z > 0), self.epsilon) + redistribute(
            layer, falling, relevance * (z < 0), self.epsilon
        )

    def __repr__(self) -> str:
        return f"Gamma({self.gamma:g})"


class Flat(Rule):
    """LRP-flat: every input in a neuron's receptive field gets an equal share (weights = 1, no bias)."""

    def terms(self, a: torch.Tensor) -> list[Term]:
        return [Term(torch.ones_like(a), ones, zero)]


class WSquare(Rule):
    """LRP-w^2 (Montavon et al., 2017): shares proportional to the squared weights (bias ignored)."""

    def terms(self, a: torch.Tensor) -> list[Term]:
        return [Term(torch.ones_like(a), square, zero)]


class ZBox(Rule):
    """LRP-z^B for the input layer, with pixels bounded in ``[low, high]`` (floats or tensors that
    broadcast to the input, e.g. per channel (1, C, 1, 1)). The bias cancels out of ``z``."""

    def __init__(
        self, low: float | torch.Tensor, high: float | torch.Tensor, stabilizer: float = 1e-6
    ) -> None:
        super().__init__(stabilizer)
        for name, bound in (("low", low), ("high", high)):
            if not isinstance(bound, (int, float, torch.Tensor)) or isinstance(bound, bool):
                raise TypeError(f"{name}: expected a number or a tensor, got {type(bound).__name__}")
        self.low, self.high = low, high

    def _bound(self, value: float | torch.Tensor, a: torch.Tensor, name: str) -> torch.Tensor:
        bound = torch.as_tensor(value).to(a)
        try:
            return torch.broadcast_to(bound, a.shape).clone()
        except RuntimeError as err:
            raise ValueError(
                f"{name}: shape {tuple(bound.shape)} does not broadcast to the layer input {tuple(a.shape)}"
            ) from err

    def terms(self, a: torch.Tensor) -> list[Term]:
        low, high = self._bound(self.low, a, "low"), self._bound(self.high, a, "high")
        return [Term(a, keep, zero), Term(low, minus_positive, zero), Term(high, minus_negative, zero)]

    def __repr__(self) -> str:
        return "ZBox()"


class Pass(Rule):
    """Relevance passes through unchanged (element-wise activations: ReLU, LeakyReLU, Tanh, ...)."""

    modifies_params = False
    uses_input = False

    def __init__(self) -> None:
        super().__init__()

    def relevance(self, layer: Layer, a: torch.Tensor | None, relevance: torch.Tensor) -> torch.Tensor:
        return relevance


# --- attaching a rule to a module ---------------------------------------------------------------


class _RuleFunction(torch.autograd.Function):
    """Forward: the module's original forward. Backward: the rule's relevance instead of the gradient."""

    @staticmethod
    def forward(ctx: Any, forward: RuleForward, x: torch.Tensor) -> torch.Tensor:
        # An in-place module (ReLU(inplace=True)) must not overwrite the input we keep.
        inputs = x.clone() if getattr(forward.module, "inplace", False) else x
        output = forward.original(inputs)
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"composite: the rule on {forward.name!r} needs a module returning one tensor, "
                f"got {type(output).__name__}"
            )
        if isinstance(forward.rule, Pass) and output.shape != x.shape:
            raise ValueError(
                f"composite: Pass on {forward.name!r} needs an element-wise module, but it maps "
                f"{tuple(x.shape)} to {tuple(output.shape)}"
            )
        ctx.rule = forward.rule
        ctx.layer = Layer(forward.module, forward.original)
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        if forward.rule.uses_input:
            ctx.save_for_backward(x)
        return output.clone() if output is x else output

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[None, torch.Tensor]:
        if not ctx.rule.uses_input:
            return None, ctx.rule.relevance(ctx.layer, None, relevance)
        (x,) = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            result = ctx.rule.relevance(ctx.layer, x, relevance)
        return None, result.to(x.dtype)


class RuleForward:
    """Stands in for ``module.forward`` while a rule is attached: same output, rule-made backward."""

    def __init__(self, module: nn.Module, rule: Rule, name: str = "") -> None:
        self.module = module
        self.rule = rule
        self.name = name or type(module).__name__
        self.original = module.forward

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
            raise TypeError(
                f"composite: {self.rule!r} on {self.name!r} needs the module called with a single tensor, "
                f"got {len(args)} positional and {len(kwargs)} keyword arguments"
            )
        return _RuleFunction.apply(self, args[0])


@contextmanager
def attach(module: nn.Module, rule: Rule, name: str = "") -> Iterator[nn.Module]:
    """Apply ``rule`` to ``module`` inside the context; the module is restored however it is left."""
    if not isinstance(rule, Rule):
        raise TypeError(
            f"composite: expected an LRP Rule for {name or type(module).__name__!r}, got {rule!r}"
        )
    if rule.modifies_params and not isinstance(module, LINEAR_LAYERS):
        raise TypeError(
            f"composite: {rule!r} rewrites weights and biases, so it needs a Linear, Conv or ConvTranspose "
            f"layer; {name or 'the module'!r} is a {type(module).__name__}"
        )
    with Patch() as patch:
        patch.forward(module, RuleForward(module, rule, name))
        yield module
