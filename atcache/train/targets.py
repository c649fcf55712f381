"""Stage 2's target sources: what atcache's training dataset (`datasets.py`) reads each sample's targets from.

`TargetSource` is the one interface; its implementations are the cache in RAM (`CacheTargets`, here), streamed from
disk chunk by chunk (`streaming.StreamingCacheTargets`) and the replay arrays (`replay.ReplayTargets`). Cached rows are
joined to training images by path; `--targets warp` renders each layer's target from the view tree the tracked
transforms recorded (`transforms.py`), `--targets static` returns the stored maps. `ChunkReader` is the per-process
reader shell the two on-disk sources share. No ultralytics import.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Hashable, Sequence

import numpy as np
import torch

from atcache.errors import AtcacheError
from atcache.train.views import View
from atcache.data.splits import relative_to_root
from atcache.train.render import BatchRenderer, Pieces, flatten, render_views
from atcache.cache.format import CacheSpec, LetterboxTable
from atcache.cache.format import decode_maps
from atcache.cache.store import CacheStore

VIEW_KEY = "atcache_view"
TARGETS_KEY = "at_targets"
GRAD_KEY = "at_grad"  # replay targets with --gradient-weight: each sample's J_T as (direction, norm)


class TargetSource(ABC):
    """Where a training dataset's targets come from. The dataset calls, in this order: `check` and `rows_for` once
    (made), then per sample `targets` (or, when `renders_batches`, ships the view flattened by `pieces` for
    `batch_renderer` to render whole batches on the training device)."""

    spec: CacheSpec
    layers: tuple[int, ...]  # cache layer indices, in the order targets are returned
    modes: ClassVar[tuple[str, ...]]  # the --targets modes this source serves
    renders_batches: ClassVar[bool] = False  # warp targets can be rendered per batch (`pad_of`, `batch_renderer`)
    gradients: bool = False  # samples also carry their view's input gradient (ReplayTargets.gradient)

    def check(self, im_files: Sequence[str], root: str | Path) -> None:
        """Refuse a training set other than the one this source was made for (beyond what `rows_for` refuses)."""

    @abstractmethod
    def rows_for(self, im_files: Sequence[str], root: str | Path) -> np.ndarray:
        """The row of each training image: what a sample's `views.Source.row` names."""

    @abstractmethod
    def targets(self, mode: str, view: View, epoch: int | None, index: int, image: torch.Tensor) -> list[np.ndarray]:
        """Per layer the (H/s, W/s) float32 target of one augmented sample: dataset `index` in `epoch` (None when
        unseeded), whose geometry is `view` and pixels `image` (3, H, W) uint8."""

    @abstractmethod
    def pad_of(self, row: int) -> tuple[float, float]:
        """(top, left) letterbox pad of a row."""

    def pieces(self, view: View) -> Pieces:
        """What a loader ships for `batch_renderer` to render the view's targets from: the view flattened."""
        return flatten(view, self.pad_of)

    def batch_renderer(self, device) -> BatchRenderer:
        raise AtcacheError(f"{type(self).__name__} cannot render targets per batch")


class ChunkReader(ABC):
    """The per-process reader shell of a store read chunk by chunk: the store is opened on first use in each process
    (zarr handles are not shared across a fork), decoded chunks are kept in an LRU of `capacity`, and a pickled copy
    (spawned loader workers, DDP) leaves the handle and chunks behind and opens its own."""

    def __init__(self, path: str | Path, capacity: int):
        self.path, self.capacity = str(path), capacity  # a local path or a URL
        self.decoded: Counter = Counter()  # chunk key -> decodes in this process (for tests and measurements)
        self._store: CacheStore | None = None
        self._pid: int | None = None
        self._lru: OrderedDict[Hashable, Any] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None, "_pid": None, "_lru": OrderedDict(), "decoded": Counter()}

    @abstractmethod
    def decode(self, store: CacheStore, key: Hashable) -> Any:
        """Chunk `key` read and decoded from `store`."""

    def chunk(self, key: Hashable) -> Any:
        """Chunk `key`, decoded once and kept while it is among the `capacity` most recently used."""
        if self._pid != os.getpid():  # first use in this process
            self._store, self._pid = CacheStore.open(self.path), os.getpid()
            self._lru.clear()
            self.decoded.clear()
        hit = self._lru.get(key)
        if hit is not None:
            self._lru.move_to_end(key)
            return hit
        decoded = self.decode(self._store, key)
        self.decoded[key] += 1
        self._lru[key] = decoded
        while len(self._lru) > max(1, self.capacity):
            self._lru.popitem(last=False)
        return decoded


