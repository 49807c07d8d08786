"""Composites: which LRP rule each layer of a model gets.

A :class:`Composite` matches every module, in definition order, against

1. ``name_map``: dotted module names -> rules;
2. ``first``: (types, rule) pairs given to the first module of a listed type only (the input layer);
3. ``type_map``: (types, rule) pairs;
4. the defaults (unless ``defaults=False``): activations pass relevance through, average pooling
   and residual sums (:class:`~genxai.attribution.lrp.canonizers.Sum`) use :class:`Norm`,
   BatchNorm passes through (merge it first with a canonizer).

Modules with no rule (MaxPool, Flatten, Dropout, ...) keep their gradient: for MaxPool that is
winner-take-all. ``with composite.context(model) as m:`` applies the composite's canonizers and
rules; leaving the block, however it is left, restores the model exactly. The named composites
follow zennit's definitions, so their results agree with it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from genxai.attribution.lrp.canonizers import Canonizer, Sum, check_canonizers
from genxai.attribution.lrp.rules import (
    CONVOLUTIONS,
    DENSE,
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    Norm,
    Pass,
    Rule,
    ZBox,
    ZPlus,
    attach,
)
from genxai.core.hooks import get_module
from genxai.core.registry import Registry

Types = type | tuple[type, ...]
RuleMap = Mapping[Types, Rule] | Sequence[tuple[Types, Rule]]

ACTIVATIONS = (
    nn.ELU,
    nn.Hardshrink,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Hardswish,
    nn.LeakyReLU,
    nn.LogSigmoid,
    nn.PReLU,
    nn.ReLU,
    nn.ReLU6,
    nn.RReLU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.Sigmoid,
    nn.SiLU,
    nn.Softplus,
    nn.Softshrink,
    nn.Softsign,
    nn.Tanh,
    nn.Tanhshrink,
    nn.Threshold,
)
AVERAGE_POOLS = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def default_map(stabilizer: float = 1e-6) -> list[tuple[Types, Rule]]:
    """Rules every built-in composite shares (as zennit's base layer map)."""
    return [
        (ACTIVATIONS, Pass()),
        ((Sum, *AVERAGE_POOLS), Norm(stabilizer)),
        (BATCH_NORMS, Pass()),
    ]


def _pairs(rule_map: RuleMap | None, name: str) -> list[tuple[Types, Rule]]:
    if rule_map is None:
        return []
    items = list(rule_map.items()) if isinstance(rule_map, Mapping) else list(rule_map)
    for item in items:
        ok = isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Rule)
        types = item[0] if ok else None
        ok = ok and all(isinstance(t, type) for t in (types if isinstance(types, tuple) else (types,)))
        if not ok:
            raise TypeError(
                f"{name}: expected {{module type(s): Rule}} or [(types, Rule), ...], got {item!r}"
            )
    return items


def _lookup(pairs: list[tuple[Types, Rule]], module: nn.Module) -> Rule | None:
    return next((rule for types, rule in pairs if isinstance(module, types)), None)


