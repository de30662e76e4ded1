"""Command-line flags from a settings dataclass: one flag per field, everything about it read off the field.

`add_flags(parser, SamplingOptions)` gives the field `top_k` the flag `--top-k`: its type from the
annotation (`X | None` takes an X, `list[X]` one or more), its choices from a `Literal[...]`, its default
from the field and its help from the field's metadata ("help"), with the default shown. A bool that
defaults to False is the flag `--<name>`, one that defaults to True the flag `--no-<name>`. A list
field whose metadata has "may_be_empty" also accepts the flag alone (an empty list).

`settings_from(args, cls)` builds the dataclass back from the parsed flags by field name, so its own
checks (`settings.check_settings`) hold the values to their ranges: a value out of range is a
`UserError`, one line and exit code 2. A new field is a new flag with no CLI code to write, and its
default, choices, range and help are written once, on the field. A float option made by hand takes
`finite_float`, which refuses NaN and infinity as the settings' checks do.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Literal

from .settings import choices_of, default_of


def add_flags(parser, cls, *, exclude: tuple[str, ...] = ()) -> None:
    """One flag per field of dataclass `cls`, in field order, except the fields named in `exclude`."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name not in exclude:
            _add_flag(parser, cls, field, _without_none(hints[field.name]))


def settings_from(args, cls, **fixed):
    """Dataclass `cls` from the parsed flags named like its fields, the fields in `fixed` set as given."""
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(cls) if field.name not in fixed}
    return cls(**values, **fixed)


def finite_float(text: str) -> float:
    """argparse's type for a float option that no settings dataclass checks: a finite number (float() also
    reads nan and inf, which would pass every range check after it)."""
    import argparse
    import math

    from .errors import quoted

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{quoted(text)} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{quoted(text)} is not a finite number")
    return value


def shown(value) -> str:
    """A default as it is written on the command line: a list as its items, space-separated."""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _add_flag(parser, cls, field, hint) -> None:
    default = default_of(cls, field.name)
    flag = "--" + field.name.replace("_", "-")
    if hint is bool:
        parser.add_argument("--no-" + flag[2:] if default else flag, dest=field.name, default=default,
                            action="store_false" if default else "store_true", help=_help(field, default))
        return
    kind = {}
    if typing.get_origin(hint) is list:
        kind["nargs"] = "*" if field.metadata.get("may_be_empty") else "+"
        (hint,) = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        kind["choices"] = choices_of(cls, field.name)
    elif hint in (int, float, str):
        kind["type"] = hint
    else:
        raise TypeError(f"{cls.__name__}.{field.name} has no flag for its type {hint}; exclude it")
    parser.add_argument(flag, dest=field.name, default=default, help=_help(field, default), **kind)


def _without_none(hint):
    """X for `X | None`, any other type as it is."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint


def _help(field, default) -> str:
    """The field's help and its default. A None default is left to the help to explain ("default: one
    per token"), and a False one needs no words: the flag turns it on."""
    text = field.metadata["help"]
    if default is None or default is False:
        return text
    if default is True:
        return f"{text} (on by default; this flag turns it off)"
    alone = "; the flag alone: none" if field.metadata.get("may_be_empty") else ""
    return f"{text} (default: {shown(default)}{alone})"