class TargetRendering(TargetSource):
    """Targets from cached rows (--targets warp or static): needs `spec`, `layers`, `letterbox`, `files`, `done`, `grey`
    and the row readers `map_row(layer, row)` (H, W) float16 and `norm(layer, row)`; shared by the in-RAM and the
    streaming cache."""

    modes: ClassVar[tuple[str, ...]] = ("warp", "static")

    spec: CacheSpec
    layers: tuple[int, ...]
    letterbox: LetterboxTable
    files: np.ndarray
    done: np.ndarray
    grey: dict[int, float]

    def rows_for(self, im_files: Sequence[str], root: str | Path) -> np.ndarray:
        """Cache row of each training image, joined by its path relative to the dataset root."""
        root = Path(root).resolve()
        return join_rows(self.files, self.done, [relative_to_root(f, root) for f in im_files])

    @abstractmethod
    def map_row(self, layer: int, row: int) -> np.ndarray: ...

    @abstractmethod
    def norm(self, layer: int, row: int) -> float: ...

    def targets(self, mode: str, view: View, epoch: int | None, index: int, image: torch.Tensor) -> list[np.ndarray]:
        return self.static(view.row) if mode == "static" else self.warped(view)

    def pad_of(self, row: int) -> tuple[float, float]:
        """(top, left) letterbox pad of a row."""
        return float(self.letterbox["pad_top"][row]), float(self.letterbox["pad_left"][row])

    def stride(self, layer: int) -> int:
        return self.spec.layer(layer).stride

    def energy(self, layer: int, row: int) -> np.ndarray:
        """The un-normalised map a = A * ||a|| of one row, (H, W) float32."""
        return self.map_row(layer, row).astype(np.float32) * self.norm(layer, row)

    def warped(self, view: View) -> list[np.ndarray]:
        """Per layer: the view's warp target, rendered on the CPU by the warp renderer (`render.render_views`), as a
        training batch renders it."""
        return render_views(self, [view])[0]

    def static(self, row: int) -> list[np.ndarray]:
        """Per layer: the stored map A of `row` (the exact target for the un-augmented letterboxed image)."""
        return [self.map_row(layer, row).astype(np.float32) for layer in self.layers]


