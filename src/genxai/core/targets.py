"""Targets: what score of the model an explanation explains, one number per image.

A target maps the model's output (or, with ``layer`` set, a named layer's output) to a (N,) score.
Every method accepts ``target`` as an int (class index), a (N,) tensor of class indices, a callable
``output -> (N,)`` or one of the objects below; :func:`as_target` turns any of these into a Target.

Two hooks let perturbation methods reuse a target on many perturbed copies of each image:
``bind(clean_output)`` fixes choices that depend on the clean image (the predicted class), and
``take(index)`` returns the target for rows whose source image is ``index``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


class Target:
    """Base class: ``__call__(output) -> (N,)`` scores. ``layer``: score that layer's output instead."""

    layer: str | None = None

    def __call__(self, output: Any) -> torch.Tensor:
        raise NotImplementedError

    def bind(self, output: Any) -> Target:
        """The target with data-dependent choices fixed on the clean output (default: unchanged)."""
        return self

    def take(self, index: torch.Tensor) -> Target:
        """The target for rows coming from images ``index`` (default: unchanged)."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _logits(output: Any, who: str) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"target: {who} needs a tensor output, got {type(output).__name__}; "
            "wrap it in genxai.targets.Select(key, ...) to pick one output of a tuple/dict"
        )
    return output


def _is_single_logit(output: torch.Tensor) -> bool:
    return output.ndim == 1 or (output.ndim == 2 and output.shape[1] == 1)


class ClassLogit(Target):
    """The pre-softmax score of class ``index`` (an int, or a (N,) tensor of one class per image)."""

    def __init__(self, index: int | torch.Tensor) -> None:
        if isinstance(index, torch.Tensor):
            if index.is_floating_point() or index.ndim > 1:
                raise TypeError(
                    f"target: expected an int or a (N,) integer tensor, got {index.dtype} {tuple(index.shape)}"
                )
            if index.ndim == 0:
                index = int(index)
        elif isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"target: expected an int class index, got {type(index).__name__}")
        self.index = index

    def __call__(self, output: Any) -> torch.Tensor:
        output = self._check(output)
        if isinstance(self.index, int):
            return output[:, self.index]
        return output.gather(1, self.index.to(output.device).long()[:, None])[:, 0]

    def _check(self, output: Any) -> torch.Tensor:
        """``output`` as (N, classes) logits that the class indices fit (count and range)."""
        output = _logits(output, type(self).__name__)
        if output.ndim != 2:
            raise ValueError(
                f"target: {type(self).__name__} expects (N, classes) outputs, got shape "
                f"{tuple(output.shape)}; for a single-logit discriminator use "
                "genxai.targets.DiscriminatorScore()"
            )
        n, classes = output.shape
        if isinstance(self.index, int):
            if not 0 <= self.index < classes:
                raise ValueError(f"target: class {self.index} out of range [0, {classes})")
            return output
        index = self.index
        if index.shape[0] != n:
            raise ValueError(f"target: expected {n} class indices (one per image), got {index.shape[0]}")
        if bool((index < 0).any()) or bool((index >= classes).any()):
            raise ValueError(f"target: class indices out of range [0, {classes}): {index.tolist()}")
        return output

    def bind(self, output: Any) -> Target:
        """Checked once on the clean output, so an error lists the classes given for the images
        (not those of the copies a method derives from them)."""
        self._check(output)
        return self

    def take(self, index: torch.Tensor) -> Target:
        if isinstance(self.index, int):
            return self
        return ClassLogit(self.index.to(index.device)[index])

    def __repr__(self) -> str:
        idx = self.index if isinstance(self.index, int) else self.index.tolist()
        return f"ClassLogit({idx})"


class ClassProbability(ClassLogit):
    """The probability of class ``index`` (use for metrics defined on probabilities): the softmax over
    the classes, or for a single-logit (N, 1) output the sigmoid of that logit (a softmax over one
    column would be 1 for every image)."""

    def __call__(self, output: Any) -> torch.Tensor:
        output = _logits(output, "ClassProbability")
        if output.ndim == 2 and output.shape[1] == 1:
            return torch.sigmoid(super().__call__(output.float()))
        return super().__call__(F.softmax(output.float(), dim=1))

    def take(self, index: torch.Tensor) -> Target:
        if isinstance(self.index, int):
            return self
        return ClassProbability(self.index.to(index.device)[index])


class DiscriminatorScore(Target):
    """A single-logit output, (N,) or (N, 1): the "real" logit, or with ``sign=-1`` the fake score."""

    def __init__(self, sign: float = 1.0) -> None:
        self.sign = float(sign)

    def __call__(self, output: Any) -> torch.Tensor:
        output = _logits(output, type(self).__name__)
        if not _is_single_logit(output):
            raise ValueError(
                f"target: {type(self).__name__} expects a single logit per image, (N,) or (N, 1), "
                f"got shape {tuple(output.shape)}; for classifiers pass a class index"
            )
        return self.sign * output.reshape(-1)

    def __repr__(self) -> str:
        return "Fake()" if self.sign < 0 else "DiscriminatorScore()"


class Fake(DiscriminatorScore):
    """How strongly a discriminator calls the image fake: ``-logit``."""

    def __init__(self) -> None:
        super().__init__(sign=-1.0)


class Sigmoid(Target):
    """The sigmoid of another target's score: a single-logit model's probability."""

    def __init__(self, inner: Target) -> None:
        if not isinstance(inner, Target):
            raise TypeError(f"inner: expected a Target, got {type(inner).__name__}")
        self.inner = inner
        self.layer = inner.layer

    def __call__(self, output: Any) -> torch.Tensor:
        return torch.sigmoid(self.inner(output).float())

    def take(self, index: torch.Tensor) -> Target:
        return Sigmoid(self.inner.take(index))

    def __repr__(self) -> str:
        return f"Sigmoid({self.inner!r})"


def probability_target(target: Target) -> Target:
    """The probability version of a bound class or discriminator target, decided here only.

    A class (:class:`ClassLogit`) becomes :class:`ClassProbability`: the softmax over the classes,
    or the sigmoid of the logit when the output has one column. A discriminator score (``Fake``
    included) becomes its :class:`Sigmoid`. Anything else raises ValueError.
    """
    if isinstance(target, (ClassProbability, Sigmoid)):
        return target
    if isinstance(target, ClassLogit):
        return ClassProbability(target.index)
    if isinstance(target, DiscriminatorScore):
        return Sigmoid(target)
    if isinstance(target, Select):
        return Select(target.key, probability_target(target.target))
    raise ValueError(
        f"score: 'probability' needs a class index or a discriminator target, got {target!r}; "
        "pass score='logit' to use this target's score as it is"
    )


class Predicted(Target):
    """The class the model predicts for the clean image (or the logit of a single-logit model)."""

    def __call__(self, output: Any) -> torch.Tensor:
        return self.bind(output)(output)

    def bind(self, output: Any) -> Target:
        output = _logits(output, "the default target")
        if _is_single_logit(output):
            return DiscriminatorScore()
        if output.ndim != 2:
            raise ValueError(
                f"target: cannot choose a default for output shape {tuple(output.shape)}; pass a callable "
                "target output -> (N,) scores"
            )
        return ClassLogit(output.detach().argmax(dim=1))


class UnitActivation(Target):
    """Mean activation of channel ``unit`` of ``layer``, optionally inside a spatial ``mask``.

    ``mask``: (H, W) or (N, H, W), any resolution (resized to the layer's, nearest); its weights
    average the activation, so a binary mask scores the unit inside a region.
    """

    def __init__(self, layer: str, unit: int, mask: torch.Tensor | None = None) -> None:
        if not isinstance(layer, str):
            raise TypeError(f"target: UnitActivation needs a dotted layer name, got {type(layer).__name__}")
        self.layer = layer
        self.unit = unit
        self.mask = mask

    def __call__(self, output: Any) -> torch.Tensor:
        activation = _logits(output, "UnitActivation")
        if activation.ndim < 2 or not 0 <= self.unit < activation.shape[1]:
            raise ValueError(
                f"target: unit {self.unit} out of range for layer {self.layer!r} with output shape "
                f"{tuple(activation.shape)}"
            )
        unit = activation[:, self.unit]
        if unit.ndim == 1:
            return unit
        unit = unit.flatten(2) if unit.ndim > 3 else unit
        if self.mask is None:
            return unit.flatten(1).mean(dim=1)
        mask = self.mask.to(unit.device, torch.float32)
        mask = mask.expand(unit.shape[0], *mask.shape[-2:]) if mask.ndim == 2 else mask
        if mask.shape[0] != unit.shape[0]:
            raise ValueError(f"target: mask has {mask.shape[0]} images, the batch has {unit.shape[0]}")
        mask = F.interpolate(mask[:, None], size=unit.shape[-2:], mode="nearest")[:, 0]
        total = mask.flatten(1).sum(dim=1).clamp_min(1e-12)
        return (unit * mask).flatten(1).sum(dim=1) / total

    def take(self, index: torch.Tensor) -> Target:
        if self.mask is None or self.mask.ndim == 2:
            return self
        return UnitActivation(self.layer, self.unit, self.mask.to(index.device)[index])

    def __repr__(self) -> str:
        return f"UnitActivation({self.layer!r}, {self.unit})"


class Select(Target):
    """Explain one output of a model that returns a tuple, list or dict: ``Select("logits", 3)``."""

    def __init__(self, key: int | str, target: Any = None) -> None:
        self.key = key
        self.target = as_target(target)
        self.layer = self.target.layer

    def _pick(self, output: Any) -> Any:
        try:
            return output[self.key]
        except (KeyError, IndexError, TypeError) as err:
            keys = list(output.keys()) if isinstance(output, dict) else f"0..{len(output) - 1}"
            raise ValueError(
                f"target: Select key {self.key!r} not in the model output (keys: {keys})"
            ) from err

    def __call__(self, output: Any) -> torch.Tensor:
        return self.target(self._pick(output))

    def bind(self, output: Any) -> Target:
        return Select(self.key, self.target.bind(self._pick(output)))

    def take(self, index: torch.Tensor) -> Target:
        return Select(self.key, self.target.take(index))

    def __repr__(self) -> str:
        return f"Select({self.key!r}, {self.target!r})"


class FunctionTarget(Target):
    """A user callable ``output -> (N,)``."""

    def __init__(self, fn: Callable[[Any], torch.Tensor]) -> None:
        self.fn = fn

    def __call__(self, output: Any) -> torch.Tensor:
        return self.fn(output)

    def __repr__(self) -> str:
        return f"FunctionTarget({getattr(self.fn, '__name__', self.fn)!r})"


def as_target(target: Any) -> Target:
    """Normalise what users pass as ``target`` into a :class:`Target`."""
    if target is None:
        return Predicted()
    if isinstance(target, Target):
        return target
    if isinstance(target, bool):
        raise TypeError(
            "target: expected an int class index, a (N,) tensor, a callable or a Target, got bool"
        )
    if isinstance(target, int):
        return ClassLogit(target)
    if isinstance(target, torch.Tensor):
        return ClassLogit(target)
    if isinstance(target, (list, tuple)) and all(isinstance(t, int) for t in target):
        return ClassLogit(torch.tensor(target))
    if callable(target):
        return FunctionTarget(target)
    raise TypeError(
        f"target: expected an int class index, a (N,) tensor, a callable or a Target, got {type(target).__name__}"
    )


def evaluate(target: Target, output: Any, n: int) -> torch.Tensor:
    """Apply ``target`` and check it gives one finite score per image."""
    if isinstance(output, (tuple, list, dict)) and not isinstance(target, (Select, FunctionTarget)):
        kind = "dict" if isinstance(output, dict) else "tuple"
        raise TypeError(
            f"target: the model returned a {kind}; choose the output to explain with "
            f"genxai.targets.Select(key, target)"
        )
    scores = target(output)
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"target: {target!r} must return a tensor of scores, got {type(scores).__name__}")
    if scores.ndim == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if scores.shape != (n,):
        raise ValueError(
            f"target: {target!r} must return one score per image, shape ({n},), got {tuple(scores.shape)}"
        )
    return scores


def bind_target(
    model: torch.nn.Module, x: torch.Tensor, target: Target, autocast: torch.dtype | None = None
) -> tuple[Target, torch.Tensor]:
    """``target`` bound on the clean output of ``model(x)``, and the clean scores (N,) in float32.

    Methods that score many perturbed copies of ``x`` (occlusion, RISE, LIME, KernelSHAP) call this
    first, so the explained class stays the one predicted for the clean image.
    """
    from genxai.core.engine import model_output  # the engine imports this module

    if target.layer is not None:
        raise ValueError(
            f"target: {target!r} scores a layer; perturbation methods explain the model's output "
            "(pass a class index, a callable or an output target)"
        )
    output = model_output(model, x, autocast)
    target = target.bind(output)
    return target, evaluate(target, output, x.shape[0]).float()
