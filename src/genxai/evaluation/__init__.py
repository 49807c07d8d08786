"""Evaluation of explanations: faithfulness (Grad-CAM++'s Average Drop, Increase in Confidence and
Win%; RISE's deletion and insertion AUC), localisation against ground-truth masks (pointing game,
energy / Grad-CAM++'s Loc) and Adebayo et al.'s model-randomisation sanity check.

Metrics are torchmetrics metrics: ``m = AverageDrop(model); m.update(x, maps); m.compute()``
gives a result with ``per_image`` values and their ``mean``, gathered from every process under
``torch.distributed`` (per-image states reduced by concatenation); each has a one-call function too
(``average_drop(model, x, maps)``), which never syncs.
"""

from genxai.evaluation.faithfulness import (
    AverageDrop,
    CurveResult,
    Deletion,
    IncreaseInConfidence,
    Insertion,
    MetricResult,
    StreamingMetric,
    WinPercent,
    WinResult,
    average_drop,
    deletion,
    increase_in_confidence,
    insertion,
    win_percent,
)
from genxai.evaluation.localization import (
    LocalizationEnergy,
    PointingGame,
    energy_pointing,
    localization_energy,
    pointing_game,
)
from genxai.evaluation.sanity import SanityResult, model_randomization, spearman, ssim

# Generative-model metrics (FID) live in genxai.evaluation.fid, imported from there.

__all__ = [
    "AverageDrop",
    "CurveResult",
    "Deletion",
    "IncreaseInConfidence",
    "Insertion",
    "LocalizationEnergy",
    "MetricResult",
    "PointingGame",
    "SanityResult",
    "StreamingMetric",
    "WinPercent",
    "WinResult",
    "average_drop",
    "deletion",
    "energy_pointing",
    "increase_in_confidence",
    "insertion",
    "localization_energy",
    "model_randomization",
    "pointing_game",
    "spearman",
    "ssim",
    "win_percent",
]
