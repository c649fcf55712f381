"""The exception types the CLI turns into a one-line message and a non-zero exit code: AtcacheError (a problem the
user can fix) and Interrupted (Ctrl-C or SIGTERM), with the signal handling that raises the latter."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable


class AtcacheError(Exception):
    """A problem the user can fix; the message names it and says how (no traceback is shown)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries raise multi-line ones), or its type when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM (SLURM, Kubernetes, `timeout`) stopped a command. `message` says what was kept and
    how to continue; the code that knows it adds it on the way out (`explain_interruption`), the CLI prints `line()`
    and exits with `exit_code` (128 + the signal, as a shell reports a process the signal killed)."""

    def __init__(self, signum: int = signal.SIGINT, message: str = ""):
        super().__init__(message)
        self.signum, self.message = int(signum), message

    def __reduce__(self):
        return Interrupted, (self.signum, self.message)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def line(self) -> str:
        how = "stopped by SIGTERM" if self.signum == signal.SIGTERM else \
            "interrupted (Ctrl-C)" if self.signum == signal.SIGINT else f"stopped by {signal.Signals(self.signum).name}"
        return f"atcache: {how}" + (f"; {self.message}" if self.message else "")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # the stop signals this process received since `stop_on_signals` began


def _stop(signum, frame):
    if signum in _received:  # the same signal again (SLURM's, then a parent's forward) must not cut the unwinding short
        return
    _received.append(signum)
    if hasattr(signal, "SIGCHLD") and callable(signal.getsignal(signal.SIGCHLD)):
        # torch's DataLoader turns a worker's death into a RuntimeError raised wherever this thread is, up to the
        # process's exit; SLURM sends SIGTERM to the workers too: from now on their deaths are expected, not errors
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM, like Ctrl-C, raises Interrupted in this (main) thread while the block runs, so that `finally` blocks,
    context managers and `explain_interruption` run on the way out; handlers are restored after. A handler someone
    else installed (e.g. SIGINT ignored under nohup, or this block's own handler when nested) is left alone."""
    main = threading.current_thread() is threading.main_thread()
    mine = [s for s in STOP_SIGNALS if main and signal.getsignal(s) in (signal.SIG_DFL, signal.default_int_handler)]
    if not mine:
        yield
        return
    previous = {s: signal.signal(s, _stop) for s in mine}
    _received.clear()
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received.clear()


def as_interruption(e: BaseException) -> Interrupted | None:
    """`e` as an Interrupted when a stop signal caused it: Ctrl-C's KeyboardInterrupt, or any error raised after a
    stop signal arrived (torch's "DataLoader worker killed" when SLURM terminated the loader workers too, a wait cut
    short and re-raised as another error); None for everything else."""
    if isinstance(e, Interrupted):
        return e
    if isinstance(e, KeyboardInterrupt):
        return Interrupted(_received[0] if _received else signal.SIGINT)
    if isinstance(e, Exception) and _received:
        return Interrupted(_received[0])
    return None


def one_line(e: BaseException) -> tuple[str, int] | None:
    """What a command prints for `e` (one line, no traceback) and its exit code; None for anything else (a bug):
    Ctrl-C or SIGTERM, or an error they caused -> Interrupted.line() and 128 + the signal (130, 143); an AtcacheError or
    OSError -> `atcache: error: ...` and 2."""
    if (stop := as_interruption(e)) is not None:
        return stop.line(), stop.exit_code
    if isinstance(e, AtcacheError):
        return f"atcache: error: {e}", 2
    if isinstance(e, OSError):  # disk full, permission denied, ... outside the paths that explain themselves
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        return (f"atcache: error: {e.strerror or e}{where}; fix the file system problem and rerun (a build keeps its "
                "finished chunks: add --resume)"), 2
    return None


@contextlib.contextmanager
def explain_interruption(explain: Callable[[], str]):
    """An interruption leaving the block becomes Interrupted with `explain()` as its message (what was kept, how to
    continue), unless code further in explained it already."""
    try:
        yield
    except BaseException as e:
        stop = as_interruption(e)
        if stop is None:
            raise
        if stop is e and stop.message:
            raise
        raise Interrupted(stop.signum, explain()) from None


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM wait until the block is done (a file written whole), then act as they would have."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.signal(s, lambda n, _: held.append(n)) for s in STOP_SIGNALS if signal.getsignal(s) is not None}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(held):
            signal.raise_signal(s)
