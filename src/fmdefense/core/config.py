"""Field checks shared by every config dataclass: each error names the field, its value and
what is allowed, in one line."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fmdefense.core.errors import InputError


def show(value: object, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters, for one-line error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None) -> None:
    """An int (not a bool) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an integer, got {show(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (
            f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
        )
        raise InputError(f"{name} must be {bounds}, got {value}")


def check_range(
    name: str,
    value: object,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """A finite real number within the interval (open ends as asked)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {show(value)}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        lb, hb = "(" if low_open else "[", ")" if high_open else "]"
        raise InputError(f"{name} must lie in {lb}{low}, {high}{hb}, got {value}")


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """One of the named choices."""
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"{name} must be one of {', '.join(choices)}; got {show(value)}")


def check_bool(name: str, value: object) -> None:
    """Exactly True or False (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise InputError(f"{name} must be true or false, got {show(value)}")


def check_pair(name: str, value: object, *, low: int, high: int) -> None:
    """A (height, width) tuple of two ints, each within [low, high]."""
    if not (
        isinstance(value, tuple)
        and len(value) == 2
        and all(type(v) is int and low <= v <= high for v in value)
    ):
        raise InputError(
            f"{name} must be a pair (height, width) of integers in [{low}, {high}], "
            f"got {show(value)}"
        )


def dataclass_kwargs(
    cls: Any, raw: object, what: str, *, tuples: bool = False, complete: bool = False
) -> dict[str, Any]:
    """A JSON object's fields for dataclass `cls`: refuses a non-object, unknown keys and
    missing keys that have no default (with `complete`, any missing key: a saved config records
    every field), naming the key. With `tuples`, JSON lists become tuples for fields annotated as
    tuples (JSON has no tuple); the dataclass then checks the values."""
    if not isinstance(raw, dict):
        got = "null" if raw is None else type(raw).__name__
        raise InputError(f"{what} must be a JSON object, got {got}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise InputError(f"{what} has unknown key {unknown[0]!r}; known: {', '.join(fields)}")
    for name, f in fields.items():
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if (no_default or complete) and name not in raw:
            raise InputError(f"{what} lacks key {name!r}")
    d = dict(raw)
    for name, f in fields.items():
        if name not in d:
            factory = f.default_factory
            d[name] = factory() if callable(factory) else f.default
        elif tuples and isinstance(d[name], list) and str(f.type).startswith("tuple"):
            d[name] = tuple(d[name])
    return d


def replace_fields(cfg: Any, overrides: Mapping[str, Any] | None, what: str) -> Any:
    """`dataclasses.replace(cfg, **overrides)`, refusing unknown keys in one line (`what` names
    the config in the message); the dataclass's own checks judge the values."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides or {}) - fields)
    if unknown:
        known = ", ".join(sorted(fields))
        raise InputError(f"{what} has no setting {unknown[0]!r}; known: {known}")
    return dataclasses.replace(cfg, **dict(overrides or {}))
