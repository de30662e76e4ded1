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


def exit_code_of(command: Callable[[], int | None], prog: str) -> int:
    """Run `command`; its exit code (None counts as 0), or 2 after `PROG: error: MESSAGE` for a UserError."""
    try:
        return int(command() or 0)
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
