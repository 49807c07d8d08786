"""Retain or edit any named layer of a model, and always leave the model as it was.

One mechanism serves every method that looks inside a network: the CAM family and Relevance-CAM
read activations and their gradients, dissection reads and edits units, the diffusion UNet takes
attention maps through edits. In the spirit of GAN Dissection's ``nethook``:

    with Trace(model, "layer4", retain_grad=True) as tr:
        out = model(x)
    tr.output            # the activation of ``layer4``

Hooks are removed on every exit path, exceptions included. When gradients of a retained output are
wanted, the hook hands the *next* layer a copy, so an in-place ReLU/LeakyReLU that follows (usual in
GAN discriminators) cannot overwrite the tensor we differentiate against.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

EditFn = Callable[[torch.Tensor, str], torch.Tensor]


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early (``stop=True``); caught by the trace."""


def module_names(model: nn.Module) -> list[str]:
    """All dotted names of a model's submodules, in definition order (the root is omitted)."""
    return [name for name, _ in model.named_modules() if name]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (a dotted path); a clear error lists the closest names."""
    if not isinstance(name, str):
        raise TypeError(f"layer: expected a dotted module name or an nn.Module, got {type(name).__name__}")
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    names = module_names(model)
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
    hint = f" Closest names: {', '.join(close)}." if close else ""
    sample = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
    raise ValueError(f"layer: no module named {name!r} in {type(model).__name__}.{hint} Available: {sample}")


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """Accept a dotted name or a module of ``model``; return both its name and the module."""
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name, module
        raise ValueError(f"layer: the module {type(layer).__name__} given is not part of the model")
    return layer, get_module(model, layer)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Swap the submodule at dotted ``name`` for ``new``; return the old one."""
    old = get_module(model, name)
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name) if parent_name else model
    setattr(parent, child, new)
    return old


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"layer output: expected a tensor (or a tuple whose first item is one), got {type(output).__name__}"
    )


def _replace_first(output: Any, tensor: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return tensor
    return type(output)([tensor, *output[1:]])


class Trace(AbstractContextManager):
    """Retain and/or edit the output of one named layer during forward passes.

    Args:
        model: the network.
        layer: dotted module name or the module itself.
        retain_output: keep the layer's latest output in ``self.output``.
        retain_grad: make ``self.output`` differentiable (a leaf of the graph if the model is frozen
            or called under ``torch.no_grad``) and protect it from later in-place operations.
        edit_output: ``fn(output, name) -> new_output`` applied to the layer's output.
        stop: raise :class:`StopForward` right after the layer, ending the forward pass cheaply.
        detach: store a detached copy (for statistics; cheaper than keeping the graph).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module,
        *,
        retain_output: bool = True,
        retain_grad: bool = False,
        edit_output: EditFn | None = None,
        stop: bool = False,
        detach: bool = False,
    ) -> None:
        self.name, self.module = resolve_layer(model, layer)
        self.retain_output = retain_output
        self.retain_grad = retain_grad
        self.edit_output = edit_output
        self.stop = stop
        self.detach = detach
        self.output: torch.Tensor | None = None
        self.calls = 0
        self._handle = self.module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: Any) -> Any:
        self.calls += 1
        if self.edit_output is not None:
            output = self.edit_output(output, self.name)
        if self.retain_output or self.retain_grad:
            tensor = _first_tensor(output)
            if self.retain_grad:
                if not tensor.requires_grad:
                    tensor = tensor.detach().requires_grad_(True)
                self.output = tensor
                # Hand the next layer a copy: an in-place activation cannot then corrupt `tensor`.
                output = _replace_first(output, tensor.clone())
            else:
                self.output = tensor.detach() if self.detach else tensor
        if self.stop:
            raise StopForward(self.name)
        return output

    def require_output(self) -> torch.Tensor:
        """The retained output, or a clear error when the layer never ran in the forward pass."""
        if self.output is None:
            raise ValueError(f"layer: {self.name!r} was not called during the forward pass")
        return self.output

    def close(self) -> None:
        self._handle.remove()

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


class TraceDict(AbstractContextManager):
    """:class:`Trace` over several layers at once; index the result by layer name.

    ``edit_output`` receives ``(output, name)`` so one function can edit several layers. With
    ``stop=True`` the forward pass ends after the last of the layers (in definition order).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[str | nn.Module],
        *,
        retain_output: bool = True,
        retain_grad: bool = False,
        edit_output: EditFn | None = None,
        stop: bool = False,
        detach: bool = False,
    ) -> None:
        resolved = [resolve_layer(model, layer) for layer in layers]
        order = {name: i for i, name in enumerate(module_names(model))}
        last = max((order.get(name, -1) for name, _ in resolved), default=-1)
        self.traces: dict[str, Trace] = {}
        try:
            for name, module in resolved:
                self.traces[name] = Trace(
                    model,
                    module,
                    retain_output=retain_output,
                    retain_grad=retain_grad,
                    edit_output=edit_output,
                    stop=stop and order.get(name, -1) == last,
                    detach=detach,
                )
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> Trace:
        return self.traces[name]

    def __iter__(self):
        return iter(self.traces)

    def items(self):
        return self.traces.items()

    def require_outputs(self) -> dict[str, torch.Tensor]:
        """Every layer's retained output; a clear error names the first layer that never ran."""
        return {name: trace.require_output() for name, trace in self.traces.items()}

    def outputs(self) -> dict[str, torch.Tensor]:
        return {name: trace.output for name, trace in self.traces.items()}

    def close(self) -> None:
        for trace in self.traces.values():
            trace.close()

    def __enter__(self) -> TraceDict:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


def run_until(model: nn.Module, layer: str | nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Run ``model`` only as far as ``layer`` and return that layer's output."""
    with Trace(model, layer, stop=True) as trace:
        model(*args, **kwargs)
    return trace.require_output()


def default_layer(model: nn.Module) -> str:
    """The layer CAM-style methods explain when none is named: ``model.default_layer`` if set, else
    the top-level child that holds the last convolution (``layer4`` of a ResNet, ``features`` of a VGG)."""
    name = getattr(model, "default_layer", None)
    if isinstance(name, str):
        return name
    last = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            last = module_name
    if last is None:
        raise ValueError(f"layer: {type(model).__name__} has no Conv2d; name the layer to explain")
    return last.split(".")[0]
