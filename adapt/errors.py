"""The one exception type for mistakes a user can fix.

The CLI turns a `UserError` into a single line on stderr and exit code 2, without a traceback. Its
message names the problem and the fix ("... : <what is wrong>; <what to do>"). Library code raises it
for bad input; programming errors stay ordinary exceptions so they keep their traceback.
"""


class UserError(Exception):
    """Bad input from the user: a path, a setting, a file. The message says what to do about it."""
