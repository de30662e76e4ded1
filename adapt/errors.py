"""The one exception type for mistakes a user can fix, and how every command reports it.

A `UserError` becomes a single line on stderr and exit code 2, without a traceback: `exit_code_of`
does it for the `adapt` CLI (which `python scripts/bench.py` runs too) and the prepare scripts. Its
message names the problem and the fix ("... : <what is wrong>; <what to do>"). Library code raises it
for bad input; programming errors stay ordinary exceptions so they keep their traceback.
"""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the user: a path, a setting, a file. The message says what to do about it."""


def shortened(value, limit: int = 30) -> str:
    """`repr(value)` cut to `limit` characters: a value quoted in a message (an edited file may hold
    megabytes where a number belongs) must not bury the message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
