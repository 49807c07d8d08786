"""The two loops every method is built from.

* :func:`forward_backward`: one forward pass, the target's scores, and in one ``autograd.grad`` call
  the gradients of the summed scores with respect to the input and to any traced layers. Scores of
  different images are independent (eval-mode models), so the summed gradient is per image. The
  same pass serves LRP: ``context`` rewrites the model (canonizers, rules) around the forward and
  backward only, and ``output_relevance`` starts the backward at the model output with the
  relevance ``d score / d output * output`` instead of differentiating the score.
* :func:`batched_scores`: target scores of many derived inputs (masked, perturbed, interpolated
  copies) evaluated in chunks of ``batch_size`` under ``torch.no_grad``, peak memory bounded.

Both run under ``torch.enable_grad``/``no_grad`` as needed, whatever the caller's mode, never touch
``.grad`` of parameters, and remove their hooks on every exit path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from genxai.core.hooks import TraceDict
from genxai.core.targets import Target, evaluate

ModelContext = Callable[[nn.Module], AbstractContextManager[Any]]
"""``context(model)``: a context manager that temporarily rewrites the model (LRP's rules)."""


@dataclass
class Gradients:
    """What one forward/backward pass gives back; tensors are detached unless ``create_graph``.

    ``input_grad`` and ``gradients`` hold d score / d (input, layer); with ``output_relevance``
    they hold the relevance that reaches the input and the layers instead.
    """

    output: Any
    scores: torch.Tensor
    input_grad: torch.Tensor | None = None
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    gradients: dict[str, torch.Tensor] = field(default_factory=dict)


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` (e.g. torch.bfloat16) on ``device``; a no-op for None/float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def forward_backward(
    model: nn.Module,
    x: torch.Tensor,
    target: Target,
    *,
    layers: Sequence[str] = (),
    input_grad: bool = True,
    create_graph: bool = False,
    autocast: torch.dtype | None = None,
    context: ModelContext | None = None,
    output_relevance: bool = False,
) -> Gradients:
    """Forward ``x``, score it with ``target`` and differentiate the scores.

    Args:
        layers: dotted names whose activations and gradients are returned.
        input_grad: also return d scores / d x.
        create_graph: keep the graph (for higher-order uses such as Discriminator training).
        autocast: run the forward under ``torch.autocast`` with this dtype.
        context: ``context(model)`` is entered around the forward and the backward (and left
            however they end), e.g. LRP's canonizers and rules; None: the model as it is.
        output_relevance: backpropagate ``d score / d output * output`` from the scored output
            (LRP's seed: the explained logit itself for a class target) instead of d score, so
            the rules in ``context`` turn the backward into relevance propagation.
    """
    layers = list(dict.fromkeys(layers))
    traced = layers + ([target.layer] if target.layer and target.layer not in layers else [])
    n = x.shape[0]
    rewrite = context(model) if context is not None else contextlib.nullcontext()
    with torch.enable_grad(), rewrite, TraceDict(model, traced, retain_grad=True) as traces:
        inputs = x.detach().requires_grad_(input_grad)
        with autocast_context(x.device, autocast):
            output = model(inputs)
        traces.require_outputs()
        scored = traces[target.layer].output if target.layer else output
        scores = evaluate(target, scored, n).float()
        wrt = ([inputs] if input_grad else []) + [traces[name].output for name in layers]
        if not wrt:
            return Gradients(output=_detach(output, create_graph), scores=scores.detach())
        if not scores.requires_grad:
            raise ValueError(
                f"target: the scores of {target!r} do not depend on the input or the layers {layers} "
                "(no gradient); check that the model is differentiable"
            )
        if output_relevance:
            grads = _relevance(scores, scored, wrt, create_graph)
        else:
            grads = torch.autograd.grad(scores.sum(), wrt, allow_unused=True, create_graph=create_graph)
        result = Gradients(
            output=_detach(output, create_graph), scores=scores if create_graph else scores.detach()
        )
        what = "relevance" if output_relevance else "gradient"
        if input_grad:
            grad, *grads = grads
            if grad is None:
                raise ValueError(f"x: the target score does not depend on the input (no {what} reaches it)")
            result.input_grad = grad
        for name, grad in zip(layers, grads):
            if grad is None:
                raise ValueError(
                    f"layer: the target score does not depend on layer {name!r} (no {what} reaches it)"
                )
            activation = traces[name].output
            result.activations[name] = activation if create_graph else activation.detach()
            result.gradients[name] = grad
    return result


def _tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) tuple, list or dict output."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _tensors(item)]
    return []


def _relevance(
    scores: torch.Tensor, scored: Any, wrt: list[torch.Tensor], create_graph: bool
) -> tuple[torch.Tensor | None, ...]:
    """Backpropagate the output relevance ``d score / d output * output`` from ``scored`` to ``wrt``."""
    outputs = [t for t in _tensors(scored) if t.requires_grad]
    grads = torch.autograd.grad(scores.sum(), outputs, retain_graph=True, allow_unused=True)
    used = [(out, (grad * out).detach()) for out, grad in zip(outputs, grads) if grad is not None]
    if not used:
        raise ValueError("target: the scores do not depend on the model output (no relevance to propagate)")
    return torch.autograd.grad(
        [out for out, _ in used],
        wrt,
        [seed for _, seed in used],
        allow_unused=True,
        create_graph=create_graph,
    )


def _detach(output: Any, keep: bool) -> Any:
    if keep:
        return output
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, (tuple, list)):
        return type(output)(_detach(o, keep) for o in output)
    if isinstance(output, dict):
        return {k: _detach(v, keep) for k, v in output.items()}
    return output


def model_output(model: nn.Module, x: torch.Tensor, autocast: torch.dtype | None = None) -> Any:
    """A plain forward under ``no_grad`` (the clean output, to bind targets and baselines)."""
    with torch.no_grad(), autocast_context(x.device, autocast):
        return _detach(model(x), False)


def batched_scores(
    model: nn.Module,
    make_batch: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
    total: int,
    target: Target,
    *,
    batch_size: int,
    autocast: torch.dtype | None = None,
) -> torch.Tensor:
    """Scores of ``total`` derived inputs, ``batch_size`` at a time, under ``no_grad``.

    ``make_batch(start, stop)`` builds rows ``start:stop`` and returns ``(inputs, index)`` where
    ``index[i]`` is the source image of row i (so per-image targets follow their image).
    Returns a float32 (total,) tensor on the inputs' device.
    """
    if target.layer is not None:
        raise ValueError("target: targets on a layer's output are not supported by perturbation methods")
    chunks = []
    with torch.no_grad():
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            inputs, index = make_batch(start, stop)
            with autocast_context(inputs.device, autocast):
                output = model(inputs)
            chunks.append(evaluate(target.take(index), output, stop - start).float())
    return torch.cat(chunks)
