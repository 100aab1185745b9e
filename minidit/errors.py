"""The one exception type for problems a user can fix."""


class MiniditError(Exception):
    """A bad argument, a missing file, a mismatched checkpoint: something the user can act on.

    The message says what is wrong and what to do. `analyze.py` prints it as one line and exits 2.
    """


def error_line(error: Exception) -> str:
    """The one line a command prints for a MiniditError, or for an OSError at a place that does not report its own
    (then its file name and the system's reason)."""
    if isinstance(error, OSError) and error.filename:
        return f"error: {error.filename}: {error.strerror}"
    return f"error: {error}"
