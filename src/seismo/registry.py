"""Name -> factory registries.

Every architecture variant chosen by a config string (activation, norm, attention, MLP,
position encoding, data source, probe) lives in a `Registry`. An unknown name raises an
error that lists the registered names and suggests the nearest one, so a typo in a config
is caught before anything compiles.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name that is not registered. `str()` is a plain-words message."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the sentence as-is.
        return str(self.args[0]) if self.args else ""


def nearest(name: str, candidates: list[str] | tuple[str, ...]) -> str | None:
    """The closest candidate to `name` (difflib ratio >= 0.5), or None."""
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return found[0] if found else None


class Registry(Generic[T]):
    """A mapping from names to factories, with helpful errors.

    Register with a decorator (`@ACTIVATIONS.register("relu2")`) or a call
    (`ACTIVATIONS.register("relu2", fn)`).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T | None = None, *, overwrite: bool = False) -> Any:
        def add(obj: T) -> T:
            if name in self._items and not overwrite:
                raise ValueError(f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it")
            self._items[name] = obj
            return obj

        return add if item is None else add(item)

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        known = self.names()
        hint = nearest(name, known)
        msg = f"unknown {self.kind} {name!r}."
        if hint:
            msg += f" Did you mean {hint!r}?"
        return msg + f" Registered {self.kind}s: {', '.join(known)}"

    def names(self) -> list[str]:
        return sorted(self._items)

    def ordered(self) -> tuple[str, ...]:
        """The names in the order they were registered."""
        return tuple(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"

