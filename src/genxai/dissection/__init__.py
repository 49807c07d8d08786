"""GAN Dissection: which units of a generator's layer draw which concepts (Bau et al., 2019).

Works on any generator (a module mapping latents to images) and any segmenter with ``concepts``
and ``concept_masks(images)``; a small segmenter for the bundled shapes data is included.

    seg = load_segmenter("runs/seg")                                  # genxai train-segmenter
    result = dissect(generator, "blocks.2", seg, num_samples=1000)    # IQR thresholds, IoU per unit
    result.concept_counts, result.interpretable
    tiles = gallery(generator, "blocks.2", result, result.interpretable[:8])

Interventions on units (ablate, insert, average causal effect, the alpha search) live in
:mod:`.interventions`, one intervention's images and ACE per concept in :mod:`.effects`;
generative boundaries and regions (E-GBAS) in :mod:`.boundaries`; artifact correction in
:mod:`.artifacts` (Tousi et al.) and :mod:`.artifact_units` (GAN Dissection's FID of top samples);
a diffusion UNet's units per timestep in :mod:`.timesteps`.
"""

from genxai.dissection.boundaries import BoundarySet, RegionSamples, sample_region, smallest_boundary_set
from genxai.dissection.dissect import LATENT_BLOCK, Dissection, SeededLatents, dissect, gallery
from genxai.dissection.interventions import (
    AlphaResult,
    Intervention,
    UnitRanking,
    ablate,
    average_causal_effect,
    concept_measure,
    insert,
    optimize_alpha,
    rank_units_by_ace,
    unit_means,
)
from genxai.dissection.segmenter import (
    Segmenter,
    SegmenterConfig,
    SegmenterStep,
    ShapesSegmenter,
    evaluate_segmenter,
    load_segmenter,
    shapes_concept_masks,
    shapes_concepts,
    train_segmenter,
)
from genxai.dissection.statistics import ConceptHistogram, RunningRange, RunningTopK, default_levels

__all__ = [
    "LATENT_BLOCK",
    "AlphaResult",
    "BoundarySet",
    "ConceptHistogram",
    "Dissection",
    "Intervention",
    "RegionSamples",
    "RunningRange",
    "RunningTopK",
    "SeededLatents",
    "Segmenter",
    "SegmenterConfig",
    "SegmenterStep",
    "ShapesSegmenter",
    "UnitRanking",
    "ablate",
    "average_causal_effect",
    "concept_measure",
    "default_levels",
    "dissect",
    "evaluate_segmenter",
    "gallery",
    "insert",
    "load_segmenter",
    "optimize_alpha",
    "rank_units_by_ace",
    "sample_region",
    "shapes_concept_masks",
    "shapes_concepts",
    "smallest_boundary_set",
    "train_segmenter",
    "unit_means",
]
