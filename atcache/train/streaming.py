"""Training from a cache larger than RAM: cached maps read from the Zarr store chunk by chunk as the loader needs them.

The sampler visits the store's row-chunks in a random order and shuffles samples only within a window of W
consecutive chunks of that order, so each loader process decodes every chunk about once per epoch and keeps a few
decoded chunks in a small LRU (the window, plus the rows ultralytics' Mosaic reaches through `dataset.buffer`, its
recently loaded images). The samplers live in `samplers.py` (re-exported here for older scripts). No ultralytics
import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from atcache.config import DEFAULT_WINDOW
from atcache.errors import AtcacheError
from atcache.cache.format import CacheSpec, LetterboxTable
from atcache.cache.store import CacheStore
from atcache.train.samplers import BlockShuffleSampler, epoch_order, lru_chunks, with_sampler
from atcache.train.targets import ChunkReader, TargetRendering, padding_energy

__all__ = ["StreamingCacheTargets", "DecodedChunk", "GREY_ROWS",
           "BlockShuffleSampler", "epoch_order", "lru_chunks", "with_sampler"]  # the samplers: see samplers.py

GREY_ROWS = 2000  # rows sampled (from evenly spaced chunks) for the padding energy, as the in-RAM cache does


# ---------------------------------------------------------------------- rows read from the store on demand
@dataclass(frozen=True)
class DecodedChunk:
    """Row-chunk k of every requested layer: maps[layer] (r, H, W) float16, norms[layer] (r,) float32, from row start."""

    start: int
    maps: dict[int, np.ndarray]
    norms: dict[int, np.ndarray]


def _decode_chunk(store: CacheStore, k: int, layers: Sequence[int], done: np.ndarray) -> DecodedChunk:
    """Decode row-chunk k of all `layers` together; a chunk that fails its checksum, or a finished row that is not
    finite, stops training with one line naming the array and rows."""
    a, b = store.chunk_range(k)
    maps, norms = {}, {}
    for i in layers:
        maps[i], norms[i] = store.read_layer(i, a, b, done)
    return DecodedChunk(a, maps, norms)


class StreamingCacheTargets(ChunkReader, TargetRendering):
    """The cache's targets read from the store on demand: letterbox, files and done in RAM, maps and norms decoded a
    chunk at a time into an LRU of `capacity` chunks (`ChunkReader`: each process opens its own handle)."""

    def __init__(self, path: str | Path, spec: CacheSpec, layers: Sequence[int], letterbox: LetterboxTable,
                 files: np.ndarray, done: np.ndarray, grey: dict[int, float], capacity: int = 2 * DEFAULT_WINDOW + 1):
        super().__init__(path, capacity)
        self.spec, self.layers = spec, tuple(layers)
        self.letterbox, self.files, self.done, self.grey = letterbox, files, done, grey

    @classmethod
    def open(cls, cache: "str | Path | CacheStore", layers: Sequence[int], capacity: int = 2 * DEFAULT_WINDOW + 1,
             grey_rows: int | None = None) -> "StreamingCacheTargets":
        """Read what is small (letterbox, files, done) and the padding energies from evenly spaced chunks (enough for
        `grey_rows` rows, default GREY_ROWS)."""
        grey_rows = grey_rows or GREY_ROWS
        store = cache if isinstance(cache, CacheStore) else CacheStore.open(cache)
        done, letterbox = store.done_mask(), store.letterbox()
        n_sample = min(store.n_chunks, math.ceil(grey_rows / store.spec.chunk_rows))
        sampled = [_decode_chunk(store, int(k), layers, done)
                   for k in np.unique(np.linspace(0, store.n_chunks - 1, n_sample).round().astype(int))]
        rows = np.concatenate([np.arange(c.start, c.start + len(c.norms[layers[0]])) for c in sampled])
        def energy_of(i):
            maps, norms = np.concatenate([c.maps[i] for c in sampled]), np.concatenate([c.norms[i] for c in sampled])
            return lambda r: maps[r].astype(np.float32) * norms[r]

        grey = {i: padding_energy(energy_of(i), letterbox.take(rows), done[rows], store.spec.layer(i).stride,
                                  sample=grey_rows) for i in layers}
        return cls(store.path, store.spec, layers, letterbox, store.files(), done, grey, capacity)

    def decode(self, store: CacheStore, k: int) -> DecodedChunk:
        """Row-chunk k of every layer (see `_decode_chunk`)."""
        return _decode_chunk(store, k, self.layers, self.done)

    def _row(self, row: int) -> tuple[DecodedChunk, int]:
        if not self.done[row]:  # join_rows refuses these up front; never render a target from an unfinished row
            raise AtcacheError(f"cache {self.path}: row {row} is not finished but was asked for as a training target; "
                               "finish the cache with `atcache build-cache ... --resume`")
        c = self.chunk(row // self.spec.chunk_rows)
        return c, row - c.start

    def map_row(self, layer: int, row: int) -> np.ndarray:
        c, r = self._row(row)
        return c.maps[layer][r]

    def norm(self, layer: int, row: int) -> float:
        c, r = self._row(row)
        return c.norms[layer][r]
