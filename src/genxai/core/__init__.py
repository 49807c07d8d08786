"""The small core every capability builds on: hooks, patching, targets, input checks, map
arithmetic, the two loops, eval mode that restores every module's own mode."""

from genxai.core.checks import check_finite, check_images, check_maps
from genxai.core.engine import Gradients, batched_scores, forward_backward, model_output
from genxai.core.hooks import (
    Trace,
    TraceDict,
    default_layer,
    get_module,
    replace_module,
    resolve_layer,
    run_until,
)
from genxai.core.maps import gaussian_blur, minmax_normalize
from genxai.core.modes import evaluation_mode
from genxai.core.patching import Patch
from genxai.core.registry import Registry
from genxai.core.targets import bind_target

__all__ = [
    "Gradients",
    "Patch",
    "Registry",
    "Trace",
    "TraceDict",
    "batched_scores",
    "bind_target",
    "check_finite",
    "check_images",
    "check_maps",
    "default_layer",
    "evaluation_mode",
    "forward_backward",
    "gaussian_blur",
    "get_module",
    "minmax_normalize",
    "model_output",
    "replace_module",
    "resolve_layer",
    "run_until",
]
