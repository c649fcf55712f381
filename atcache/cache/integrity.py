"""Is a store sound: every chunk of every array decodes (zarr checks its crc32c) and no done row holds NaN or Inf.
`inspect --verify` reads a range of units per task (`unit_problems`), `build-cache --repair` finds the row-chunks to
recompute (`damaged_chunks`)."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from atcache.cache.store import CacheStore, decode_failure, nonfinite_finished


def chunk_problem(store: CacheStore, name: str, k: int, done: np.ndarray) -> str | None:
    """Why unit k of array `name` cannot be trusted: it fails to decode (checksum mismatch, truncated file) or, for
    float arrays, a done row (`done`: the unit's rows of the done mask, or for replay arrays of the replay done
    mask) is not finite; None if it is sound. k is a row-chunk, or for `replay/...` arrays a replay unit."""
    replay = store.replay_unit(k) if name.startswith("replay/") else None
    e, a, b = replay if replay else (None, *store.chunk_range(k))
    try:
        block = _rows(store, name, e, a, b)
    except Exception as error:
        return decode_failure(error)
    bad = _nonfinite(store, name, block, done)
    return f"{len(bad)} done rows are not finite (first row {a + bad[0]})" if len(bad) else None


def _rows(store: CacheStore, name: str, e: int | None, a: int, b: int) -> np.ndarray:
    """Rows a:b of array `name`, or positions a:b of replay epoch e."""
    return store.array(name)[a:b] if e is None else store.array(name)[e, a:b]


def _nonfinite(store: CacheStore, name: str, block: np.ndarray, done: np.ndarray) -> np.ndarray:
    """Offsets of done rows of a block of array `name` that hold NaN or Inf (only float arrays can)."""
    if (any(kind in name for kind in ("norms/", "scales/", "grad/", "replay/stats"))
            or ("maps" in name and store.spec.map_dtype == "float16")):
        return nonfinite_finished(np.asarray(block), done)
    return np.zeros(0, dtype=np.int64)


def unit_problems(store: CacheStore, start: int, stop: int) -> list[tuple[str, int, str]]:
    """(array, unit, why) for each unit in [start, stop) of each array that cannot be trusted (see chunk_problem).
    Each array is read once per run of up to RUN_UNITS units of one kind (zarr fetches and decodes those chunks
    concurrently), unit by unit only where that read fails: verifying costs decompression, not a call per chunk, and
    holds one run in memory."""
    out = []
    for e, units in _unit_runs(store, start, stop):
        spans = [store.replay_unit(u)[1:] if e is not None else store.chunk_range(u) for u in units]
        a, b = spans[0][0], spans[-1][1]
        try:
            done = np.asarray(_rows(store, "done" if e is None else "replay/done", e, a, b), bool)
        except Exception:  # reported below as the done array's own problem; its rows count as not done
            done = np.zeros(b - a, dtype=bool)
        for name in (store.array_names() if e is None else store.replay_array_names()):
            try:
                block = _rows(store, name, e, a, b)
            except Exception:
                out += [(name, u, why) for u, (lo, hi) in zip(units, spans)
                        if (why := chunk_problem(store, name, u, done[lo - a:hi - a])) is not None]
                continue
            bad = _nonfinite(store, name, block, done) + a
            for u, (lo, hi) in zip(units, spans):
                rows = bad[(bad >= lo) & (bad < hi)]
                if len(rows):
                    out.append((name, u, f"{len(rows)} done rows are not finite (first row {rows[0]})"))
    return out


RUN_UNITS = 16  # units read together by unit_problems: zarr overlaps their chunks; memory stays one run's (~50 MB of
# replay maps at 640, whatever the rows of an epoch)


def _unit_runs(store: CacheStore, start: int, stop: int) -> list[tuple[int | None, list[int]]]:
    """Units [start, stop) grouped into runs of one kind and at most RUN_UNITS units: (None, row-chunks) and
    (epoch, replay units of that epoch)."""
    runs: list[tuple[int | None, list[int]]] = []
    for u in range(start, stop):
        e = None if u < store.n_chunks else store.replay_unit(u)[0]
        if runs and runs[-1][0] == e and len(runs[-1][1]) < RUN_UNITS:
            runs[-1][1].append(u)
        else:
            runs.append((e, [u]))
    return runs


def damaged_chunks(store: CacheStore, chunks: Iterable[int]) -> dict[int, list[str]]:
    """Row-chunks (of `chunks`) with an array whose chunk cannot be trusted (see chunk_problem): {k: [arrays]}."""
    damaged: dict[int, list[str]] = {}
    for k in chunks:
        for name, _, _ in unit_problems(store, k, k + 1):
            damaged.setdefault(k, []).append(name)
    return damaged
