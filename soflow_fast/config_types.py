"""Config values converted to the types their dataclass fields declare.

Values reach a config as YAML made them: from a file, or from a ``--key=value`` override parsed as
YAML. ``coerce`` turns such a value into the field's resolved type hint (``typing.get_type_hints``)
or raises one ValueError that names the key. The types it converts:

- ``bool``: a YAML boolean (``true``/``false``, and YAML 1.1's ``yes``/``no``/``on``/``off``).
- ``int``: an integer; also an integral float or numeric string (``16.0``, or ``1e5``, which YAML 1.1
  reads as a string because it has no dot).
- ``float``: a number, or a numeric string (YAML 1.1 reads ``1e-4`` as a string).
- ``str``: a string, or a number YAML read from a name such as ``2024``.
- ``tuple[X, ...]``: a YAML list of any length, or a single value (the authors' ``ema_decay: 0.9999``).
- a fixed-length tuple such as ``tuple[float, float]``: a YAML list of that length.
- The items of a tuple are converted as their own types; an item's error names it (``optim.betas[1]``).
- ``X | None``: null, or the string ``none`` in any case (what ``str(None)`` writes), else ``X``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
import typing
from typing import Any

NoneType = type(None)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved type hint of each field of the dataclass ``cls``, in field order.

    A field whose type ``coerce`` cannot convert is a TypeError here, when the config module is
    imported, rather than a value passed through unchecked later.
    """
    hints = typing.get_type_hints(cls)
    out = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    for name, hint in out.items():
        _check_supported(hint, f"{cls.__name__}.{name}")
    return out


def coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` as type ``hint``, or a ValueError that names ``key``."""
    base, optional = _split_optional(hint)
    if optional and (value is None or (isinstance(value, str) and value.lower() == "none")):
        return None
    if value is None:
        raise ValueError(f"{key} needs a value")
    if typing.get_origin(base) is tuple:
        return _tuple(key, value, typing.get_args(base))
    return _SCALARS[base](key, value)


def _split_optional(hint: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); any other type -> (type, False)."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not NoneType]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _check_supported(hint: Any, where: str) -> None:
    base, _ = _split_optional(hint)
    if typing.get_origin(base) is tuple:
        args = typing.get_args(base)
        items = args[:1] if len(args) == 2 and args[1] is Ellipsis else args
        if items and Ellipsis not in items:
            for item in items:
                _check_supported(item, where)
            return
    elif base in _SCALARS:
        return
    raise TypeError(f"{where}: config_types.coerce has no conversion for the type {hint!r}")


def _tuple(key: str, value: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    variadic = len(args) == 2 and args[1] is Ellipsis
    if variadic and not isinstance(value, (list, tuple)):
        return (coerce(key, value, args[0]),)
    if not isinstance(value, (list, tuple)) or (not variadic and len(value) != len(args)):
        item_types = {_split_optional(a)[0] for a in args if a is not Ellipsis}
        noun = _NOUNS.get(item_types.pop(), "values") if len(item_types) == 1 else "values"
        count = noun if variadic else f"{len(args)} {noun}"
        name = key.rsplit(".", 1)[-1]
        raise ValueError(f"{key} must be a list of {count}, e.g. --{name}=[...]; got {value!r}")
    items = args[:1] * len(value) if variadic else args
    return tuple(coerce(f"{key}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, items, strict=True)))


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"{key} must be true or false, got {value!r}")


def _int(key: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value)
    if isinstance(value, (float, str)):
        with contextlib.suppress(ValueError, OverflowError):
            if (number := float(value)).is_integer():
                return int(number)
    raise ValueError(f"{key} must be an integer, got {value!r}")


def _float(key: str, value: Any) -> float:
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError, OverflowError):
            return float(value)
    raise ValueError(f"{key} must be a number, got {value!r}")


def _str(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{key} must be a string, got {value!r}")
    return str(value)


_SCALARS = {bool: _bool, int: _int, float: _float, str: _str}
_NOUNS = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}
