"""Training from a cache larger than RAM: cached maps read from the Zarr store chunk by chunk as the loader needs them.

The sampler visits the store's row-chunks in a random order and shuffles samples only within a window of W
consecutive chunks of that order, so each loader process decodes every chunk about once per epoch and keeps a few
decoded chunks in a small LRU (the window, plus the rows ultralytics' Mosaic reaches through `dataset.buffer`, its
recently loaded images). Imports ultralytics through `targets`: import this module after `env.prepare()`.
"""

from __future__ import annotations

import math
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from atcache.config import DEFAULT_WINDOW
from atcache.errors import AtcacheError
from atcache.train.seeding import EpochSampler
from atcache.cache.format import CacheSpec, LetterboxTable
from atcache.cache.store import CacheStore
from atcache.train.targets import TargetRendering, padding_energy

GREY_ROWS = 2000  # rows sampled (from evenly spaced chunks) for the padding energy, as the in-RAM cache does


# ---------------------------------------------------------------------- sample order
def epoch_order(chunk_of: np.ndarray, window: int, seed: int, epoch: int) -> np.ndarray:
    """One epoch of dataset indices: the chunks (`chunk_of[i]` = chunk of sample i's row) in a random order, samples
    shuffled within each window of `window` consecutive chunks of that order; a function of (seed, epoch) only."""
    chunk_of = np.asarray(chunk_of)
    rng = np.random.default_rng([seed, epoch])
    by_chunk = np.argsort(chunk_of, kind="stable")
    _, counts = np.unique(chunk_of, return_counts=True)
    members = np.split(by_chunk, np.cumsum(counts)[:-1])
    order = rng.permutation(len(members))
    window = max(1, int(window))
    blocks = [rng.permutation(np.concatenate([members[j] for j in order[w:w + window]]))
              for w in range(0, len(order), window)]
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)


class BlockShuffleSampler(EpochSampler):
    """Chunk-grouped, window-shuffled sample order (see `epoch_order`), a new one at every pass; epochs counted and
    DDP ranks sliced as EpochSampler does, so each rank still reads whole chunks."""

    def __init__(self, chunk_of: Sequence[int], window: int = DEFAULT_WINDOW, seed: int = 0, rank: int = 0,
                 world_size: int = 1, encode_epoch: bool = False):
        super().__init__(len(chunk_of), seed, rank, world_size, encode_epoch)
        self.chunk_of, self.window = np.asarray(chunk_of), max(1, int(window))

    def order(self, epoch: int) -> np.ndarray:
        return epoch_order(self.chunk_of, self.window, self.seed, epoch)


def lru_chunks(window: int, rows_per_chunk: float, buffer_rows: int) -> int:
    """Decoded chunks a loader process keeps: the window being read, plus every window a Mosaic partner can come from
    (the last `buffer_rows` samples of the stream; with n workers a worker's buffer spans n times its own length)."""
    return 2 * window + math.ceil(buffer_rows / max(rows_per_chunk, 1.0)) + 1


def with_sampler(loader, sampler):
    """The same ultralytics InfiniteDataLoader (dataset, batch size, workers, collate, seeding: what ultralytics chose),
    drawing its indices from `sampler`; call before the first iteration (no workers have started)."""
    if getattr(loader, "iterator", None) is not None:
        raise RuntimeError("the loader has started; set its sampler before the first batch")
    extra = {"prefetch_factor": loader.prefetch_factor} if loader.num_workers > 0 else {}
    return type(loader)(
        dataset=loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
        pin_memory=loader.pin_memory, collate_fn=loader.collate_fn, worker_init_fn=loader.worker_init_fn,
        generator=loader.generator, drop_last=loader.drop_last, **extra,
    )


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


class StreamingCacheTargets(TargetRendering):
    """The cache's targets read from the store on demand: letterbox, files and done in RAM, maps and norms decoded a
    chunk at a time into an LRU of `capacity` chunks. Each process (every forked loader worker) opens its own handle."""

    def __init__(self, path: str | Path, spec: CacheSpec, layers: Sequence[int], letterbox: LetterboxTable,
                 files: np.ndarray, done: np.ndarray, grey: dict[int, float], capacity: int = 2 * DEFAULT_WINDOW + 1):
        self.path, self.spec, self.layers = str(path), spec, tuple(layers)  # a local path or a URL
        self.letterbox, self.files, self.done, self.grey = letterbox, files, done, grey
        self.capacity = capacity
        self.decoded: Counter[int] = Counter()  # chunk -> decodes in this process (for tests and measurements)
        self._store: CacheStore | None = None
        self._pid: int | None = None
        self._lru: OrderedDict[int, DecodedChunk] = OrderedDict()

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

    def __getstate__(self) -> dict:
        """Pickled (spawned workers, DDP) without the store handle and decoded chunks: the copy opens its own."""
        return {**self.__dict__, "_store": None, "_pid": None, "_lru": OrderedDict(), "decoded": Counter()}

    def chunk(self, k: int) -> DecodedChunk:
        """Row-chunk k, decoded once and kept while it is among the `capacity` most recently used."""
        if self._pid != os.getpid():  # first use in this process: zarr handles are not shared across a fork
            self._store, self._pid = CacheStore.open(self.path), os.getpid()
            self._lru.clear()
            self.decoded.clear()
        hit = self._lru.get(k)
        if hit is not None:
            self._lru.move_to_end(k)
            return hit
        decoded = _decode_chunk(self._store, k, self.layers, self.done)
        self.decoded[k] += 1
        self._lru[k] = decoded
        while len(self._lru) > max(1, self.capacity):
            self._lru.popitem(last=False)
        return decoded

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
