"""Temporary changes to a model's modules, always undone: the one way genxai rewrites a model.

LRP's rules replace a module's ``forward``, canonizers swap in merged parameters and add modules
(a residual ``Sum``). All of it goes through :class:`Patch`, which records how to undo each change
and undoes them, newest first, when the block is left, however it is left::

    with Patch() as patch:
        patch.forward(norm, lambda x: x)                 # an instance attribute, removed again
        patch.parameter(conv, "weight", merged_weight)   # a new Parameter; the old object comes back
        out = model(x)

Restoration puts back the very objects that were there (the original ``Parameter`` objects, never
written to, so bitwise equal), and removes what was absent, so a patched model is afterwards
exactly the model it was.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

_MISSING = object()


def _swap(mapping: dict[str, Any], key: str, value: Any) -> Callable[[], None]:
    """Set ``mapping[key] = value``; return the function that puts the previous state back."""
    previous = mapping.get(key, _MISSING)
    mapping[key] = value

    def undo() -> None:
        if previous is _MISSING:
            mapping.pop(key, None)
        else:
            mapping[key] = previous

    return undo


class Patch(AbstractContextManager):
    """Records changes to modules and undoes all of them on exit (exceptions included).

    Each method makes one change now; :meth:`restore` (called on leaving the ``with`` block) undoes
    them in reverse order, so changes to the same attribute nest correctly. A failure while undoing
    one change does not stop the others from being undone; the first such error is raised after.
    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def forward(self, module: nn.Module, forward: Callable[..., Any]) -> None:
        """Make ``module(...)`` call ``forward`` (set as an instance attribute, as hooks still run)."""
        self._check(module, "module")
        if not callable(forward):
            raise TypeError(f"forward: expected a callable, got {type(forward).__name__}")
        self._undo.append(_swap(module.__dict__, "forward", forward))

    def parameter(
        self, module: nn.Module, name: str, value: torch.Tensor, *, requires_grad: bool | None = None
    ) -> nn.Parameter:
        """Replace parameter ``name`` of ``module`` by a new Parameter holding ``value``.

        The original Parameter object is set aside untouched (optimisers and users holding it see
        no change) and put back on exit. ``requires_grad`` defaults to the original's (True when
        there was none, e.g. a missing bias). Returns the new Parameter.
        """
        self._check(module, "module")
        if not isinstance(name, str) or "." in name:
            raise ValueError(f"name: expected a parameter name of the module itself, got {name!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"value: expected a torch.Tensor, got {type(value).__name__}")
        old = module._parameters.get(name)
        if requires_grad is None:
            requires_grad = old.requires_grad if isinstance(old, torch.Tensor) else True
        new = nn.Parameter(value.detach(), requires_grad=requires_grad)
        self._undo.append(_swap(module._parameters, name, new))
        return new

    def submodule(self, module: nn.Module, name: str, child: nn.Module) -> None:
        """Register ``child`` as ``module.<name>`` (adding it, or replacing what is there)."""
        self._check(module, "module")
        self._check(child, "child")
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"name: expected a submodule name of the module itself, got {name!r}")
        self._undo.append(_swap(module._modules, name, child))

    def attribute(self, obj: Any, name: str, value: Any) -> None:
        """Set the plain instance attribute ``obj.<name>``; on exit the previous value comes back
        (or the attribute goes). Parameters, buffers and submodules go through :meth:`parameter`
        and :meth:`submodule`."""
        if not hasattr(obj, "__dict__"):
            raise TypeError(f"obj: a {type(obj).__name__} has no instance attributes to set")
        if isinstance(obj, nn.Module):
            registered = {**obj._parameters, **obj._buffers, **obj._modules}
            if name in registered or isinstance(value, (nn.Module, nn.Parameter)):
                raise ValueError(
                    f"name: {name!r} is (or would become) a parameter, buffer or submodule of the "
                    "module; use Patch.parameter or Patch.submodule"
                )
        self._undo.append(_swap(vars(obj), name, value))

    def restore(self) -> None:
        """Undo every change, newest first; raise the first error only after undoing the rest."""
        error: BaseException | None = None
        while self._undo:
            try:
                self._undo.pop()()
            except BaseException as err:  # keep restoring the rest of the model
                error = error or err
        if error is not None:
            raise error

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.restore()

    @staticmethod
    def _check(module: Any, name: str) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"{name}: expected a torch.nn.Module, got {type(module).__name__}")
