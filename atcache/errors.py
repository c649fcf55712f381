"""The one exception type the CLI turns into a one-line message and a non-zero exit code."""


class AtcacheError(Exception):
    """A problem the user can fix; the message names it and says how (no traceback is shown)."""
