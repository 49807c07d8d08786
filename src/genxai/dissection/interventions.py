"""Interventions on a generator's units (GAN Dissection, Bau et al. 2019, section 3.2).

Ablate (units := 0) or insert (units := k) channels of one layer's output, everywhere or at a
location, as context managers over :class:`~genxai.core.hooks.Trace` (the hook is removed on every
exit path); the average causal effect (ACE) of a unit set on a concept; every unit ranked by its
own ACE; and the paper's continuous search for a causal unit set: a per-unit ``alpha`` in
``[0, 1]^d`` with ``r' = r (1 - alpha) + k alpha``, optimised by Adam with an L2 penalty.

The layer's channels are dimension 1 of its output, (N, C, H, W) or (N, C). Unit indices are
checked against C before anything is edited: when the context is built if the module declares its
width (``out_channels``, ``out_features``, ``num_features``), else at the first forward pass,
before the output is touched.

A concept is measured on generated images by ``concept_fn(images) -> (N,)``, or by a segmenter
(``concepts``: the names, ``concept_masks(images) -> (N, C, H, W)`` bool) plus a concept name: the
fraction of pixels it assigns to the concept. The optimisation needs a differentiable measure: a
callable, or a segmenter with ``concept_probabilities(images) -> (N, C, H, W)`` (softmax
probabilities), whose mean probability of the concept (its soft pixel fraction) is used.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genxai.core.checks import check_finite, check_positive_int
from genxai.core.hooks import Trace, resolve_layer

Units = Sequence[int] | Sequence[bool] | torch.Tensor
"""Unit indices (ints, any order) or a bool mask over the layer's channels."""
Location = torch.Tensor | tuple[int, int, int, int] | None
"""A bool (H, W) mask at the layer's resolution, or a box ``(top, left, bottom, right)`` in layer
pixels (half-open), or None for everywhere."""
Value = float | torch.Tensor
"""A number, or one value per given unit, or one per channel of the layer (C,)."""
ConceptFn = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- argument checks


def _known_channels(module: nn.Module) -> int | None:
    """The output width a module declares (conv, linear, norm layers), else None."""
    for attribute in ("out_channels", "out_features", "num_features", "num_channels"):
        value = getattr(module, attribute, None)
        if isinstance(value, int):
            return value
    return None


def _unit_spec(units: Any) -> torch.Tensor:
    """Units as a 1-D long (indices) or bool (mask) CPU tensor; shape and sign checked."""
    if isinstance(units, torch.Tensor):
        tensor = units.detach().cpu()
    elif isinstance(units, (list, tuple, range)):
        if units and all(isinstance(u, bool) for u in units):
            tensor = torch.tensor(list(units), dtype=torch.bool)
        elif all(isinstance(u, int) and not isinstance(u, bool) for u in units):
            tensor = torch.tensor(list(units), dtype=torch.long)
        else:
            raise ValueError(f"units: expected a list of ints or of bools, got {list(units)!r}")
    else:
        raise ValueError(f"units: expected a list of unit indices or a bool mask, got {type(units).__name__}")
    if tensor.ndim != 1:
        raise ValueError(f"units: expected a 1-D list or mask, got shape {tuple(tensor.shape)}")
    if tensor.dtype != torch.bool:
        if tensor.is_floating_point() or tensor.is_complex():
            raise ValueError(f"units: expected integer indices or a bool mask, got dtype {tensor.dtype}")
        tensor = tensor.long()
        if tensor.numel() and int(tensor.min()) < 0:
            raise ValueError(f"units: indices must be >= 0, got {tensor[tensor < 0].tolist()}")
    if tensor.numel() == 0 or (tensor.dtype == torch.bool and not bool(tensor.any())):
        raise ValueError("units: expected at least one unit")
    return tensor


