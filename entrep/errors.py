"""The kit's user-facing errors: entry points print these as one line, without a traceback."""


class EntrepError(ValueError):
    """Bad input, config or run directory; the message names the file/record/key and the fix."""
