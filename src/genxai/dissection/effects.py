"""One intervention's effect on a generator in one pass: images before/after and the ACE per concept.

    width = layer_width(G, "blocks.2", z)                                 # units of the layer
    effect = intervention_effect(G, "blocks.2", [3, 7], z, segmenter=seg, keep=8)
    effect.before, effect.after                     # the first 8 images without / with the edit
    effect.ace                                      # {concept: mean change of its pixel fraction}

Each batch of latents is generated twice, without and with the units set to ``value`` (0:
ablation, k: insertion; :class:`~genxai.dissection.interventions.Intervention`), and both are
segmented: the ACE of the unit set on every concept of the segmenter comes from the same pass
(:func:`~genxai.dissection.interventions.average_causal_effect` gives the same number for one concept).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from genxai.core.checks import check_positive_int
from genxai.core.hooks import Trace, resolve_layer
from genxai.core.modes import evaluation_mode
from genxai.dissection.interventions import Intervention, Location, Units, Value, resolve_units
from genxai.dissection.segmenter import check_concept_masks, check_segmenter


def _value_range(generator: nn.Module, value_range: Any) -> tuple[float, float]:
    low, high = value_range if value_range is not None else getattr(generator, "value_range", (-1.0, 1.0))
    if not float(high) > float(low):
        raise ValueError(f"value_range: expected (low, high) with low < high, got {value_range!r}")
    return float(low), float(high)


def _images(out: Any, value_range: tuple[float, float], n: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != n:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"generator: expected images (N={n}, C, H, W), got {got}")
    low, high = value_range
    return ((out.float() - low) / (high - low)).clamp(0, 1)


def layer_width(generator: nn.Module, layer: str | nn.Module, latents: torch.Tensor) -> int:
    """The number of units (channels, dimension 1) of ``layer``'s output, from the first latent
    (the forward pass stops at the layer). Raises the layer error with the closest names."""
    name, _ = resolve_layer(generator, layer)
    if not isinstance(latents, torch.Tensor) or latents.ndim < 1 or latents.shape[0] == 0:
        raise ValueError("latents: expected a non-empty tensor of shape (N, ...)")
    with torch.no_grad(), evaluation_mode(generator), Trace(generator, name, stop=True) as trace:
        generator(latents[:1])
    out = trace.require_output()
    if out.ndim < 2:
        raise ValueError(f"layer: {name!r} outputs shape {tuple(out.shape)}; units need (N, C, ...)")
    return int(out.shape[1])


@dataclass
class InterventionEffect:
    """The units of ``layer`` set to ``value`` over ``num_samples`` latents: the first ``keep``
    images before and after (N, C, H, W) in [0, 1], the mean absolute pixel change, and per concept
    the mean pixel fraction before and after and their difference, the ACE."""

    layer: str
    units: list[int]
    value: float | list[float]
    num_samples: int
    before: torch.Tensor
    after: torch.Tensor
    pixel_change: float
    concepts: list[str] = field(default_factory=list)
    fraction_before: torch.Tensor | None = None
    fraction_after: torch.Tensor | None = None

    @property
    def ace(self) -> dict[str, float]:
        """{concept: ACE}, the mean over latents of (fraction with the edit - without)."""
        if self.fraction_before is None:
            return {}
        delta = (self.fraction_after - self.fraction_before).tolist()
        return dict(zip(self.concepts, delta))

    def records(self) -> list[dict[str, Any]]:
        """One row per concept: fraction before, after, ACE (empty without a segmenter)."""
        if self.fraction_before is None:
            return []
        return [
            {"concept": c, "before": b, "after": a, "ace": a - b}
            for c, b, a in zip(self.concepts, self.fraction_before.tolist(), self.fraction_after.tolist())
        ]

    def summary(self) -> dict[str, Any]:
        """JSON-able: layer, units, value, samples, pixel change and the per-concept records."""
        keys = ("layer", "units", "value", "num_samples", "pixel_change")
        return {**{k: getattr(self, k) for k in keys}, "ace": self.ace, "concepts": self.records()}


def intervention_effect(
    generator: nn.Module,
    layer: str | nn.Module,
    units: Units,
    latents: torch.Tensor,
    *,
    value: Value = 0.0,
    location: Location = None,
    segmenter: Any = None,
    keep: int = 8,
    batch_size: int = 64,
    value_range: tuple[float, float] | None = None,
) -> InterventionEffect:
    """Generate ``latents`` without and with ``units`` of ``layer`` set to ``value`` (inside
    ``location``), batch by batch; keep the first ``keep`` image pairs and, with a ``segmenter``,
    the mean pixel fraction of each of its concepts both ways (their difference: the ACE)."""
    name, _ = resolve_layer(generator, layer)
    check_positive_int(batch_size, "batch_size")
    check_positive_int(keep, "keep", minimum=0)
    concepts = check_segmenter(segmenter) if segmenter is not None else []
    index = resolve_units(units, layer_width(generator, name, latents), name)
    span = _value_range(generator, value_range)
    n = latents.shape[0]
    kept: tuple[list, list] = ([], [])
    change, fractions = 0.0, None
    with torch.no_grad(), evaluation_mode(generator):
        for start in range(0, n, batch_size):
            z = latents[start : start + batch_size]
            before = _images(generator(z), span, len(z))
            with Intervention(generator, name, index, value, location):
                after = _images(generator(z), span, len(z))
            change += float((after - before).abs().mean((1, 2, 3)).sum())
            if start < keep:
                kept[0].append(before[: keep - start].cpu())
                kept[1].append(after[: keep - start].cpu())
            if segmenter is not None:
                pair = []
                for images in (before, after):
                    masks = check_concept_masks(segmenter.concept_masks(images), images, concepts)
                    pair.append(masks.flatten(2).float().mean(2).sum(0).double().cpu())
                fractions = pair if fractions is None else [f + p for f, p in zip(fractions, pair)]
    scalar = isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.ndim == 0)
    shown = float(value) if scalar else torch.as_tensor(value).flatten().tolist()
    empty = torch.zeros(0)
    return InterventionEffect(
        layer=name,
        units=index.tolist(),
        value=shown,
        num_samples=n,
        before=torch.cat(kept[0]) if kept[0] else empty,
        after=torch.cat(kept[1]) if kept[1] else empty,
        pixel_change=change / n,
        concepts=concepts,
        fraction_before=None if fractions is None else (fractions[0] / n).float(),
        fraction_after=None if fractions is None else (fractions[1] / n).float(),
    )


__all__ = ["InterventionEffect", "intervention_effect", "layer_width"]
