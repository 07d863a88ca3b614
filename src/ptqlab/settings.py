"""What a recipe step's setting allows, declared beside the setting itself.

A step's settings are a frozen dataclass in the module that applies the step (engine/smoothquant.py, quant/gptq.py,
...); each field that has a range or a set of choices declares it with `setting(default, allowed)`. recipes.py reads
these declarations to check a YAML file or a command-line option before any work, so that a rule has one home.
"""

from __future__ import annotations

import math
from dataclasses import Field, dataclass, field, fields


@dataclass(frozen=True)
class Interval:
    """The allowed values of a numeric setting (NaN and infinities never are)."""

    low: float
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False
    words: str = ""
    """What is allowed, for people: 'a number in (0, 1), e.g. 0.01'."""

    def __contains__(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below


def setting(default, allowed: Interval | tuple[str, ...]) -> Field:
    """A dataclass field whose values are limited to `allowed` (an Interval, or a tuple of choices)."""
    return field(default=default, metadata={"allowed": allowed})


KINDS = {"float": float, "int": int, "bool": bool, "str": str}
KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


class SettingError(ValueError):
    """A setting's value is not allowed; the message says what is (a noun phrase: 'a number in (0, 1)')."""


def _field(settings: type, key: str) -> Field:
    return next(f for f in fields(settings) if f.name == key)


def _kind(f: Field) -> type:
    return f.type if isinstance(f.type, type) else KINDS[f.type]


def setting_words(settings: type, key: str) -> str:
    """What the setting `key` of the dataclass `settings` allows, for people: 'a number in (0, 1), e.g. 0.01',
    'one of norms, all', 'true or false'."""
    f = _field(settings, key)
    allowed = f.metadata.get("allowed")
    if isinstance(allowed, tuple):
        return f"one of {', '.join(allowed)}"
    return allowed.words if allowed else KIND_WORDS[_kind(f)]


def check_setting(settings: type, key: str, value):
    """`value` as the setting `key` of `settings` (an integer given for a float becomes a float), or SettingError.
    The type comes from the field's annotation: a boolean is never an integer, 4.0 never an int."""
    f = _field(settings, key)
    kind, allowed = _kind(f), f.metadata.get("allowed")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    well_typed = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not well_typed or (allowed is not None and value not in allowed):
        raise SettingError(setting_words(settings, key))
    return value
