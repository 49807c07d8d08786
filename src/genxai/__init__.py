"""genxai: explainable generative modelling on PyTorch."""

__version__ = "0.1.0"