@dataclass
class CacheTargets(TargetRendering):
    """A finished cache in RAM: maps[layer] (N, H, W) as stored (float16, or uint8 with scales[layer] (N,): see
    store.decode_maps), norms[layer] (N,), letterbox, row of each file.

    Loaded once in the trainer process (padding energies included); forked loader workers share the arrays
    copy-on-write, and `batch_renderer` holds them as tensors for rendering whole batches on the training device."""

    spec: CacheSpec
    layers: tuple[int, ...]  # cache layer indices, in the order targets are returned
    maps: dict[int, np.ndarray]
    norms: dict[int, np.ndarray]
    letterbox: LetterboxTable
    files: np.ndarray
    done: np.ndarray
    grey: dict[int, float] = field(default_factory=dict)  # per layer: see padding_energy
    scales: dict[int, np.ndarray] | None = None  # uint8 maps only
    renders_batches: ClassVar[bool] = True

    @classmethod
    def load(cls, cache: "str | Path | CacheStore", layers: Sequence[int]) -> "CacheTargets":
        """Read the maps of `layers` into RAM as stored, every chunk checked (`train.check_cache` makes the other
        refusals)."""
        store = cache if isinstance(cache, CacheStore) else CacheStore.open(cache)
        with ThreadPoolExecutor(3) as side:  # the row tables are read while the layers are (a bucket's GETs overlap)
            done, letterbox, files = (side.submit(f) for f in (store.done_mask, store.letterbox, store.files))
            read = store.read_stored_layers(layers)
            done, letterbox, files = done.result(), letterbox.result(), files.result()
        for i in layers:
            store.refuse_nonfinite(i, *read[i], done=done)
        maps = {i: np.ascontiguousarray(read[i][0]) for i in layers}
        norms, scales = {i: read[i][1] for i in layers}, {i: read[i][2] for i in layers}
        targets = cls(spec=store.spec, layers=tuple(layers), maps=maps, norms=norms, letterbox=letterbox,
                      files=files, done=done, scales=scales if store.spec.map_dtype == "uint8" else None)
        targets.grey = {i: padding_energy(targets.energy_of(i), letterbox, done, store.spec.layer(i).stride)
                        for i in layers}
        return targets

    def map_row(self, layer: int, row: int) -> np.ndarray:
        if self.scales is None:
            return self.maps[layer][row]
        return decode_maps(self.maps[layer][row:row + 1], self.scales[layer][row:row + 1])[0]

    def norm(self, layer: int, row: int) -> float:
        return self.norms[layer][row]

    def energy_of(self, layer: int):
        """row -> (H, W) float32 energy of `layer`."""
        return lambda row: self.energy(layer, row)

    def batch_renderer(self, device) -> BatchRenderer:
        """The maps as tensors on `device` (shared, not copied, on a CPU) for rendering whole batches there."""
        return BatchRenderer({i: self.maps[i] for i in self.layers}, self.norms, self.scales,
                             {i: self.stride(i) for i in self.layers}, self.grey, self.spec.eps, device)

    def ram_bytes(self) -> int:
        """Bytes of the maps, norms and scales held."""
        held = list(self.maps.values()) + list(self.norms.values()) + list((self.scales or {}).values())
        return sum(a.nbytes for a in held)


def padding_energy(energy, letterbox: LetterboxTable, done: np.ndarray, stride: int, sample: int = 2000) -> float:
    """The teacher's typical energy on the grey fill: the median energy of cached cells that lie wholly in letterbox
    padding (over up to `sample` done rows; `energy(row)` -> (H, W) float32). Warped targets use it where no image is
    near a cell."""
    rows = np.flatnonzero(done)
    if not len(rows):
        return 0.0
    values = []
    box = {c: letterbox[c].astype(int) for c in ("h", "w", "pad_top", "pad_left")}
    for row in rows[np.linspace(0, len(rows) - 1, min(len(rows), sample)).astype(int)]:
        e = energy(row)
        gh, gw = e.shape
        ys, xs = np.arange(gh) * stride, np.arange(gw) * stride
        h, w, top, left = (box[c][row] for c in ("h", "w", "pad_top", "pad_left"))
        mask = ((ys + stride <= top) | (ys >= top + h))[:, None] | ((xs + stride <= left) | (xs >= left + w))[None, :]
        if mask.any():
            values.append(e[mask])
    return float(np.median(np.concatenate(values))) if values else 0.0


def join_rows(cached_files: np.ndarray, done: np.ndarray, rel_files: Sequence[str]) -> np.ndarray:
    """Rows of `rel_files` in a cache (by relative path, never by position); every one must be present and done."""
    row_of = {f: i for i, f in enumerate(cached_files)}
    rows = np.array([row_of.get(f, -1) for f in rel_files], dtype=np.int64)
    if (rows < 0).any():
        absent = [f for f, r in zip(rel_files, rows) if r < 0]
        raise AtcacheError(
            f"{len(absent)} training images are not in the cache (e.g. {absent[0]}); it was built for another "
            "dataset or split: rebuild it with `atcache build-cache --data <this data YAML> --split train`"
        )
    missing = ~done[rows]
    if missing.any():
        raise AtcacheError(
            f"the cache is incomplete: {int(missing.sum())} training images have no targets yet "
            f"(e.g. {cached_files[rows[missing][0]]}); finish it with `atcache build-cache ... --resume` "
            "(images skipped as unreadable: fix or delete them, then rebuild with --overwrite)"
        )
    return rows
