"""Settings as typed dataclasses: the annotations and field metadata are the schema.

Every setting is a dataclass field with a default. The type annotation decides what a value may be,
`Literal[...]` lists the valid choices, and `field(metadata=at_least(n))` (or `above`, `between`) states
a range (of each item, for a list); a "help" in the metadata says what the setting does, for the flag
`adapt.flags` makes of it. A float is finite (NaN and infinity pass no range check by themselves) unless
its metadata says what infinity means ("infinity", which its help must then say too). `from_dict` builds
a dataclass from plain values (parsed YAML or JSON); `check_settings` holds a dataclass built in Python to the same choices and ranges. An unknown key, a
wrong type or a value out of its choices or range is a `UserError` that names the key and what it accepts.

This module imports nothing else from the package, so any module can declare its settings with it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import types
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import UserError, quoted


@dataclass(frozen=True)
class Range:
    """The numbers a setting accepts; an open end excludes its bound."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        above_low = value > self.low if self.low_open else value >= self.low
        below_high = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above_low and below_high

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


def at_least(low: float) -> dict:
    return {"range": Range(low)}


def above(low: float) -> dict:
    return {"range": Range(low, low_open=True)}


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> dict:
    """[low, high]; `low_open` and `high_open` leave out a bound: (low, high], [low, high)."""
    return {"range": Range(low, high, low_open=low_open, high_open=high_open)}


# The seeds the libraries take: torch's generators [0, 2**64); numpy's legacy seeding, which accelerate's
# set_seed also seeds, ends at 2**32 - 1. Out of them a seed fails deep inside the library.
TORCH_SEEDS = between(0, 2**64 - 1)
NUMPY_SEEDS = between(0, 2**32 - 1)


def default_of(owner, name: str):
    """The default of setting `name`: a dataclass field's or a function's keyword argument's.

    The CLI reads its defaults (and the help text that shows them) from here, so each is written once.
    """
    if dataclasses.is_dataclass(owner):
        found = {f.name: f for f in dataclasses.fields(owner)}[name]
        return found.default if found.default_factory is dataclasses.MISSING else found.default_factory()
    return inspect.signature(owner).parameters[name].default


def choices_of(cls, name: str) -> tuple:
    """The valid choices of field `name` of dataclass `cls`: a `Literal[...]`, a list of one, or one or None."""
    hint = typing.get_type_hints(cls)[name]
    while typing.get_origin(hint) is not Literal:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return typing.get_args(hint)


# --------------------------------------------------------------------------------------------------
# From plain values: keys and types first, then the checks a dataclass built in Python gets too


def from_dict(cls, values, prefix: str = "", whole: str = "the recipe"):
    """Build dataclass `cls` from a dict, checking keys, types, choices and ranges recursively.

    `prefix` is where `values` sit in the whole file ("data." for the recipe's data section), so that
    messages name the key as the user wrote it; `whole` is what messages call the top level.
    """
    settings = _build(cls, values, prefix, whole)
    check_settings(settings, prefix)
    return settings


@contextmanager
def read_from(source: str, fix: str | None = None):
    """Checks of values read from a file: their `UserError` names the file, `source`, before the key; with
    `fix`, that replaces the message's own (what to do about a file differs from what to do in a recipe)."""
    try:
        yield
    except UserError as err:
        message = str(err) if fix is None else f"{str(err).split('; ')[0]}; {fix}"
        raise UserError(f"{source}: {message}") from None


def read_json(path, fix: str) -> dict:
    """The JSON object in file `path`; one that cannot be read, is not JSON or holds no object is a
    `UserError` naming the file, ending with `fix` (what to do about it)."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path} ({err.strerror if isinstance(err, OSError) else err}); {fix}") from None
    except ValueError as err:
        raise UserError(f"{path} is not valid JSON ({err}); {fix}") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} holds a JSON {type(values).__name__}, not an object; {fix}")
    return values


def config_source(model_config) -> str:
    """Where a transformers config was read from, for messages: its folder's config.json (a Hub id's, for
    one from the Hub), or "the model's config" for one built in Python."""
    name = str(getattr(model_config, "name_or_path", "") or "")
    return f"{name.rstrip('/')}/config.json" if name else "the model's config"


def _build(cls, values, prefix: str, whole: str):
    where = prefix.rstrip(".") or whole
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UserError(f"{where} must be a mapping of keys, got {_show(values)}")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"unknown key {prefix}{unknown[0]}; valid keys in {where}: {', '.join(fields)}")
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and f.name not in values]
    if required:
        raise UserError(f"{prefix}{required[0]} is missing from {where}; give it a value")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _convert(hints[name], value, prefix + name) for name, value in values.items()})


def _convert(hint, value, key: str):
    """`value` as type `hint` (choices and ranges are left to `check_settings`)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if value is None:
        raise UserError(f"{key} cannot be null; give a {_type_name(hint)}")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", key)
    if dict in (hint, origin):
        if not isinstance(value, dict):
            raise UserError(f"{key} must be a mapping of keys, got {_show(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            value = [value] if isinstance(value, (str, dict)) else value
        if not isinstance(value, list):
            raise UserError(f"{key} must be a list, got {_show(value)}")
        return [_convert(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key} must be true or false, got {_show(value)}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            number = _as_float(value)  # YAML reads 1e6 as a string and 1.0e6 as a float; a whole number is meant
            if number is None or not number.is_integer():
                raise UserError(f"{key} must be a whole number, got {_show(value)}")
            value = int(number)
    elif hint is float:
        number = _as_float(value)  # YAML reads 1e-4 (no dot) as a string
        if number is None:
            raise UserError(f"{key} must be a number, got {_show(value)}")
        value = number
    elif hint is str:
        if not isinstance(value, str):
            raise UserError(f"{key} must be a string, got {_show(value)}")
    return value


def _as_float(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


# --------------------------------------------------------------------------------------------------
# Choices and ranges


def check_settings(settings, prefix: str = "") -> None:
    """Hold a dataclass to the choices and ranges its fields declare, nested sections and lists included."""
    hints = typing.get_type_hints(type(settings))
    for f in dataclasses.fields(settings):
        _check_value(hints[f.name], getattr(settings, f.name), prefix + f.name, f.metadata)


def _check_value(hint, value, key: str, metadata) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        return  # only where the type allows it: `_convert` refuses null elsewhere
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        if inner is str and value == "":  # where null means "the default", an empty string would silently too
            raise UserError(f"{key} is an empty string; leave it out (null) for its default, or give a value")
        _check_value(inner, value, key, metadata)
    elif dataclasses.is_dataclass(hint):
        check_settings(value, key + ".")
    elif origin is list:
        for i, item in enumerate(value):
            _check_value(args[0], item, f"{key}[{i}]", metadata)
    elif origin is Literal and value not in args:
        raise UserError(f"{key} = {_show(value)} is not a valid choice; choose one of: {', '.join(map(str, args))}")
    elif "range" in metadata and value not in metadata["range"]:
        raise UserError(f"{key} = {quoted(value)} is out of range; it must be {metadata['range']}")
    elif isinstance(value, float) and not math.isfinite(value) and not (math.isinf(value) and "infinity" in metadata):
        raise UserError(f"{key} = {value} is not a finite number; give a finite value")


def _type_name(hint) -> str:
    return getattr(hint, "__name__", str(hint))


def _show(value) -> str:
    return f"{quoted(value)} ({type(value).__name__})"