class Composite:
    """Rules by module name, by first layer, by type, then the defaults (see the module docstring).

    Args:
        type_map: ``{nn.Conv2d: ZPlus(), (nn.Linear,): Epsilon()}`` or a list of (types, rule).
        name_map: ``{"features.0": Flat()}``: dotted names (as ``model.named_modules()``) -> rules.
        first: (types, rule) pairs for the first layer of those types, e.g. ``[(nn.Conv2d, ZBox(0, 1))]``.
        canonizers: applied before the rules, e.g. ``[MergeBatchNorm()]``.
        defaults: also apply :func:`default_map` (Pass for activations and BatchNorm, Norm for
            pooling and Sum).
    """

    def __init__(
        self,
        type_map: RuleMap | None = None,
        name_map: Mapping[str, Rule] | None = None,
        first: RuleMap | None = None,
        canonizers: Sequence[Canonizer] | None = None,
        defaults: bool = True,
    ) -> None:
        self.type_map = _pairs(type_map, "type_map")
        self.first = _pairs(first, "first")
        self.name_map = dict(name_map or {})
        for key, rule in self.name_map.items():
            if not isinstance(key, str) or not isinstance(rule, Rule):
                raise TypeError(f"name_map: expected {{dotted name: Rule}}, got {key!r}: {rule!r}")
        self.canonizers = check_canonizers(canonizers)
        self.defaults = default_map() if defaults else []

    def assign(self, model: nn.Module) -> list[tuple[str, nn.Module, Rule]]:
        """(name, module, rule) for every module of ``model`` that gets a rule."""
        for name in self.name_map:
            try:
                get_module(model, name)
            except ValueError as err:
                raise ValueError(f"name_map: {str(err).removeprefix('layer: ')}") from None
        chosen = []
        first_seen = not self.first
        for name, module in model.named_modules():
            rule = None
            if not first_seen:
                rule = _lookup(self.first, module)
                first_seen = rule is not None
            rule = self.name_map.get(name, rule)
            if rule is None:
                rule = _lookup(self.type_map, module) or _lookup(self.defaults, module)
            if rule is not None:
                chosen.append((name, module, rule))
        return chosen

    @contextmanager
    def context(self, model: nn.Module) -> Iterator[nn.Module]:
        """Canonizers and rules applied to ``model`` inside the block; restored on any exit."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        with ExitStack() as stack:
            for canonizer in self.canonizers:
                stack.enter_context(canonizer.apply(model))
            for name, module, rule in self.assign(model):
                stack.enter_context(attach(module, rule, name))
            yield model

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


COMPOSITES: Registry[type[Composite]] = Registry("LRP composite")


class _EpsilonDense(Composite):
    """Epsilon for dense layers and :meth:`convolution_rule` for convolutions (user ``type_map``
    entries first); :meth:`first_rules` for the first linear or convolutional layer."""

    def __init__(
        self,
        epsilon: float = 1e-6,
        stabilizer: float = 1e-6,
        type_map: RuleMap | None = None,
        canonizers: Sequence[Canonizer] | None = None,
    ) -> None:
        rules = [(CONVOLUTIONS, self.convolution_rule(stabilizer)), (DENSE, Epsilon(epsilon))]
        super().__init__(
            type_map=_pairs(type_map, "type_map") + rules,
            first=self.first_rules(stabilizer),
            canonizers=canonizers,
        )

    def convolution_rule(self, stabilizer: float) -> Rule:
        return ZPlus(stabilizer)

    def first_rules(self, stabilizer: float) -> RuleMap | None:
        return None


@COMPOSITES.register("epsilon-plus")
class EpsilonPlus(_EpsilonDense):
    """z+ for convolutions, epsilon for dense layers."""


@COMPOSITES.register("epsilon-alpha2-beta1")
class EpsilonAlpha2Beta1(_EpsilonDense):
    """alpha=2, beta=1 for convolutions, epsilon for dense layers."""

    def convolution_rule(self, stabilizer: float) -> Rule:
        return AlphaBeta(2.0, 1.0, stabilizer)


@COMPOSITES.register("epsilon-plus-flat")
class EpsilonPlusFlat(_EpsilonDense):
    """Flat for the first linear or convolutional layer, z+ for convolutions, epsilon for dense layers."""

    def first_rules(self, stabilizer: float) -> RuleMap | None:
        return [(CONVOLUTIONS + DENSE, Flat(stabilizer))]


class EpsilonGammaBox(Composite):
    """ZBox for the first convolution (pixels in ``[low, high]``), gamma for the other convolutions,
    epsilon for dense layers (Montavon et al., 2019)."""

    def __init__(
        self,
        low: float | torch.Tensor,
        high: float | torch.Tensor,
        epsilon: float = 1e-6,
        gamma: float = 0.25,
        stabilizer: float = 1e-6,
        type_map: RuleMap | None = None,
        canonizers: Sequence[Canonizer] | None = None,
    ) -> None:
        rules = [(CONVOLUTIONS, Gamma(gamma, stabilizer)), (DENSE, Epsilon(epsilon))]
        super().__init__(
            type_map=_pairs(type_map, "type_map") + rules,
            first=[(CONVOLUTIONS, ZBox(low, high, stabilizer))],
            canonizers=canonizers,
        )


class NameMap(Composite):
    """Rules by dotted module name, e.g. ``NameMap({"features.0": Flat(), "fc": Epsilon()})``;
    other layers fall back to ``type_map`` and the defaults."""

    def __init__(
        self,
        name_map: Mapping[str, Rule],
        type_map: RuleMap | None = None,
        canonizers: Sequence[Canonizer] | None = None,
    ) -> None:
        if not isinstance(name_map, Mapping):
            raise TypeError(f"name_map: expected a dict {{dotted name: Rule}}, got {type(name_map).__name__}")
        super().__init__(type_map=type_map, name_map=name_map, canonizers=canonizers)


def get_composite(composite: Composite | str | None) -> Composite:
    """A composite object, or one built by name ('epsilon-plus', 'epsilon-alpha2-beta1',
    'epsilon-plus-flat'); None gives EpsilonPlus."""
    if composite is None:
        return EpsilonPlus()
    if isinstance(composite, Composite):
        return composite
    if isinstance(composite, str):
        try:
            return COMPOSITES.get(composite)()
        except ValueError as err:
            raise ValueError(f"composite: {err}") from None
    raise TypeError(f"composite: expected a Composite or a composite name, got {type(composite).__name__}")
