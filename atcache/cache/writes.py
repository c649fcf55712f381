"""Writing one unit's chunks, and reading several arrays, concurrently: every array's chunk is its own file or object,
so on a bucket the PUTs and GETs overlap instead of queueing (zarr's synchronous API is thread-safe: it runs on zarr's
own event loop)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import zarr

WRITE_THREADS = 16  # concurrent chunk writes of one unit (I/O bound)
_POOL: tuple[int, ThreadPoolExecutor] | None = None
T = TypeVar("T")


def _pool() -> ThreadPoolExecutor:
    """The writer threads, one pool per process (a forked child gets its own)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=WRITE_THREADS, thread_name_prefix="atcache-write"))
    return _POOL[1]


def write_together(array: Callable[[str], zarr.Array], writes: Sequence[tuple[str, Any, np.ndarray]]) -> None:
    """(array name, selection, values) writes, concurrently; every write finishes before this returns, and the first
    failure is raised (the caller marks the unit done only after)."""
    def put(name: str, at: Any, values: np.ndarray) -> None:
        array(name)[at] = values

    futures = [_pool().submit(put, name, at, values) for name, at, values in writes]
    failed = next((e for e in (f.exception() for f in futures) if e is not None), None)
    if failed is not None:
        raise failed


def read_together(read: Callable[[str], T], names: Sequence[str]) -> dict[str, T]:
    """{name: read(name)} with the reads running concurrently; the first failure is raised. Not for use from inside
    another read or write of this module (they share one pool)."""
    futures = {name: _pool().submit(read, name) for name in dict.fromkeys(names)}
    return {name: f.result() for name, f in futures.items()}
