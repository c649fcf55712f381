"""Training from a cache larger than RAM: cached maps read from the Zarr store chunk by chunk as the loader needs them.

The sampler visits the store's row-chunks in a random order and shuffles samples only within a window of W
consecutive chunks of that order, so each loader process decodes every chunk about once per epoch and keeps a few
decoded chunks in a small LRU (the window, plus the rows ultralytics' Mosaic reaches through `dataset.buffer`, its
recently loaded images). Warp targets are rendered by the one warp renderer (`render.BatchRenderer`), per batch on
the training device like the in-RAM cache's: the loader ships each sample's flattened view with its source rows' maps
as stored (`render.Pieces.maps`); a single view (`warped`) is rendered the same way. The samplers live in
`samplers.py` (re-exported here for older scripts). No ultralytics import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np

from atcache.config import DEFAULT_WINDOW
from atcache.errors import AtcacheError
from atcache.cache.format import CacheSpec, LetterboxTable, decode_maps
from atcache.cache.store import CacheStore
from atcache.train.render import BatchRenderer, Pieces, flatten
from atcache.train.samplers import BlockShuffleSampler, epoch_order, lru_chunks
from atcache.yolo import with_sampler
from atcache.train.targets import ChunkReader, TargetRendering, padding_energy
from atcache.train.views import View

__all__ = ["StreamingCacheTargets", "DecodedChunk", "GREY_ROWS",
           "BlockShuffleSampler", "epoch_order", "lru_chunks", "with_sampler"]  # the samplers: see samplers.py

GREY_ROWS = 2000  # rows sampled (from evenly spaced chunks) for the padding energy, as the in-RAM cache does


# ---------------------------------------------------------------------- rows read from the store on demand
@dataclass(frozen=True)
class DecodedChunk:
    """Row-chunk k of every requested layer, from row start: maps[layer] (r, H, W) as stored (float16, or uint8 with
    scales[layer] (r,) float32; see format.decode_maps), norms[layer] (r,) float32."""

    start: int
    maps: dict[int, np.ndarray]
    norms: dict[int, np.ndarray]
    scales: dict[int, np.ndarray] | None

    def decoded(self, layer: int) -> np.ndarray:
        """The layer's maps A (r, H, W) float16."""
        return decode_maps(self.maps[layer], None if self.scales is None else self.scales[layer])


def _decode_chunk(store: CacheStore, k: int, layers: Sequence[int], done: np.ndarray) -> DecodedChunk:
    """Read row-chunk k of all `layers` together, maps kept as stored; a chunk that fails its checksum, or a finished
    row that is not finite, stops training with one line naming the array and rows."""
    a, b = store.chunk_range(k)
    read = store.read_stored_layers(layers, a, b, done)
    maps, norms, scales = ({i: read[i][j] for i in layers} for j in range(3))
    return DecodedChunk(a, maps, norms, scales if store.spec.map_dtype == "uint8" else None)


class StreamingCacheTargets(ChunkReader, TargetRendering):
    """The cache's targets read from the store on demand: letterbox, files and done in RAM, maps and norms decoded a
    chunk at a time into an LRU of `capacity` chunks (`ChunkReader`: each process opens its own handle). Warp targets
    are rendered by `render.BatchRenderer` from the rows the pieces ship: a batch's on the training device (`pieces`,
    `batch_renderer`), a single view's on the CPU (`warped`)."""

    renders_batches: ClassVar[bool] = True

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
            maps = np.concatenate([c.decoded(i) for c in sampled])
            norms = np.concatenate([c.norms[i] for c in sampled])
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
        if c.scales is None:
            return c.maps[layer][r]
        return decode_maps(c.maps[layer][r:r + 1], c.scales[layer][r:r + 1])[0]

    def norm(self, layer: int, row: int) -> float:
        c, r = self._row(row)
        return c.norms[layer][r]

    def pieces(self, view: View) -> Pieces:
        """The view flattened, with the maps (K, H, W) as stored, norms and scales (K,) of each piece's row per layer:
        the device holds no table of a streamed cache, so each batch brings the rows it renders from."""
        flat = flatten(view, self.pad_of)
        at = [self._row(int(row)) for row in flat.rows]
        maps = {i: np.stack([c.maps[i][r] for c, r in at]) for i in self.layers}
        norms = {i: np.array([c.norms[i][r] for c, r in at], dtype=np.float32) for i in self.layers}
        scales = None if at[0][0].scales is None else {
            i: np.array([c.scales[i][r] for c, r in at], dtype=np.float32) for i in self.layers}
        return replace(flat, maps=maps, norms=norms, scales=scales)

    def batch_renderer(self, device) -> BatchRenderer:
        """A renderer on `device` holding no maps: each batch's collated pieces bring them (`collate_pieces`)."""
        return BatchRenderer(None, None, None, {i: self.stride(i) for i in self.layers}, self.grey, self.spec.eps,
                             device)
