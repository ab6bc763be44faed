"""Argument checks of the experiment CLIs: ``KEY=VALUE`` config overrides and number flags that
fail with one message saying what is allowed, never a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable


def check_type(key: str, value, default):
    """``value`` as the type of the preset's ``default`` (ints are accepted for floats); ValueError if not."""
    number = (int, float)
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, float):
        ok, kind = isinstance(value, number) and not isinstance(value, bool), "a number"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, str):
        ok, kind = isinstance(value, str), "a string"
    elif isinstance(default, tuple):
        ok = isinstance(value, tuple) and all(isinstance(v, number) and not isinstance(v, bool) for v in value)
        kind = f"a list of {len(default)} numbers, e.g. {json.dumps(list(default))}"
    else:  # no such field today; leave it to the config's own checks
        return value
    if not ok:
        raise ValueError(f"{key} must be {kind}, got {json.dumps(value)}")
    if isinstance(default, float):
        try:
            return float(value)
        except OverflowError:  # an integer past float's range
            raise ValueError(f"{key} must be a finite number, got an integer of {len(str(value))} digits") from None
    return value


def parse_overrides(items: list[str], preset, reserved: dict[str, str] | None = None) -> dict:
    """``KEY=VALUE`` items as fields of ``preset`` (VALUE read as JSON, else as a plain string).

    Raises ValueError naming what is allowed: the field names for an unknown key, the field's type for
    a value of another type, the config's own check for a value it rejects. ``reserved`` maps the
    fields the run sets itself to the reason.
    """
    reserved = reserved or {}
    defaults = {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset) if f.name not in reserved}
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r} is not KEY=VALUE")
        if key in reserved:
            raise ValueError(f"{key} cannot be overridden: {reserved[key]}")
        if key not in defaults:
            raise ValueError(f"unknown key {key!r}; valid keys: {', '.join(defaults)}")
        try:
            value = json.loads(text)
        except ValueError:  # not JSON (or an integer too long to convert): the text itself
            value = text
        if isinstance(value, list):
            value = tuple(value)
        out[key] = check_type(key, value, defaults[key])
    try:
        dataclasses.replace(preset, **out)  # the config's own checks: ranges, choices, lengths
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(str(e)) from None
    return out


def arg_type(kind: type, ok: Callable[[int | float], bool], what: str) -> Callable[[str], int | float]:
    """An argparse type: a finite ``kind`` that passes ``ok``, else an error that says what is allowed."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse
