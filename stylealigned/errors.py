"""The one exception type that front ends turn into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input or environment the user can fix; the message names the problem and the fix, on one line."""
