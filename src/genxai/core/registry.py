"""A name -> class registry with helpful errors (``genxai.attribution.get("gradcam++")``)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


def _key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "").replace(" ", "")


class Registry(Generic[T]):
    """Maps names (case-, dash- and underscore-insensitive) and aliases to objects."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._names: dict[str, str] = {}
        self._canonical: dict[str, str] = {}

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            for alias in (name, *aliases):
                key = _key(alias)
                if key in self._items and self._items[key] is not obj:
                    raise ValueError(f"{self.kind} {alias!r} is registered twice")
                self._items[key] = obj
                self._canonical[key] = name
            self._names[name] = name
            return obj

        return decorator

    def get(self, name: str) -> T:
        """The object registered as ``name`` or an alias; an unknown name lists the closest ones."""
        return self._items[self._lookup(name)]

    def canonical(self, name: str) -> str:
        """The name an object was registered under, given that name or any alias (``Grad-CAM`` -> ``gradcam``)."""
        return self._canonical[self._lookup(name)]

    def _lookup(self, name: str) -> str:
        key = _key(name) if isinstance(name, str) else None
        if key in self._items:
            return key
        close = difflib.get_close_matches(str(name), list(self._names), n=3, cutoff=0.3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"{self.kind}: unknown name {name!r}.{hint} Known: {', '.join(self.names())}")

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return _key(name) in self._items
