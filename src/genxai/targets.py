"""Public alias of :mod:`genxai.core.targets`: ``from genxai.targets import Fake, ClassLogit``."""

from genxai.core.targets import (
    ClassLogit,
    ClassProbability,
    DiscriminatorScore,
    Fake,
    FunctionTarget,
    Predicted,
    Select,
    Sigmoid,
    Target,
    UnitActivation,
    as_target,
    evaluate,
    probability_target,
)

__all__ = [
    "ClassLogit",
    "ClassProbability",
    "DiscriminatorScore",
    "Fake",
    "FunctionTarget",
    "Predicted",
    "Select",
    "Sigmoid",
    "Target",
    "UnitActivation",
    "as_target",
    "evaluate",
    "probability_target",
]
