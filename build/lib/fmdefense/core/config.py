"""Field checks shared by every config dataclass: each error names the field, its value and
what is allowed, in one line."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from fmdefense.core.errors import InputError


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None) -> None:
    """An int (not a bool) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
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
        raise InputError(f"{name} must be a finite number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        lb, hb = "(" if low_open else "[", ")" if high_open else "]"
        raise InputError(f"{name} must lie in {lb}{low}, {high}{hb}, got {value}")


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """One of the named choices."""
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def dataclass_kwargs(cls: Any, raw: object, what: str) -> dict[str, Any]:
    """A JSON object's fields for dataclass `cls`: refuses a non-object, unknown keys and
    missing keys that have no default, naming the key."""
    if not isinstance(raw, dict):
        raise InputError(f"{what} must be a JSON object, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise InputError(f"{what} has unknown key {unknown[0]!r}; known: {', '.join(fields)}")
    for name, f in fields.items():
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and name not in raw:
            raise InputError(f"{what} lacks key {name!r}")
    d = dict(raw)
    for name, f in fields.items():
        if name not in d:
            factory: Any = f.default_factory
            d[name] = f.default if f.default is not dataclasses.MISSING else factory()
    return d
