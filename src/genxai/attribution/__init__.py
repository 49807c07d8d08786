"""Attribution methods, one call shape: ``GradCAM(model, layer="layer4")(x, target=3)``.

``get(name)`` returns a method class by name (``get("gradcam++")``); ``names()`` lists them.
"""

from genxai.attribution.base import METHODS, Attribution, LayerAttribution, normalize_maps, reduce_channels
from genxai.attribution.gradient import InputXGradient, IntegratedGradients, Saliency, SmoothGrad


def get(name: str) -> type[Attribution]:
    """The attribution class registered as ``name`` (case, dashes and underscores ignored)."""
    return METHODS.get(name)


def names() -> list[str]:
    """Canonical names of all registered methods."""
    return METHODS.names()


__all__ = [
    "Attribution",
    "InputXGradient",
    "IntegratedGradients",
    "LayerAttribution",
    "Saliency",
    "SmoothGrad",
    "get",
    "names",
    "normalize_maps",
    "reduce_channels",
]
