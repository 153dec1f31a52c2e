"""One check of a value against a type hint, for config fields, sweep grids and activation
arguments alike.

`coerce(value, hint, key)` returns the value, converted where the conversion loses nothing
(an int for a float, '1e-3' for a float, since YAML 1.1 reads it as a string, a list for a
tuple, on/off for a Literal of 'on' and 'off'), or raises `TypeMismatch` with a sentence
naming the key, the expected type and the value, and the nearest allowed choice for a typo.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args, get_origin

from seismo.registry import nearest


class TypeMismatch(ValueError):
    """A value that does not fit its type hint; `str()` is the sentence to show."""


def type_name(tp: Any) -> str:
    """'int', 'float or null', "'pre' | 'post'", ... as a person reads it."""
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (Sequence, list, tuple):
        inner = get_args(tp)[:1]
        return f"a list of {type_name(inner[0])}" if inner else "a list"
    if origin in (Mapping, dict):
        return "a mapping"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against `tp` (see the module docstring)."""
    o = get_origin(tp)
    err = TypeMismatch(f"{key} must be {type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is Any:
        return value
    if o is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads on/off as booleans
        if value in choices and not isinstance(value, bool):
            return value
        hint = nearest(str(value), [str(a) for a in choices])
        raise TypeMismatch(f"{key} must be one of {type_name(tp)}, got {value!r}."
                           + (f" Did you mean {hint!r}?" if hint else ""))
    if o in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except TypeMismatch:
                continue
        raise err
    if tp is type(None):
        if value is None:
            return None
        raise err
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise err
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise err
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise err from None
        raise err
    if tp is str:
        if isinstance(value, str):
            return value
        raise err
    if o in (Sequence, list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise err
        (inner,) = get_args(tp)[:1] or (Any,)
        return tuple(coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if o in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise err
        return dict(value)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise err
    return value
