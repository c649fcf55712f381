"""The build's writer: finished units (row-chunks or replay units) compressed and written on one background thread
while the teacher computes the next, a failed write reported in one line."""

from __future__ import annotations

import errno
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from atcache.cache.store import CacheStore
from atcache.errors import AtcacheError, first_line


class UnitWriter:
    """Writes finished units (`write(unit, ...)`: a row-chunk by default, or a replay unit) on one background thread
    (at most `depth` waiting) so compression and I/O overlap the teacher; after a failed write nothing more is written
    and the failure is one AtcacheError."""

    def __init__(self, store: CacheStore, write: Callable[..., None] | None = None, depth: int = 2):
        self.store, self.depth, self.write = store, depth, write or store.write_chunk
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atcache-writer")
        self.pending: deque[Future] = deque()
        self.written, self.failed = 0, False

    def _write(self, k: int, *args, **kwargs) -> None:
        if self.failed:
            return
        try:
            self.write(k, *args, **kwargs)
        except BaseException:
            self.failed = True
            raise
        self.written += 1

    def _settle(self, keep: int) -> None:
        while len(self.pending) > keep:
            try:
                self.pending.popleft().result()
            except BaseException as e:
                raise AtcacheError(_write_error_message(self.store, e, self.written)) from e

    def put(self, k: int, *args, **kwargs) -> None:
        self._settle(self.depth - 1)
        self.pending.append(self.pool.submit(self._write, k, *args, **kwargs))

    def close(self) -> None:
        try:
            self._settle(0)
        finally:
            self.pool.shutdown(wait=True)


def _write_error_message(store: CacheStore, error: BaseException, written: int) -> str:
    """One line for a failed chunk write: disk full, permission, or the storage layer's own message."""
    code = getattr(error, "errno", None)
    kept = f"the {written} unit(s) written before are kept" if written else "finished units are kept"
    if code in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on the device"
        fix = "free space (or choose another --out), then rerun with --resume"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS) or isinstance(error, PermissionError):
        what = "permission denied" if code != errno.EROFS else "read-only file system"
        fix = "make the store writable (or choose another --out), then rerun with --resume"
    else:
        what = f"{type(error).__name__}: {first_line(error)}"
        fix = "fix the storage problem, then rerun with --resume"
    return f"writing to cache {store.path} failed ({what}); {kept}; {fix}"
