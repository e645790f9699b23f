"""The one exception type the CLI turns into a one-line message (no traceback)."""


class MetatunerError(Exception):
    """Bad input or settings: the message names the file, line or key and what was expected."""


class MetatunerWarning(UserWarning):
    """Something the user should see but that does not stop the run (a stale lock cleared, a damaged
    checkpoint skipped, NaN written as null). The CLI prints these as `warning: ...` lines even though
    it silences library warnings."""
