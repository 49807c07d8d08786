"""Run a model in eval mode for a while and give every module its own mode back afterwards.

An explanation or a metric must never change the model: in train mode BatchNorm layers update
their running statistics and normalise with the batch's, and dropout makes every forward random.
Methods and metrics therefore run inside :func:`evaluation_mode`::

    with evaluation_mode(model):
        maps = method.attribute(x, target)

Each module's ``training`` flag is recorded first and written back on leaving the block, however
it is left, so a model with mixed modes (say frozen BatchNorm in a training model) comes back as it
was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; every module's previous mode restored on exit."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    modes = [(module, module.training) for module in model.modules()]
    try:
        if any(training for _, training in modes):
            model.eval()
        yield model
    finally:
        for module, training in modes:
            module.training = training