def resolve_units(units: Units, channels: int, layer: str = "layer") -> torch.Tensor:
    """Unit indices (long, in the order given) checked against a layer of ``channels`` channels."""
    spec = _unit_spec(units)
    if spec.dtype == torch.bool:
        if spec.numel() != channels:
            raise ValueError(
                f"units: a bool mask over {layer!r} needs {channels} entries (one per channel), "
                f"got {spec.numel()}"
            )
        return spec.nonzero().flatten()
    bad = spec[spec >= channels]
    if bad.numel():
        raise ValueError(
            f"units: {bad.tolist()} out of range for {layer!r} with {channels} channels "
            f"(valid: 0..{channels - 1})"
        )
    return spec


def _value_vector(
    value: Value, index: torch.Tensor | None, channels: int, name: str = "value"
) -> torch.Tensor:
    """The value per channel (C,): a number, one per given unit (in ``index`` order), or one per channel."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((channels,), float(value))
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a number or a 1-D tensor, got {type(value).__name__}")
    vector = value.detach().float().cpu()
    check_finite(vector, name)
    if vector.ndim == 0:
        return vector.expand(channels).clone()
    if vector.ndim == 1 and index is not None and vector.numel() == index.numel():
        full = torch.zeros(channels)
        full[index] = vector
        return full
    if vector.ndim == 1 and vector.numel() == channels:
        return vector
    given = f"one per unit ({index.numel()}) or " if index is not None else ""
    raise ValueError(
        f"{name}: expected a number or a 1-D tensor with {given}one per channel ({channels}), "
        f"got shape {tuple(vector.shape)}"
    )


def _location_spec(location: Any) -> torch.Tensor | tuple[int, int, int, int] | None:
    if location is None:
        return None
    if isinstance(location, torch.Tensor):
        if location.dtype != torch.bool or location.ndim != 2:
            raise ValueError(
                f"location: expected a bool (H, W) mask or a box (top, left, bottom, right), "
                f"got a {location.dtype} tensor of shape {tuple(location.shape)}"
            )
        return location.detach()
    if (
        isinstance(location, (tuple, list))
        and len(location) == 4
        and all(isinstance(v, int) and not isinstance(v, bool) for v in location)
    ):
        return tuple(location)
    raise ValueError(
        f"location: expected a bool (H, W) mask or a box (top, left, bottom, right), got {location!r}"
    )


def _location_mask(spec: Any, output: torch.Tensor, layer: str) -> torch.Tensor | None:
    """The location as a bool (1, 1, H, W) mask on the output's device, checked against its size."""
    if spec is None:
        return None
    if output.ndim != 4:
        raise ValueError(
            f"location: layer {layer!r} outputs shape {tuple(output.shape)}; a location needs (N, C, H, W)"
        )
    height, width = output.shape[-2:]
    if isinstance(spec, torch.Tensor):
        if tuple(spec.shape) != (height, width):
            raise ValueError(
                f"location: expected a ({height}, {width}) mask, the resolution of {layer!r}, "
                f"got {tuple(spec.shape)}"
            )
        mask = spec
    else:
        top, left, bottom, right = spec
        if not (0 <= top < bottom <= height and 0 <= left < right <= width):
            raise ValueError(
                f"location: box {spec} must satisfy 0 <= top < bottom <= {height} and "
                f"0 <= left < right <= {width} (the size of {layer!r})"
            )
        mask = torch.zeros(height, width, dtype=torch.bool)
        mask[top:bottom, left:right] = True
    return mask.to(output.device).view(1, 1, height, width)


