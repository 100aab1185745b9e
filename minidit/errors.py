"""The one exception type for problems a user can fix."""


class MiniditError(Exception):
    """A bad argument, a missing file, a mismatched checkpoint: something the user can act on.

    The message says what is wrong and what to do. `analyze.py` prints it as one line and exits 2.
    """
