"""User-facing errors: the CLI prints their message on one line and exits non-zero, no traceback."""


class UserError(Exception):
    """A mistake in what the user asked for or gave us (bad file, bad option, missing input)."""

    exit_code = 2
