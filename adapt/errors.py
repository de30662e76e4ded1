"""The one exception type for mistakes a user can fix, and how every command reports it.

A `UserError` becomes a single line on stderr and exit code 2, without a traceback: `exit_code_of`
does it for the `adapt` CLI (which `python scripts/bench.py` runs too) and the prepare scripts. Its
message names the problem and the fix ("... : <what is wrong>; <what to do>"). Library code raises it
for bad input; programming errors stay ordinary exceptions so they keep their traceback.
"""

from __future__ import annotations

import reprlib
import sys
from typing import Callable

QUOTED_CHARS = 60  # the most characters of a user's value a message quotes


class _ShortRepr(reprlib.Repr):
    """repr that stops early at every level: a few items of a list or mapping, a few levels deep, so a
    value that is huge once expanded (a YAML alias bomb: a 1 KB file, gigabytes as text) is never built."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxdict, self.maxset = 3, 4, 4, 4, 4
        self.maxstring = self.maxother = self.maxlong = QUOTED_CHARS


_SHORT_REPR = _ShortRepr()


class UserError(Exception):
    """Bad input from the user: a path, a setting, a file. The message says what to do about it."""


def quoted(value) -> str:
    """`value` as a message quotes it: its repr, cut short (`cut`)."""
    return cut(_SHORT_REPR.repr(value))


def cut(text: str) -> str:
    """`text` (a user's value, a library's error) cut to QUOTED_CHARS characters with an ellipsis."""
    return text if len(text) <= QUOTED_CHARS else text[:QUOTED_CHARS - 3] + "..."


def check_type(name: str, value, expected: type | tuple[type, ...], hint: str) -> None:
    """A clear TypeError for a public API argument of the wrong type (a list for a tensor, a str for an
    int, the model and tokenizer swapped), where the internals would fail with an AttributeError."""
    if not isinstance(value, expected) or (isinstance(value, bool) and bool not in _as_tuple(expected)):
        raise TypeError(f"{name} must be {hint}, got {type(value).__name__}")


def _as_tuple(expected) -> tuple:
    return expected if isinstance(expected, tuple) else (expected,)


def exit_code_of(command: Callable[[], int | None], prog: str) -> int:
    """Run `command`; its exit code (None counts as 0), or 2 after `PROG: error: MESSAGE` for a UserError."""
    try:
        return int(command() or 0)
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