def _broadcast(vector: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """A (C,) or (N, C) tensor viewed to broadcast over an (N, C, ...) output."""
    lead = vector.shape[0] if vector.ndim == 2 else 1
    return vector.to(output.device).view(lead, output.shape[1], *([1] * (output.ndim - 2)))


def _first(output: Any) -> torch.Tensor:
    tensor = output
    if isinstance(output, (tuple, list)) and output:
        tensor = output[0]
    if not isinstance(tensor, torch.Tensor) or tensor.ndim < 2:
        raise ValueError("layer: expected an output of shape (N, C, ...) (or a tuple starting with one)")
    return tensor


def _with_first(output: Any, tensor: torch.Tensor) -> Any:
    return tensor if isinstance(output, torch.Tensor) else type(output)([tensor, *output[1:]])


# ----------------------------------------------------------------------------- the edits


class _SetUnits:
    """Edit: the chosen channels := value (inside the location). ``rows`` (N, C) bool, when set,
    replaces the unit set with one set per sample (used to rank many units in one batch)."""

    def __init__(self, layer: str, units: Units | None, value: Value, location: Any) -> None:
        self.layer = layer
        self.units = None if units is None else _unit_spec(units)
        self.value = value
        self.location = _location_spec(location)
        self.rows: torch.Tensor | None = None
        self._cache: tuple | None = None
        self._ready: tuple | None = None

    def check(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Resolve units and value for a layer of ``channels`` channels (raises on bad input)."""
        if self._cache is None or self._cache[0] != channels:
            index = None if self.units is None else resolve_units(self.units, channels, self.layer)
            mask = torch.zeros(channels, dtype=torch.bool)
            if index is not None:
                mask[index] = True
            self._cache = (channels, mask, _value_vector(self.value, index, channels))
        return self._cache[1], self._cache[2]

    def validate(self, output: torch.Tensor) -> None:
        """Check units, value and location against one output of the layer, before long work."""
        self.check(output.shape[1])
        _location_mask(self.location, output, self.layer)

    def __call__(self, output: Any, name: str) -> Any:
        x = _first(output)
        key = (tuple(x.shape[1:]), x.device, x.dtype)
        if self._ready is None or self._ready[0] != key:  # checked and moved once per size/device
            mask, value = self.check(x.shape[1])
            loc = _location_mask(self.location, x, self.layer)
            self._ready = (key, _broadcast(mask, x), _broadcast(value, x).to(x.dtype), loc)
        _, where, value, loc = self._ready
        if self.rows is not None:
            where = _broadcast(self.rows, x)
        if loc is not None:
            where = where & loc
        return _with_first(output, torch.where(where, value, x))


class _MixUnits:
    """Edit: ``r' = r (1 - a) + k a`` with ``a`` = alpha per channel (inside the location)."""

    def __init__(self, layer: str, alpha: torch.Tensor, k: torch.Tensor, location: Any) -> None:
        self.layer, self.alpha, self.k, self.location = layer, alpha, k, _location_spec(location)

    def __call__(self, output: Any, name: str) -> Any:
        x = _first(output)
        a = _broadcast(self.alpha, x).to(x.dtype)
        loc = _location_mask(self.location, x, self.layer)
        if loc is not None:
            a = a * loc
        return _with_first(output, x * (1 - a) + _broadcast(self.k, x).to(x.dtype) * a)


class Intervention(AbstractContextManager):
    """Set units of one layer to a value while the context is open; see :func:`ablate`, :func:`insert`."""

    def __init__(
        self, model: nn.Module, layer: str | nn.Module, units: Units, value: Value, location: Location = None
    ) -> None:
        self.layer, module = resolve_layer(model, layer)
        self.edit = _SetUnits(self.layer, units, value, location)
        channels = _known_channels(module)
        if channels is not None:
            self.edit.check(channels)  # fail before any forward pass when the width is declared
        self.trace = Trace(model, module, retain_output=False, edit_output=self.edit)

    def close(self) -> None:
        self.trace.close()

    def __enter__(self) -> Intervention:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        return self.trace.__exit__(exc_type, exc, tb)


def ablate(
    model: nn.Module, layer: str | nn.Module, units: Units, *, location: Location = None
) -> Intervention:
    """Context manager: the given channels of ``layer``'s output are 0 (inside ``location``)."""
    return Intervention(model, layer, units, 0.0, location)


def insert(
    model: nn.Module, layer: str | nn.Module, units: Units, value: Value, *, location: Location = None
) -> Intervention:
    """Context manager: the given channels of ``layer``'s output are ``value`` (inside ``location``);
    ``value`` is a number or one per unit / per channel, e.g. :func:`unit_means` of a concept."""
    return Intervention(model, layer, units, value, location)


# ----------------------------------------------------------------------------- concept measures


def _concept_index(segmenter: Any, concept: str | None) -> int:
    names = list(segmenter.concepts)
    if concept is None:
        shown = ", ".join(map(str, names[:12])) + (" ..." if len(names) > 12 else "")
        raise ValueError(f"concept: a segmenter needs the name of the concept to measure, one of: {shown}")
    if concept not in names:
        close = difflib.get_close_matches(str(concept), [str(n) for n in names], n=5, cutoff=0.4)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise ValueError(f"concept: {concept!r} is not one of the segmenter's {len(names)} concepts.{hint}")
    return names.index(concept)


def concept_measure(
    concept_fn: Any, concept: str | None = None, *, differentiable: bool = False
) -> ConceptFn:
    """``images -> (N,)``: a callable as it is, or a segmenter's pixel fraction of ``concept``
    (hard masks; with ``differentiable`` its mean softmax probability, the soft fraction)."""
    is_segmenter = hasattr(concept_fn, "concepts") and (
        hasattr(concept_fn, "concept_masks") or hasattr(concept_fn, "concept_probabilities")
    )
    if not is_segmenter:
        if not callable(concept_fn):
            raise ValueError(
                "concept_fn: expected a callable images -> (N,) or a segmenter with concepts and concept_masks"
            )
        if concept is not None:
            raise ValueError(
                "concept: only a segmenter takes a concept name; a callable measures one concept"
            )
        return concept_fn
    index = _concept_index(concept_fn, concept)
    if differentiable:
        if not hasattr(concept_fn, "concept_probabilities"):
            raise ValueError(
                "concept_fn: the segmenter gives only hard masks (concept_masks); the optimisation needs a "
                "differentiable measure: a callable images -> (N,) or concept_probabilities(images)"
            )
        return lambda images: concept_fn.concept_probabilities(images)[:, index].flatten(1).mean(1)
    return lambda images: concept_fn.concept_masks(images)[:, index].flatten(1).float().mean(1)


def concept_mask_fn(concept_fn: Any, concept: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images -> (N, H, W)`` bool: a segmenter's mask of ``concept``, or a callable as it is."""
    if hasattr(concept_fn, "concepts") and hasattr(concept_fn, "concept_masks"):
        index = _concept_index(concept_fn, concept)
        return lambda images: concept_fn.concept_masks(images)[:, index]
    if not callable(concept_fn):
        raise ValueError("concept_masks: expected a callable images -> (N, H, W) bool or a segmenter")
    return concept_fn


def _amounts(measure: ConceptFn, images: Any, n: int) -> torch.Tensor:
    values = measure(images)
    if not isinstance(values, torch.Tensor) or values.shape != (n,):
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"concept_fn: expected one amount per image, shape ({n},), got {shape}")
    return values.float()


def _check_latents(latents: Any) -> torch.Tensor:
    if not isinstance(latents, torch.Tensor) or latents.ndim < 1 or latents.shape[0] == 0:
        raise ValueError("latents: expected a non-empty tensor of shape (N, ...)")
    check_finite(latents, "latents")
    return latents


def _chunks(n: int, batch_size: int):
    return [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def _probe(generator: nn.Module, layer: str, latents: torch.Tensor) -> torch.Tensor:
    """The layer's output for the first latent (the forward stops there): its width and size."""
    with torch.no_grad(), Trace(generator, layer, stop=True) as trace:
        generator(latents[:1])
    return _first(trace.require_output())


# ----------------------------------------------------------------------------- causal effects


def _is_ablation(value: Value) -> bool:
    if isinstance(value, torch.Tensor):
        return bool((value == 0).all())
    return value == 0


def unit_means(
    generator: nn.Module,
    layer: str | nn.Module,
    latents: torch.Tensor,
    concept_masks: Any,
    *,
    concept: str | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Each unit's mean activation where the concept is present in the generated image (C,): the
    paper's class-conditional k for insertion. The image mask is area-averaged to the layer's
    resolution, so each layer pixel weighs by the fraction of it that shows the concept."""
    name, _ = resolve_layer(generator, layer)
    latents = _check_latents(latents)
    check_positive_int(batch_size, "batch_size")
    masks_of = concept_mask_fn(concept_masks, concept)
    total, weight = None, None
    with torch.no_grad():
        for start, stop in _chunks(latents.shape[0], batch_size):
            with Trace(generator, name) as trace:
                images = generator(latents[start:stop])
            act = _first(trace.require_output()).float()
            mask = masks_of(images)
            if not isinstance(mask, torch.Tensor) or mask.ndim != 3 or mask.shape[0] != act.shape[0]:
                raise ValueError(f"concept_masks: expected (N, H, W) masks with N={act.shape[0]}")
            mask = mask.float().unsqueeze(1)
            if act.ndim == 4:
                w = F.adaptive_avg_pool2d(mask, act.shape[-2:])
            else:
                w = mask.flatten(1).mean(1).view(-1, *([1] * (act.ndim - 1)))
            w = w.expand(act.shape[0], 1, *act.shape[2:])
            part, count = (act * w).sum([0, *range(2, act.ndim)]), w.sum()
            total = part if total is None else total + part
            weight = count if weight is None else weight + count
    if float(weight) == 0:
        raise ValueError(
            "concept_masks: the concept is never present in the generated images; use more latents"
        )
    return total / weight


def _run_amounts(generator, latents, measure, batch_size, edit: _SetUnits | None, layer: str) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for start, stop in _chunks(latents.shape[0], batch_size):
            if edit is None:
                out.append(_amounts(measure, generator(latents[start:stop]), stop - start))
                continue
            with Trace(generator, layer, retain_output=False, edit_output=edit):
                out.append(_amounts(measure, generator(latents[start:stop]), stop - start))
    return torch.cat(out)


def average_causal_effect(
    generator: nn.Module,
    layer: str | nn.Module,
    units: Units,
    concept_fn: Any,
    latents: torch.Tensor,
    *,
    value: Value = 0.0,
    location: Location = None,
    concept: str | None = None,
    batch_size: int = 64,
) -> float:
    """Mean over latents of (concept amount with the units set to ``value`` - without): negative
    when ablating (``value`` 0) units that draw the concept, positive when inserting them (k)."""
    name, module = resolve_layer(generator, layer)
    latents = _check_latents(latents)
    check_positive_int(batch_size, "batch_size")
    measure = concept_measure(concept_fn, concept)
    edit = _SetUnits(name, units, value, location)
    known = _known_channels(module)
    if known is not None:
        edit.check(known)  # fail fast, before the probe pass
    edit.validate(_probe(generator, name, latents))
    base = _run_amounts(generator, latents, measure, batch_size, None, name)
    moved = _run_amounts(generator, latents, measure, batch_size, edit, name)
    return float((moved - base).mean())


@dataclass
class UnitRanking:
    """Units by causal effect, strongest first: most negative ACE for ablation, most positive for
    insertion. ``effects[i]`` is the ACE of ``units[i]`` alone."""

    units: torch.Tensor
    effects: torch.Tensor
    ablation: bool


def rank_units_by_ace(
    generator: nn.Module,
    layer: str | nn.Module,
    concept_fn: Any,
    latents: torch.Tensor,
    *,
    units: Units | None = None,
    value: Value = 0.0,
    location: Location = None,
    concept: str | None = None,
    batch_size: int = 64,
) -> UnitRanking:
    """The ACE of each unit alone (every channel, or ``units``), batched: each row of a batch is one
    (unit, latent) pair with its own one-unit edit. ``value`` is a number or one k per channel."""
    name, _ = resolve_layer(generator, layer)
    latents = _check_latents(latents)
    check_positive_int(batch_size, "batch_size")
    measure = concept_measure(concept_fn, concept)
    probe = _probe(generator, name, latents)
    channels = probe.shape[1]
    candidates = torch.arange(channels) if units is None else resolve_units(units, channels, name)
    edit = _SetUnits(name, None, _value_vector(value, None, channels), location)
    edit.validate(probe)
    base = _run_amounts(generator, latents, measure, batch_size, None, name)
    n, total = latents.shape[0], candidates.numel() * latents.shape[0]
    device = latents.device
    candidates = candidates.to(device)
    effects = []
    with torch.no_grad(), Trace(generator, name, retain_output=False, edit_output=edit):
        for start, stop in _chunks(total, batch_size):
            rows = torch.arange(start, stop, device=device)
            unit, sample = candidates[rows // n], rows % n
            edit.rows = F.one_hot(unit, channels).bool()
            moved = _amounts(measure, generator(latents[sample]), stop - start)
            effects.append(moved - base[sample])
    ace = torch.cat(effects).view(candidates.numel(), n).mean(1)
    ablation = _is_ablation(value)
    order = torch.argsort(ace, descending=not ablation, stable=True)
    return UnitRanking(units=candidates[order], effects=ace[order], ablation=ablation)


@dataclass
class AlphaResult:
    """The optimised intervention strength per channel (C,), the ``top`` units by alpha, and the
    loss per step (concept term + lam ||alpha||^2)."""

    alpha: torch.Tensor
    units: torch.Tensor
    losses: torch.Tensor


def optimize_alpha(
    generator: nn.Module,
    layer: str | nn.Module,
    concept_fn: Any,
    latents: torch.Tensor,
    *,
    k: Value,
    steps: int,
    lam: float = 0.005,
    lr: float = 0.01,
    top: int = 20,
    location: Location = None,
    concept: str | None = None,
    batch_size: int = 32,
) -> AlphaResult:
    """Find the units that cause a concept: ``alpha`` in [0, 1]^C, ``r' = r (1 - alpha) + k alpha``.

    With ``k`` 0 (ablation) minimise the mean concept amount, else (insertion) maximise it, plus
    ``lam ||alpha||^2``, which keeps the set small; Adam, alpha clamped to [0, 1] after each step,
    minibatches cycling through ``latents``, alpha starting at 0 (no intervention). The concept
    measure must be differentiable (see :func:`concept_measure`). Only alpha gets gradients; no
    parameter's ``.grad`` is touched.
    """
    name, _ = resolve_layer(generator, layer)
    latents = _check_latents(latents)
    check_positive_int(steps, "steps")
    check_positive_int(top, "top")
    check_positive_int(batch_size, "batch_size")
    for value, label in ((lam, "lam"), (lr, "lr")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{label}: expected a number >= 0, got {value!r}")
    measure = concept_measure(concept_fn, concept, differentiable=True)
    probe = _probe(generator, name, latents)
    channels = probe.shape[1]
    k_vector = _value_vector(k, None, channels, "k").to(latents.device)
    _location_mask(_location_spec(location), probe, name)
    sign = 1.0 if _is_ablation(k) else -1.0
    alpha = torch.zeros(channels, device=latents.device, requires_grad=True)
    optimizer = torch.optim.Adam([alpha], lr=lr)
    batches = _chunks(latents.shape[0], batch_size)
    losses = []
    with (
        torch.enable_grad(),
        Trace(generator, name, retain_output=False, edit_output=_MixUnits(name, alpha, k_vector, location)),
    ):
        for step in range(steps):
            start, stop = batches[step % len(batches)]
            amount = _amounts(measure, generator(latents[start:stop]), stop - start).mean()
            loss = sign * amount + lam * alpha.pow(2).sum()
            (grad,) = torch.autograd.grad(loss, alpha)
            alpha.grad = grad
            optimizer.step()
            with torch.no_grad():
                alpha.clamp_(0.0, 1.0)
            losses.append(loss.detach())
    result = alpha.detach()
    return AlphaResult(
        alpha=result, units=result.topk(min(top, channels)).indices, losses=torch.stack(losses)
    )
