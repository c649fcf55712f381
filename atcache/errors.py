"""The one exception type the CLI turns into a one-line message and a non-zero exit code."""


class AtcacheError(Exception):
    """A problem the user can fix; the message names it and says how (no traceback is shown)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries raise multi-line ones), or its type when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
