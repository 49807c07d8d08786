"""The small core every capability builds on: hooks, targets, input checks, the two loops."""

from genxai.core.checks import check_finite, check_images, check_maps
from genxai.core.engine import Pass, batched_scores, forward_backward, model_output
from genxai.core.hooks import Trace, TraceDict, get_module, replace_module, resolve_layer, run_until
from genxai.core.registry import Registry

__all__ = [
    "Pass",
    "Registry",
    "Trace",
    "TraceDict",
    "batched_scores",
    "check_finite",
    "check_images",
    "check_maps",
    "forward_backward",
    "get_module",
    "model_output",
    "replace_module",
    "resolve_layer",
    "run_until",
]
