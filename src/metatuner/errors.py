"""The one exception type the CLI turns into a one-line message (no traceback)."""


class MetatunerError(Exception):
    """Bad input or settings: the message names the file, line or key and what was expected."""
