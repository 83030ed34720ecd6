"""The one exception type that the command line turns into a one-line message and exit status 2."""


class UserError(Exception):
    """Bad input or configuration: the message names the problem and, where possible, the fix."""
