"""Errors for problems the user can fix (bad paths, wrong files, bad flags).

Library code raises :class:`UserError` with a one-line message that names the thing
and the fix; entry scripts and tools print that line and exit without a traceback.
This module imports nothing from the project, so every layer may use it.
"""


class UserError(Exception):
    """A problem in the user's input, reported as one line without a traceback."""
