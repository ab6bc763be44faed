"""Config sections: dataclasses whose fields declare their type, their check and their resume safety.

Every part that has settings (the model kinds, the data sets, the optimiser, the checkpointer, the
evaluator, the EMA, the parallel plan, the objectives) owns one ``Section`` subclass beside its code.
A field is declared with ``option``::

    log_steps: int = option(50, check=at_least(0), resume_safe=True)  # one line of what it does

- its type hint is what a value from YAML or ``--key=value`` is converted to (``coerce``);
- ``check`` is the field's own rule: a function of the value that returns what the value must be
  (``"must be >= 0"``) when it is not, and None when it is; ``Section.__post_init__`` runs every
  field's check (None skips it: unset), then the section's own ``check()`` for rules across fields;
- ``resume_safe=True`` marks a setting that a resumed run may change (how it runs, logs and saves);
  every other field changes what the run trains.

Every error names the key as ``section.field``. ``coerce`` converts:

- ``bool``: a YAML boolean (``true``/``false``, and YAML 1.1's ``yes``/``no``/``on``/``off``).
- ``int``: an integer; also an integral float or numeric string (``16.0``, or ``1e5``, which YAML 1.1
  reads as a string because it has no dot).
- ``float``: a number, or a numeric string (YAML 1.1 reads ``1e-4`` as a string).
- ``str``: a string, or a number YAML read from a name such as ``2024``.
- ``tuple[X, ...]``: a YAML list of any length, or a single value (the authors' ``ema_decay: 0.9999``).
- a fixed-length tuple such as ``tuple[float, float]``: a YAML list of that length.
- The items of a tuple are converted as their own types; an item's error names it (``optim.betas[1]``).
- ``X | None``: null, or the string ``none`` in any case (what ``str(None)`` writes), else ``X``.

A ``VariantSection`` (the model, the data) is a family of sections chosen by one key (``model.model``,
``data.dataset``): a registry maps each value of that key to its subclass, whose extra fields are the
options of that kind alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING
from typing import Any, ClassVar

from soflow_fast.cli import BARE

NoneType = type(None)
Check = Callable[[Any], "str | None"]


# ----------------------------------------------------------------------------------------------
# Fields and their checks
# ----------------------------------------------------------------------------------------------


def option(default: Any = MISSING, *, factory: Any = MISSING, check: Check | None = None, resume_safe: bool = False):
    """A config field: its default (or ``factory``), its check, and whether a resume may change it."""
    metadata = {"check": check, "resume_safe": resume_safe}
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


def at_least(low: float) -> Check:
    """``v >= low``, for a number or each item of a tuple."""
    return lambda v: None if all(x >= low for x in (v if isinstance(v, tuple) else (v,))) else f"must be >= {low:g}"


def one_of(*allowed: Any) -> Check:
    return lambda v: None if v in allowed else f"must be one of {', '.join(map(str, allowed))}"


def in_range(low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> Check:
    """``low <= v <= high`` (strict at an open end), for a number or each item of a tuple."""

    def check(v):
        items = v if isinstance(v, tuple) else (v,)
        if all((low < x if open_low else low <= x) and (x < high if open_high else x <= high) for x in items):
            return None
        return f"must be in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"

    return check


def finite(*, above: float | None = None, at_least: float | None = None) -> Check:
    """A finite number (each item of a tuple), optionally ``> above`` or ``>= at_least``."""

    def check(v):
        items = v if isinstance(v, tuple) else (v,)
        ok = all(
            math.isfinite(x) and (above is None or x > above) and (at_least is None or x >= at_least) for x in items
        )
        if ok:
            return None
        bound = f" and > {above:g}" if above is not None else f" and >= {at_least:g}" if at_least is not None else ""
        return f"must be finite{bound}"

    return check


def config_error(key: str, requirement: str, value: Any) -> ValueError:
    """The one wording of a value that breaks a rule: ``KEY REQUIREMENT, got VALUE``."""
    value = list(value) if isinstance(value, tuple) else value
    return ValueError(f"{key} {requirement}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


class Section:
    """Base of every config dataclass (declare subclasses with ``@dataclass(kw_only=True)``).

    ``SECTION`` is the section's name in files and keys. Subclasses put rules across their fields in
    ``check()``; rules across sections belong to ``check_with(cfg)``, which ``TrainConfig`` calls with
    the whole config.
    """

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = field_types(type(self))
        for f in dataclasses.fields(self):
            rule = f.metadata.get("check")
            value = getattr(self, f.name)
            if value is not None and typing.get_origin(_split_optional(hints[f.name])[0]) is tuple:
                value = coerce(self.key(f.name), value, hints[f.name])  # lists and ints from code, as from YAML
                setattr(self, f.name, value)
            if rule is not None and value is not None:
                why = rule(value)
                if why:
                    raise config_error(self.key(f.name), why, value)
        self.check()

    def check(self) -> None:
        """Rules across this section's fields (raise ``config_error``)."""

    def check_with(self, cfg: Any) -> None:
        """Rules that involve other sections of the training config ``cfg``."""

    @classmethod
    def key(cls, name: str) -> str:
        return f"{cls.SECTION}.{name}" if cls.SECTION else name

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Section:
        """The section from a mapping of field names to raw values (converted here); an unknown key is
        an error naming it."""
        types_ = field_types(cls)
        for name in values:
            if name not in types_:
                raise ValueError(f"unknown config key {cls.key(name)!r}; {cls.SECTION or cls.__name__} keys: "
                                 f"{', '.join(types_)}")  # fmt: skip
        return cls(**{name: coerce(cls.key(name), v, types_[name]) for name, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        """Field values as YAML writes them (tuples as lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def resume_safe(cls) -> frozenset[str]:
        """The fields a resumed run may change."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("resume_safe"))

    @classmethod
    def all_field_types(cls) -> dict[str, Any]:
        """Every key this section can hold (for a variant section: over all its variants)."""
        return field_types(cls)


class VariantSection(Section):
    """A section whose subclass is chosen by the value of ``VARIANT_KEY`` through ``variants()``.

    ``from_dict`` builds the chosen variant. A key of another variant is accepted when it holds None
    or that variant's default (files written by older versions list every variant's keys); any other
    value of it is an error naming the variants it applies to.
    """

    VARIANT_KEY: ClassVar[str] = ""

    @classmethod
    def variants(cls) -> dict[str, type[VariantSection]]:
        """Label -> subclass of every registered variant (a registry supplies it)."""
        raise NotImplementedError

    @classmethod
    def variant_of(cls, value: Any) -> tuple[type[VariantSection], Any]:
        """(the subclass for ``VARIANT_KEY = value``, the value in its canonical spelling)."""
        raise NotImplementedError

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> VariantSection:
        values = dict(values)
        key = cls.VARIANT_KEY
        raw = coerce(cls.key(key), values.get(key, getattr(cls, key, None)), field_types(cls)[key])
        sub, values[key] = cls.variant_of(raw)
        own = field_types(sub)
        for name in [n for n in values if n not in own]:
            owners = [label for label, other in cls.variants().items() if name in field_types(other)]
            if not owners:
                continue  # Section.from_dict names the unknown key
            value = values.pop(name)
            if value is None or all(_default_of(cls.variants()[o], name) == value for o in owners):
                continue
            raise ValueError(
                f"{cls.key(name)} applies to {cls.describe_owners(owners)}, not to {cls.key(key)}={values[key]}"
            )
        return Section.from_dict.__func__(sub, values)

    @classmethod
    def describe_owners(cls, owners: list[str]) -> str:
        """The variants a key belongs to, for the message that refuses it elsewhere."""
        return f"a {' or '.join(owners)}"

    @classmethod
    def all_field_types(cls) -> dict[str, Any]:
        out: dict[str, Any] = dict(field_types(cls))
        for sub in cls.variants().values():
            for name, hint in field_types(sub).items():
                out.setdefault(name, hint)
        return out

    @classmethod
    def own_fields(cls) -> tuple[str, ...]:
        """This variant's fields beyond the family's shared ones."""
        base = next(b for b in cls.__mro__[1:] if isinstance(b, type) and b.__dict__.get("VARIANT_KEY"))
        shared = set(field_types(base))
        return tuple(n for n in field_types(cls) if n not in shared)


class Registry(dict):
    """Label -> class of the registered variants of one ``VariantSection`` family (model kinds, data sets)."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, cls: type) -> type:
        """Add a variant (a subclass of the family with its own ``LABEL``); a decorator."""
        if not getattr(cls, "LABEL", ""):
            raise TypeError(f"{cls.__name__}: a {self.what} needs a LABEL")
        self[cls.LABEL] = cls
        return cls


def _default_of(cls: type, name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not MISSING:
        return _plain(f.default)
    return _plain(f.default_factory()) if f.default_factory is not MISSING else MISSING


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ----------------------------------------------------------------------------------------------
# Converting values to field types
# ----------------------------------------------------------------------------------------------


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved type hint of each field of the dataclass ``cls``, in field order.

    A field whose type ``coerce`` cannot convert is a TypeError here, when the class is first used,
    rather than a value passed through unchecked later.
    """
    hints = typing.get_type_hints(cls)
    out = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    for name, hint in out.items():
        _check_supported(hint, f"{cls.__name__}.{name}")
    return out


def coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` as type ``hint``, or a ValueError that names ``key``. A flag given alone (``BARE``) is
    true for a boolean key and refused for any other."""
    base, optional = _split_optional(hint)
    if value is BARE:
        if base is bool:
            return True
        name = key.rsplit(".", 1)[-1]
        raise ValueError(f"{key} needs a value: --{name}=VALUE")
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
    raise TypeError(f"{where}: config_fields.coerce has no conversion for the type {hint!r}")


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
