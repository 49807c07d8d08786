"""Models to explain: a small CNN classifier for small images and torchvision models by name."""

from genxai.models.classifier import (
    ClassifierConfig,
    SmallResNet,
    TrainResult,
    default_layer,
    evaluate_accuracy,
    load_classifier,
    load_model,
    load_torchvision,
    save_classifier,
    train_classifier,
)

__all__ = [
    "ClassifierConfig",
    "SmallResNet",
    "TrainResult",
    "default_layer",
    "evaluate_accuracy",
    "load_classifier",
    "load_model",
    "load_torchvision",
    "save_classifier",
    "train_classifier",
]
