"""The Zarr v3 cache store: the only module that knows its layout, chunking and codecs.

Layout (N rows = images of one split, in ultralytics' order; R = chunk_rows):
    maps/<layer>   (N, H, W) float16   normalised attention map A          chunks (R, H, W), fill NaN
    norms/<layer>  (N,)      float32   ||a||_2 before normalisation        chunks (R,),      fill NaN
    letterbox      (N, 7)    float32   h0, w0, h, w, pad_top, pad_left, ratio                  fill NaN
    files          (N,)      string    image path relative to the dataset root
    done           (N,)      bool      row written (set only after its data)
    attrs["atcache"]                   the CacheSpec (spec.py)

Row-chunk k (rows k*R .. (k+1)*R) is the unit of writing, resuming and sharding: every array is chunked by R rows
along axis 0, so one builder writing chunk k touches exactly one chunk file of each array and two builders with
disjoint chunk ranges never read-modify-write the same file. Each chunk carries a crc32c checksum.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from atcache.errors import AtcacheError
from atcache.spec import CacheSpec

SPEC_ATTR = "atcache"
LETTERBOX_WIDTH = 7
CREATE_WAIT_S = 120.0


def map_compressors() -> list:
    """Bit-shuffled LZ4 (fp16 mantissas barely compress with byte shuffle) then a crc32c checksum."""
    return [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle, typesize=2), Crc32cCodec()]


def small_compressors(typesize: int) -> list:
    return [BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle, typesize=typesize), Crc32cCodec()]


@dataclass(frozen=True)
class ChunkData:
    """The rows of one row-chunk, ready to write: maps[layer] (r, H, W) f16, norms[layer] (r,), letterbox (r, 7)."""

    maps: dict[int, np.ndarray]
    norms: dict[int, np.ndarray]
    letterbox: np.ndarray
    ok: np.ndarray  # (r,) bool: rows whose image was read; the others stay NaN and not done


class CacheStore:
    """A handle on one cache store; open with `create`, `open` or `open_or_create`."""

    def __init__(self, path: str | Path, group: zarr.Group, spec: CacheSpec):
        self.path, self.group, self.spec = Path(path), group, spec

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, writable: bool = False) -> "CacheStore":
        """Open an existing store and read its spec; clear errors for a missing, foreign or half-created store."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise AtcacheError(f"cache {path} does not exist (no zarr.json); build it with `atcache build-cache`")
        try:
            group = zarr.open_group(str(path), mode="r+" if writable else "r")
        except Exception as e:
            raise AtcacheError(f"cache {path} is not a readable Zarr v3 group: {e}") from e
        raw = group.attrs.get(SPEC_ATTR)
        if raw is None:
            raise AtcacheError(
                f"cache {path} has no atcache spec (its creation was interrupted or it is not an atcache store); "
                "rebuild with `atcache build-cache --overwrite`"
            )
        try:
            spec = CacheSpec.from_dict(raw)
        except (ValueError, TypeError, KeyError) as e:
            raise AtcacheError(f"cache {path}: {e}; rebuild it with this atcache version (--overwrite)") from e
        return cls(path, group, spec)

    @classmethod
    def create(cls, path: str | Path, spec: CacheSpec, files: Sequence[str]) -> "CacheStore":
        """Create a new store (the directory must not exist, or be empty and claimed by us)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if len(files) != spec.n_rows:
            raise ValueError(f"{len(files)} files for a spec of {spec.n_rows} rows")
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        n, r = spec.n_rows, spec.chunk_rows
        for layer in spec.layers:
            group.create_array(
                f"maps/{layer.index}", shape=(n, layer.height, layer.width), chunks=(r, layer.height, layer.width),
                dtype=spec.map_dtype, fill_value=np.nan, compressors=map_compressors(),
                dimension_names=("row", "y", "x"),
            )
            group.create_array(
                f"norms/{layer.index}", shape=(n,), chunks=(r,), dtype="float32", fill_value=np.nan,
                compressors=small_compressors(4), dimension_names=("row",),
            )
        group.create_array(
            "letterbox", shape=(n, LETTERBOX_WIDTH), chunks=(r, LETTERBOX_WIDTH), dtype="float32", fill_value=np.nan,
            compressors=small_compressors(4), dimension_names=("row", "field"),
            attributes={"columns": list(spec.letterbox.columns)},
        )
        group.create_array("done", shape=(n,), chunks=(r,), dtype="bool", fill_value=False,
                           compressors=small_compressors(1), dimension_names=("row",))
        files_arr = group.create_array("files", shape=(n,), chunks=(r,), dtype=str, fill_value="",
                                       dimension_names=("row",))
        files_arr[:] = np.asarray(files, dtype=object)
        group.attrs[SPEC_ATTR] = spec.to_dict()  # written last: a store with a spec is complete
        return cls(path, group, spec)

    @classmethod
    def open_or_create(
        cls, path: str | Path, spec: CacheSpec, files: Sequence[str], *, resume: bool, overwrite: bool, join: bool
    ) -> "CacheStore":
        """The build's entry point: claim and create the store, or reopen it for --resume / a sibling --shard.

        Creation is claimed with an atomic mkdir, so n shard processes started together create it exactly once."""
        path = Path(path)
        clear_for_build(path, resume=resume or join, overwrite=overwrite)
        try:
            path.mkdir(parents=True)
            return cls.create(path, spec, files)
        except FileExistsError:
            pass
        if not (resume or join):  # another process created it since the check above
            raise _exists_error(path)
        store = cls._wait_for_spec(path, wait=join)
        if store is None:  # creation never finished: nothing was computed yet, so start over
            _remove_store(path)
            return cls.open_or_create(path, spec, files, resume=resume, overwrite=False, join=join)
        store.check_compatible(spec, files)
        return store

    @classmethod
    def _wait_for_spec(cls, path: Path, wait: bool) -> "CacheStore | None":
        """Open `path` once its spec is written; None if it never is (an interrupted creation)."""
        if not (path / "zarr.json").exists() and any(path.iterdir()) and not wait:
            raise AtcacheError(f"{path} exists and is not an atcache store; choose another --out or remove it")
        deadline = time.monotonic() + (CREATE_WAIT_S if wait else 0.0)
        while True:
            if (path / "zarr.json").is_file() and SPEC_ATTR in zarr.open_group(str(path), mode="r").attrs:
                return cls.open(path, writable=True)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.2)

    def check_compatible(self, spec: CacheSpec, files: Sequence[str]) -> None:
        """Refuse to continue a store that was built for another teacher, dataset, imgsz, layers or settings."""
        diffs = self.spec.differences(spec)
        if diffs:
            raise AtcacheError(
                f"cache {self.path} was built with different settings ({'; '.join(diffs[:3])}); "
                "rerun with the original settings or pass --overwrite to rebuild"
            )
        stored = self.files()
        if list(stored) != list(files):
            raise AtcacheError(f"cache {self.path} lists other images than this split; pass --overwrite to rebuild")

    # ------------------------------------------------------------------ geometry of row-chunks
    @property
    def n_rows(self) -> int:
        return self.spec.n_rows

    @property
    def n_chunks(self) -> int:
        return -(-self.spec.n_rows // self.spec.chunk_rows)

    def chunk_range(self, k: int) -> tuple[int, int]:
        r = self.spec.chunk_rows
        return k * r, min((k + 1) * r, self.spec.n_rows)

    # ------------------------------------------------------------------ reading
    def files(self) -> np.ndarray:
        return np.asarray(self.group["files"][:], dtype=object)

    def done_mask(self) -> np.ndarray:
        """(N,) bool; a chunk of `done` that cannot be decoded counts as not done (its rows get recomputed)."""
        arr = self.group["done"]
        try:
            return np.asarray(arr[:], dtype=bool)
        except Exception:
            out = np.zeros(self.n_rows, dtype=bool)
            for k in range(self.n_chunks):
                a, b = self.chunk_range(k)
                try:
                    out[a:b] = arr[a:b]
                except Exception:
                    pass
            return out

    def complete_chunks(self) -> np.ndarray:
        """(n_chunks,) bool: every row of the chunk is done."""
        done = self.done_mask()
        return np.array([done[a:b].all() for a, b in map(self.chunk_range, range(self.n_chunks))], dtype=bool)

    def array_names(self) -> list[str]:
        """Every array of the store; each is chunked by `chunk_rows` rows along axis 0."""
        per_layer = [f"{kind}/{layer}" for kind in ("maps", "norms") for layer in self.spec.layer_indices]
        return per_layer + ["letterbox", "files", "done"]

    def maps_array(self, layer: int) -> zarr.Array:
        return self.group[f"maps/{layer}"]

    def norms_array(self, layer: int) -> zarr.Array:
        return self.group[f"norms/{layer}"]

    def read_rows(self, layer: int, rows: slice | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.maps_array(layer)[rows], self.norms_array(layer)[rows]

    def letterbox(self) -> np.ndarray:
        return np.asarray(self.group["letterbox"][:])

    def nbytes_stored(self) -> int:
        """Bytes on disk of the whole store."""
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    # ------------------------------------------------------------------ writing
    def write_chunk(self, k: int, data: ChunkData) -> None:
        """Write row-chunk k whole (data first, `done` last), so an interrupted write leaves it not done."""
        a, b = self.chunk_range(k)
        if data.letterbox.shape != (b - a, LETTERBOX_WIDTH):
            raise ValueError(f"chunk {k} holds {b - a} rows, got letterbox {data.letterbox.shape}")
        for layer in self.spec.layers:
            self.group[f"maps/{layer.index}"][a:b] = data.maps[layer.index].astype(self.spec.map_dtype, copy=False)
            self.group[f"norms/{layer.index}"][a:b] = data.norms[layer.index].astype(np.float32, copy=False)
        self.group["letterbox"][a:b] = data.letterbox.astype(np.float32, copy=False)
        self.group["done"][a:b] = data.ok.astype(bool, copy=False)


def _exists_error(path: Path) -> AtcacheError:
    return AtcacheError(f"cache {path} already exists; pass --resume to finish it or --overwrite to rebuild it from scratch")


def clear_for_build(path: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Before a build: --overwrite deletes an existing store; without --resume an existing one is refused."""
    path = Path(path)
    if overwrite and path.exists():
        _remove_store(path)
    elif path.exists() and not resume:
        raise _exists_error(path)


def _remove_store(path: Path) -> None:
    if not path.is_dir():
        path.unlink()
        return
    if any(path.iterdir()) and not (path / "zarr.json").exists():
        raise AtcacheError(f"{path} is not an atcache store, refusing to delete it; choose another --out")
    shutil.rmtree(path)


def chunks_for_shard(n_chunks: int, shard: int, n_shards: int) -> range:
    """The contiguous block of row-chunks that shard `shard` of `n_shards` owns (disjoint, covering all)."""
    if not (n_shards >= 1 and 0 <= shard < n_shards):
        raise AtcacheError(f"--shard {shard}/{n_shards} is out of range; use i/n with 0 <= i < n")
    start = n_chunks * shard // n_shards
    stop = n_chunks * (shard + 1) // n_shards
    return range(start, stop)


def iter_rows(chunks: Iterable[int], store: CacheStore) -> Iterable[int]:
    for k in chunks:
        a, b = store.chunk_range(k)
        yield from range(a, b)
