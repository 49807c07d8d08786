"""GAN Dissection's artifact units (Bau et al., 2019, section 4.3): the units whose top-activating
samples look least real, by FID.

    fids = unit_fids(G, "blocks.2", reference, num_samples=2000, top=100)   # reference: real statistics
    fids.ranking()[:4]                  # the worst units; ablate them (interventions.ablate)

Each unit's top samples are the ``top`` of ``num_samples`` seeded samples with the largest spatial
maximum of the unit (:class:`~genxai.dissection.statistics.RunningTopK`, one pass, memory bounded
by ``batch_size``); they are regenerated unit by unit and their FID against the real statistics of
``reference`` is the unit's score (the paper: 10k of 200k samples per unit). With few top samples
FID is biased upwards for every unit alike; only the ranking is used. :func:`artifact_units`
picks the worst units per layer, each layer scored on the generator as it is (no sequential
correction: that is :func:`~genxai.dissection.artifacts.correct_artifacts`, Tousi et al.).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from genxai.core.checks import check_positive_int
from genxai.core.hooks import resolve_layer
from genxai.core.modes import evaluation_mode
from genxai.dissection.artifact_classifier import LatentsFn, Range, to_unit_range
from genxai.dissection.artifacts import _Source
from genxai.dissection.statistics import RunningTopK
from genxai.evaluation.fid import FID


@dataclass
class UnitFIDs:
    """Per unit of ``layer`` (U,): the FID of its ``top`` top-activating samples among ``num_samples``."""

    layer: str
    fids: torch.Tensor
    top: int
    num_samples: int

    def ranking(self) -> torch.Tensor:
        """Units, worst (highest FID) first; ties by unit index."""
        return torch.argsort(self.fids, descending=True, stable=True)

    def summary(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "top": self.top,
            "num_samples": self.num_samples,
            "fids": self.fids.tolist(),
        }


def unit_fids(
    generator: nn.Module,
    layer: str | nn.Module,
    reference: FID,
    *,
    num_samples: int = 1000,
    top: int = 50,
    batch_size: int = 64,
    seed: int = 0,
    latents_fn: LatentsFn | None = None,
    value_range: Range | None = None,
    progress: bool = False,
) -> UnitFIDs:
    """Every unit's FID of its ``top`` top-activating samples against ``reference``'s real statistics
    (an :class:`~genxai.evaluation.fid.FID` holding real images only; its generated side is reset)."""
    if not isinstance(reference, FID):
        raise ValueError(f"reference: expected an FID with real statistics, got {type(reference).__name__}")
    check_positive_int(num_samples, "num_samples")
    check_positive_int(top, "top", minimum=2)
    check_positive_int(batch_size, "batch_size")
    if top > num_samples:
        raise ValueError(f"top: {top} top samples per unit need num_samples >= {top}, got {num_samples}")
    name, _ = resolve_layer(generator, layer)
    source = _Source(generator, latents_fn, value_range, seed)
    ranked = None
    chunks = source.chunks(0, num_samples, batch_size)
    for a, b in tqdm(chunks, disable=not progress, desc=f"top samples of {name}"):
        acts = source.run(a, b, name, until=True)[1]
        ranked = ranked if ranked is not None else RunningTopK(acts.shape[1], top, acts.device)
        ranked.update(acts.amax((2, 3)), torch.arange(a, b, device=acts.device))
    samples = ranked.result()[1].cpu()  # (U, top)
    key = reference.extractor.fid_name
    fids = torch.zeros(samples.shape[0])
    try:
        for unit in tqdm(range(samples.shape[0]), disable=not progress, desc=f"FID per unit of {name}"):
            reference.reset_fake()
            for rows in samples[unit].split(batch_size):
                z = source.latents.take(rows)
                with torch.no_grad(), evaluation_mode(generator):
                    images = to_unit_range(generator(z), source.value_range, len(rows))
                reference.update(images, real=False)
            fids[unit] = float(reference.compute()[key])
    finally:
        reference.reset_fake()
    return UnitFIDs(name, fids, top, num_samples)


def artifact_units(
    generator: nn.Module,
    layers: str | Sequence[str],
    reference: FID,
    *,
    units_per_layer: int | Sequence[int],
    **options: Any,
) -> tuple[dict[str, list[int]], list[UnitFIDs]]:
    """``({layer: the units_per_layer worst units}, the scores per layer)``, each layer scored by
    :func:`unit_fids` (``options``) on the unedited generator."""
    names = [layers] if isinstance(layers, str) else list(layers)
    counts = [units_per_layer] * len(names) if isinstance(units_per_layer, int) else list(units_per_layer)
    if not names or len(counts) != len(names):
        raise ValueError(
            f"units_per_layer: expected one number or one per layer ({len(names)}), got {counts}"
        )
    chosen, scores = {}, []
    for layer, count in zip(names, counts):
        check_positive_int(count, "units_per_layer")
        result = unit_fids(generator, layer, reference, **options)
        if count > result.fids.numel():
            raise ValueError(
                f"units_per_layer: {count} is more than the {result.fids.numel()} units of {layer!r}"
            )
        chosen[result.layer] = result.ranking()[:count].tolist()
        scores.append(result)
    return chosen, scores


__all__ = ["UnitFIDs", "artifact_units", "unit_fids"]
