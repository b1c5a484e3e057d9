"""User-facing errors: the CLI prints them as one line, without a traceback."""


class XtlError(Exception):
    """A problem with the user's input (a file, an option, a run directory)."""
