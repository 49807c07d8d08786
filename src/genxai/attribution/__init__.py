"""Attribution methods, one call shape: ``GradCAM(model, layer="layer4")(x, target=3)``.

``build(name, model, layer=None, **options)`` constructs a method by name with checked options
(``build("rise", model, masks=1000)``); ``get(name)`` returns its class (``get("gradcam++")``);
``names()`` lists them.
"""

from genxai.attribution.base import (
    METHODS,
    Attribution,
    LayerAttribution,
    accepted_options,
    build,
    check_options,
    reduce_channels,
)
from genxai.attribution.cam import CAM, BaseCAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM
from genxai.attribution.gradient import InputXGradient, IntegratedGradients, Saliency, SmoothGrad
from genxai.attribution.lrp import LRP, RelevanceCAM
from genxai.attribution.perturbation import RISE, Occlusion
from genxai.attribution.surrogate import LIME, KernelSHAP, SurrogateFit, weighted_least_squares
from genxai.attribution.visualization import ClassModelVisualization


def get(name: str) -> type[Attribution]:
    """The attribution class registered as ``name`` (case, dashes and underscores ignored)."""
    return METHODS.get(name)


def names() -> list[str]:
    """Canonical names of all registered methods."""
    return METHODS.names()


__all__ = [
    "CAM",
    "LIME",
    "LRP",
    "RISE",
    "Attribution",
    "BaseCAM",
    "ClassModelVisualization",
    "GradCAM",
    "GradCAMPlusPlus",
    "InputXGradient",
    "IntegratedGradients",
    "KernelSHAP",
    "LayerAttribution",
    "LayerCAM",
    "Occlusion",
    "RelevanceCAM",
    "Saliency",
    "ScoreCAM",
    "SmoothGrad",
    "SurrogateFit",
    "accepted_options",
    "build",
    "check_options",
    "get",
    "names",
    "reduce_channels",
    "weighted_least_squares",
]
