"""The one exception type that means "the user's input is wrong": the CLI prints its message as one line."""


class UserError(Exception):
    """Bad input. `sae` prints `error: <message>` on stderr and exits with status 2, no traceback."""
