"""The Zarr v3 cache store: the only module that knows its layout, chunking and codecs.

Layout (N rows = images of one split, in ultralytics' order; R = chunk_rows):
    maps/<layer>   (N, H, W) float16   normalised attention map A          chunks (R, H, W), fill NaN
    norms/<layer>  (N,)      float32   ||a||_2 before normalisation        chunks (R,),      fill NaN
    letterbox      (N, 7)    float32   columns spec.LETTERBOX_COLUMNS (attrs["columns"]), read by name  fill NaN
    files          (N,)      string    image path relative to the dataset root
    done           (N,)      bool      row written (set only after its data)
    attrs["atcache"]                   the CacheSpec (spec.py)

Row-chunk k (rows k*R .. (k+1)*R) is the unit of writing, resuming and sharding: every array is chunked by R rows
along axis 0, so one builder writing chunk k touches exactly one chunk file of each array and two builders with
disjoint chunk ranges never read-modify-write the same file. Each chunk carries a crc32c checksum.
Reading goes through `CacheStore.read` / `read_layer` / `letterbox`: a chunk that fails to decode, or a finished row
that is not finite, is one AtcacheError naming the array and rows (training never runs on garbage).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from atcache.errors import AtcacheError, first_line
from atcache.location import Location
from atcache.spec import CacheSpec, LetterboxTable

SPEC_ATTR = "atcache"
CREATE_WAIT_S = 120.0
CREATE_RECORD = "atcache-create.json"  # remote stores: who claimed the creation
LOCK_PREFIX = "atcache-locks"  # ownership records of builders (ChunkClaim); zarr ignores these keys
LOCK_STALE_S = 600.0
HEARTBEAT_S = 30.0


def map_compressors(dtype: str = "float16") -> list:
    """float16: bit-shuffled LZ4 (fp16 mantissas barely compress with byte shuffle); uint8: zstd-9 without shuffle
    (measured on a teacher's maps at 640: 8.9 KB/image against 10.7 with lz4 + bitshuffle); then a crc32c checksum."""
    if dtype == "uint8":
        return [BloscCodec(cname="zstd", clevel=9, shuffle=BloscShuffle.noshuffle, typesize=1), Crc32cCodec()]
    return [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle, typesize=2), Crc32cCodec()]


MAP_DTYPES = ("float16", "uint8")


def encode_maps(maps: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(stored maps, per-map scales or None) for maps A (r, H, W) >= 0: float16 as they are; uint8 in the square-root
    domain, q = round(255 sqrt(A / max A)) with max A per map as its scale (NaN rows: q 0, scale NaN). Chosen by
    measurement on a trained teacher: min cosine to the source 0.99999 per layer, linear uint8 0.99995."""
    if dtype == "float16":
        return maps.astype(np.float16, copy=False), None
    x = np.asarray(maps, dtype=np.float32)
    scale = x.reshape(len(x), -1).max(1) if x.size else np.zeros(len(x), np.float32)
    safe = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)[:, None, None]
    q = np.round(255.0 * np.sqrt(np.clip(np.nan_to_num(x / safe), 0.0, 1.0))).astype(np.uint8)
    return q, scale.astype(np.float32)


def decode_maps(stored: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """float16 maps from what `encode_maps` stored (uint8 maps are A = scale (q / 255)^2)."""
    if scales is None:
        return np.asarray(stored)
    q = np.asarray(stored, dtype=np.float32) / 255.0
    return (np.asarray(scales, dtype=np.float32).reshape(-1, *([1] * (q.ndim - 1))) * q * q).astype(np.float16)


def small_compressors(typesize: int) -> list:
    return [BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle, typesize=typesize), Crc32cCodec()]


@dataclass(frozen=True)
class ChunkData:
    """The rows of one row-chunk, ready to write: maps[layer] (r, H, W) f16, norms[layer] (r,), letterbox (r, columns)."""

    maps: dict[int, np.ndarray]
    norms: dict[int, np.ndarray]
    letterbox: np.ndarray
    ok: np.ndarray  # (r,) bool: rows whose image was read; the others stay NaN and not done


class CacheStore:
    """A handle on one cache store (a local directory or an fsspec URL); open with `create`, `open` or
    `open_or_create`."""

    def __init__(self, location: Location, group: zarr.Group, spec: CacheSpec):
        self.location, self.group, self.spec = location, group, spec

    @property
    def path(self) -> str:
        """The store's local path or URL, for messages."""
        return self.location.url

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: "str | Path | Location", writable: bool = False) -> "CacheStore":
        """Open an existing store and read its spec; clear errors for a missing, foreign or half-created store."""
        loc = Location.of(path)
        if not loc.exists("zarr.json"):
            raise AtcacheError(f"cache {loc} does not exist (no zarr.json); build it with `atcache build-cache`")
        try:
            group = zarr.open_group(loc.url, mode="r+" if writable else "r")
        except Exception as e:
            raise AtcacheError(f"cache {loc} is not a readable Zarr v3 group: {first_line(e)}") from e
        raw = group.attrs.get(SPEC_ATTR)
        if raw is None:
            raise AtcacheError(
                f"cache {loc} has no atcache spec (its creation was interrupted or it is not an atcache store); "
                "rebuild with `atcache build-cache --overwrite`"
            )
        try:
            spec = CacheSpec.from_dict(raw)
        except (ValueError, TypeError, KeyError) as e:
            raise AtcacheError(f"cache {loc}: {e}; rebuild it with this atcache version (--overwrite)") from e
        return cls(loc, group, spec)

    @classmethod
    def create(cls, path: "str | Path | Location", spec: CacheSpec, files: Sequence[str]) -> "CacheStore":
        """Create a new store (the location must not hold one, or be empty and claimed by us)."""
        loc = Location.of(path)
        if not loc.remote:
            loc.local_path.mkdir(parents=True, exist_ok=True)
        if len(files) != spec.n_rows:
            raise ValueError(f"{len(files)} files for a spec of {spec.n_rows} rows")
        group = zarr.open_group(loc.url, mode="a", zarr_format=3)
        n, r = spec.n_rows, spec.chunk_rows
        for layer in spec.layers:
            group.create_array(
                f"maps/{layer.index}", shape=(n, layer.height, layer.width), chunks=(r, layer.height, layer.width),
                dtype=spec.map_dtype, fill_value=_map_fill(spec), compressors=map_compressors(spec.map_dtype),
                dimension_names=("row", "y", "x"), overwrite=True,
            )
            if spec.map_dtype == "uint8":
                group.create_array(f"scales/{layer.index}", shape=(n,), chunks=(r,), dtype="float32", fill_value=np.nan,
                                   compressors=small_compressors(4), dimension_names=("row",), overwrite=True)
            group.create_array(
                f"norms/{layer.index}", shape=(n,), chunks=(r,), dtype="float32", fill_value=np.nan,
                compressors=small_compressors(4), dimension_names=("row",), overwrite=True,
            )
        group.create_array(
            "letterbox", shape=(n, width := len(spec.letterbox.columns)), chunks=(r, width), dtype="float32",
            fill_value=np.nan,
            compressors=small_compressors(4), dimension_names=("row", "field"),
            attributes={"columns": list(spec.letterbox.columns)}, overwrite=True,
        )
        group.create_array("done", shape=(n,), chunks=(r,), dtype="bool", fill_value=False,
                           compressors=small_compressors(1), dimension_names=("row",), overwrite=True)
        files_arr = group.create_array("files", shape=(n,), chunks=(r,), dtype=str, fill_value="",
                                       dimension_names=("row",), overwrite=True)
        files_arr[:] = np.asarray(files, dtype=object)
        if spec.replay is not None:
            _create_replay_arrays(group, spec)
        group.attrs[SPEC_ATTR] = spec.to_dict()  # written last: a store with a spec is complete
        return cls(loc, group, spec)

    @classmethod
    def open_or_create(
        cls, path: "str | Path | Location", spec: CacheSpec, files: Sequence[str], *, resume: bool, overwrite: bool,
        join: bool, repair: bool = False,
    ) -> "CacheStore":
        """The build's entry point: claim and create the store, or reopen it for --resume / a sibling --shard.

        Creation is claimed atomically (mkdir locally, a create-if-absent record remotely), so n shard processes
        started together create it exactly once."""
        loc = Location.of(path)
        _clear_for_build(loc, resume=resume or join, overwrite=overwrite)
        if _claim_creation(loc):
            return cls.create(loc, spec, files)
        if not (resume or join):  # another process created it since the check above
            raise _exists_error(loc)
        store = cls._wait_for_spec(loc, wait=join)
        if store is None:  # creation never finished: nothing was computed yet, so start over
            _remove_store(loc)
            return cls.open_or_create(loc, spec, files, resume=resume, overwrite=False, join=join)
        store.check_compatible(spec, files, repair=repair)
        return store

    @classmethod
    def _wait_for_spec(cls, loc: Location, wait: bool) -> "CacheStore | None":
        """Open `loc` once its spec is written. While its creator is alive this waits (up to CREATE_WAIT_S); None if
        the creation was interrupted (its creator is dead), so the caller starts over: nothing was computed yet."""
        deadline = time.monotonic() + CREATE_WAIT_S
        while True:
            if loc.exists("zarr.json") and SPEC_ATTR in zarr.open_group(loc.url, mode="r").attrs:
                return cls.open(loc, writable=True)
            raw = loc.read(CREATE_RECORD)
            if raw is None and not loc.exists("zarr.json"):
                if not loc.is_empty() and not wait:
                    raise AtcacheError(f"{loc} exists and is not an atcache store; choose another --out or remove it")
            elif raw is None or (_parse_record(raw) and not owner_alive(_parse_record(raw))):
                return None  # (an unreadable record is one being written: wait for it)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.2)

    def check_compatible(self, spec: CacheSpec, files: Sequence[str], repair: bool = False) -> None:
        """Refuse to continue a store that was built for another teacher, dataset, imgsz, layers or settings
        (with `repair`, an undecodable image list is rewritten from the split, which the spec's fingerprint vouches for)."""
        diffs = self.spec.differences(spec)
        if diffs:
            raise AtcacheError(
                f"cache {self.path} was built with different settings ({'; '.join(diffs[:3])}); "
                "rerun with the original settings or pass --overwrite to rebuild"
            )
        try:
            stored = self.files()
        except Exception as e:
            if repair:
                self.rewrite_files(files)
                return
            raise AtcacheError(
                f"cache {self.path}: the image list (files) cannot be decoded ({first_line(e)}); "
                "rerun with --resume --repair to rewrite it"
            ) from e
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

    # ------------------------------------------------------------------ units: row-chunks, then replay chunks
    # The unit of writing, resuming, claiming and sharding: units 0 .. n_chunks-1 are the row-chunks of the static
    # arrays; with replay arrays, unit n_chunks + e * K + k is positions k*R' .. (k+1)*R' of epoch e (K chunks each).
    @property
    def n_units(self) -> int:
        replay = self.spec.replay
        return self.n_chunks + (replay.epochs * replay.chunks_per_epoch if replay else 0)

    def replay_unit(self, u: int) -> tuple[int, int, int] | None:
        """(epoch, first position, end position) of replay unit u; None for a row-chunk of the static arrays."""
        if u < self.n_chunks:
            return None
        replay = self.spec.replay
        e, k = divmod(u - self.n_chunks, replay.chunks_per_epoch)
        return e, k * replay.chunk_rows, min((k + 1) * replay.chunk_rows, replay.samples)

    def unit_rows(self, units: Iterable[int]) -> tuple[int, int]:
        """(rows of row-chunks, samples of replay chunks) that the units hold."""
        static = replayed = 0
        for u in units:
            r = self.replay_unit(u)
            if r is None:
                a, b = self.chunk_range(u)
                static += b - a
            else:
                replayed += r[2] - r[1]
        return static, replayed

    def complete_units(self) -> np.ndarray:
        """(n_units,) bool: every row (or replayed sample) of the unit is done."""
        out = list(self.complete_chunks())
        if self.spec.replay is not None:
            done = self.replay_done()
            out += [bool(done[e, a:b].all()) for e, a, b in map(self.replay_unit, range(self.n_chunks, self.n_units))]
        return np.array(out, dtype=bool)

    def replay_done(self) -> np.ndarray:
        """(E, M) bool: replayed samples written; a chunk that cannot be decoded counts as not done."""
        try:
            return np.asarray(self.group["replay/done"][:], dtype=bool)
        except Exception:
            replay = self.spec.replay
            out = np.zeros((replay.epochs, replay.samples), dtype=bool)
            for e, a, b in map(self.replay_unit, range(self.n_chunks, self.n_units)):
                try:
                    out[e, a:b] = self.group["replay/done"][e, a:b]
                except Exception:
                    pass
            return out

    def write_replay(self, u: int, maps: dict[int, np.ndarray], norms: dict[int, np.ndarray], samples: np.ndarray,
                     records: np.ndarray) -> None:
        """Write replay unit u whole (data first, `done` last): per layer the maps (r, H, W) and norms (r,) of the
        positions, the dataset index of each position and the fingerprint of its augmented image."""
        e, a, b = self.replay_unit(u)
        for layer in self.spec.layers:
            stored, scales = encode_maps(maps[layer.index], self.spec.map_dtype)
            self.group[f"replay/maps/{layer.index}"][e, a:b] = stored
            if scales is not None:
                self.group[f"replay/scales/{layer.index}"][e, a:b] = scales
            self.group[f"replay/norms/{layer.index}"][e, a:b] = norms[layer.index].astype(np.float32, copy=False)
        self.group["replay/sample"][e, a:b] = samples.astype(np.int32, copy=False)
        self.group["replay/record"][e, a:b] = records.astype(np.uint64, copy=False)
        self.group["replay/done"][e, a:b] = True

    def read_replay(self, layers: Sequence[int], e: int, a: int, b: int) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """({layer: maps (r, H, W) float16}, fingerprints (r,) uint64) of positions a:b of epoch e; a chunk that fails
        to decode is one AtcacheError naming the array, epoch and positions."""
        out = {}
        scales = [f"replay/scales/{i}" for i in layers] if self.spec.map_dtype == "uint8" else []
        for name in [f"replay/maps/{i}" for i in layers] + scales + ["replay/record", "replay/done"]:
            try:
                out[name] = np.asarray(self.group[name][e, a:b])
            except Exception as error:
                raise AtcacheError(f"cache {self.path}: {name} epoch {e} positions {a}-{b - 1} "
                                   f"{_decode_failure(error)}; rebuild the replay arrays with build-cache --overwrite") from None
        if not out["replay/done"].all():
            raise AtcacheError(f"cache {self.path}: replay epoch {e} positions {a}-{b - 1} are not built yet; finish "
                               "the cache with `atcache build-cache ... --resume`")
        return {i: decode_maps(out[f"replay/maps/{i}"], out.get(f"replay/scales/{i}")) for i in layers}, out["replay/record"]

    def array_names(self) -> list[str]:
        """Every array of the store; each is chunked by `chunk_rows` rows along axis 0."""
        kinds = ("maps", "norms") + (("scales",) if self.spec.map_dtype == "uint8" else ())
        per_layer = [f"{kind}/{layer}" for kind in kinds for layer in self.spec.layer_indices]
        return per_layer + ["letterbox", "files", "done"]

    def read(self, name: str, a: int = 0, b: int | None = None) -> np.ndarray:
        """Rows a:b (default: all) of array `name`; a chunk that fails to decode (crc32c mismatch, truncated file) is
        one AtcacheError naming the array and the rows of the first chunk that fails."""
        b = self.n_rows if b is None else b
        try:
            return np.asarray(self.group[name][a:b])
        except Exception as e:
            error = e
        r = self.spec.chunk_rows
        for k in range(a // r, -(-b // r)):  # which chunk: decode them one at a time
            lo, hi = max(a, k * r), min(b, (k + 1) * r)
            try:
                self.group[name][lo:hi]
            except Exception as e:
                raise self.chunk_error(name, lo, hi, _decode_failure(e)) from None
        raise self.chunk_error(name, a, b, _decode_failure(error)) from None

    def read_layer(self, layer: int, a: int = 0, b: int | None = None,
                   done: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(maps (r, H, W) float16, norms (r,) float32) of `layer` for rows a:b; with `done` (the store's done mask) a
        finished row that holds NaN or Inf is refused in one line naming its chunk."""
        stored, norms, scales = self.read_stored_layer(layer, a, b, done)
        return decode_maps(stored, scales), norms

    def read_stored_layer(self, layer: int, a: int = 0, b: int | None = None, done: np.ndarray | None = None
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """read_layer without decoding: (maps as stored (float16, or uint8), norms, per-map scales (uint8) or None);
        what keeps a uint8 cache uint8 in RAM (`decode_maps` decodes rows on use)."""
        uint8 = self.spec.map_dtype == "uint8"
        stored = self.read(f"maps/{layer}", a, b)
        scales = self.read(f"scales/{layer}", a, b).astype(np.float32, copy=False) if uint8 else None
        norms = self.read(f"norms/{layer}", a, b).astype(np.float32, copy=False)
        if done is not None:
            finite = ((f"scales/{layer}", scales),) if uint8 else ((f"maps/{layer}", stored),)
            for name, values in finite + ((f"norms/{layer}", norms),):
                bad = _nonfinite_finished(values, done[a:a + len(values)])
                if len(bad):
                    first = a + int(bad[0])
                    raise self.chunk_error(name, *self.chunk_range(first // self.spec.chunk_rows),
                                           f"hold non-finite values in {len(bad)} finished rows (first row {first})")
        return stored, norms, scales

    def letterbox(self) -> LetterboxTable:
        """Every row's letterbox, read by the column names stored with the array."""
        columns = tuple(self.group["letterbox"].attrs.get("columns", self.spec.letterbox.columns))
        return LetterboxTable(self.read("letterbox").astype(np.float32, copy=False), columns)

    def dask_layer(self, layer: int):
        """(maps (N, H, W), norms (N,)) of `layer` as dask arrays chunked as stored (reading errors surface at compute)."""
        import dask.array as da

        maps = da.from_zarr(self.group[f"maps/{layer}"])
        if self.spec.map_dtype == "uint8":  # decoded chunk by chunk, with the scales of the same rows
            scales = da.from_zarr(self.group[f"scales/{layer}"])
            maps = da.map_blocks(decode_maps, maps, scales[:, None, None], dtype=np.float16)
        return maps, da.from_zarr(self.group[f"norms/{layer}"])

    def dask_replay_maps(self, layer: int):
        """Replay maps (E, M, H, W) of `layer` as a dask array chunked as stored, decoded like `dask_layer`'s."""
        import dask.array as da

        maps = da.from_zarr(self.group[f"replay/maps/{layer}"])
        if self.spec.map_dtype == "uint8":
            scales = da.from_zarr(self.group[f"replay/scales/{layer}"])
            maps = da.map_blocks(lambda q, s: decode_maps(q.reshape(-1, *q.shape[2:]), s.reshape(-1)).reshape(q.shape),
                                 maps, scales[:, :, None, None], dtype=np.float16)
        return maps

    def chunk_error(self, name: str, a: int, b: int, what: str) -> AtcacheError:
        """One line naming the array and rows that cannot be used, and how to find and fix the rest."""
        return AtcacheError(f"cache {self.path}: {name} rows {a}-{b - 1} {what}; {REPAIR_HINT.format(path=self.path)}")

    def nbytes_stored(self) -> int:
        """Bytes on disk (or in the bucket) of the whole store."""
        return self.location.nbytes()

    def chunk_problem(self, name: str, k: int, done: np.ndarray) -> str | None:
        """Why unit k of array `name` cannot be trusted: it fails to decode (checksum mismatch, truncated file) or, for
        maps/norms, a done row (per `done`, the store's done mask; for replay arrays the replay done mask) is not
        finite; None if it is sound. k is a row-chunk, or for `replay/...` arrays a replay unit."""
        replay = self.replay_unit(k) if name.startswith("replay/") else None
        e, a, b = replay if replay else (None, *self.chunk_range(k))
        try:
            block = self.group[name][a:b] if replay is None else self.group[name][e, a:b]
        except Exception as error:
            return f"{type(error).__name__}: {error}".splitlines()[0]
        if "norms/" in name or "scales/" in name or ("maps/" in name and self.spec.map_dtype == "float16"):
            bad = _nonfinite_finished(np.asarray(block), done[a:b] if replay is None else done[e, a:b])
            if len(bad):
                return f"{len(bad)} done rows are not finite (first row {a + bad[0]})"
        return None

    def replay_array_names(self) -> list[str]:
        """The replay arrays (none without --replay-epochs); each is chunked by one epoch x chunk_rows positions."""
        if self.spec.replay is None:
            return []
        kinds = ("maps", "norms") + (("scales",) if self.spec.map_dtype == "uint8" else ())
        per_layer = [f"replay/{kind}/{layer}" for kind in kinds for layer in self.spec.layer_indices]
        return per_layer + ["replay/sample", "replay/record", "replay/done"]

    def damaged_chunks(self, chunks: Iterable[int]) -> dict[int, list[str]]:
        """Row-chunks (of `chunks`) with an array whose chunk cannot be trusted (see chunk_problem): {k: [arrays]}."""
        done, damaged = self.done_mask(), {}
        for k in chunks:
            names = [name for name in self.array_names() if self.chunk_problem(name, k, done) is not None]
            if names:
                damaged[k] = names
        return damaged

    def rewrite_files(self, files: Sequence[str]) -> None:
        """Rewrite the image list (for --repair of a damaged `files` chunk; the list is known from the split)."""
        self.group["files"][:] = np.asarray(files, dtype=object)

    def sweep_partial_writes(self) -> int:
        """Delete the temporary files interrupted local writes left behind (zarr writes a `.partial` file, then renames
        it); returns how many. Only safe while no chunk is being written: a build calls it once every row-chunk is
        complete. Object stores write whole objects and leave none."""
        if self.location.remote or not self.location.local_path.is_dir():
            return 0
        leftovers = list(self.location.local_path.rglob("*.partial"))
        for f in leftovers:
            f.unlink(missing_ok=True)
        return len(leftovers)

    def mark_not_done(self, chunks: Iterable[int]) -> None:
        """Forget row-chunks (their data will be recomputed); `done` goes first so no row is ever done without data."""
        for k in chunks:
            a, b = self.chunk_range(k)
            self.group["done"][a:b] = False

    # ------------------------------------------------------------------ writing
    def write_chunk(self, k: int, data: ChunkData) -> None:
        """Write row-chunk k whole (data first, `done` last), so an interrupted write leaves it not done."""
        a, b = self.chunk_range(k)
        if data.letterbox.shape != (b - a, len(self.spec.letterbox.columns)):
            raise ValueError(f"chunk {k} holds {b - a} rows, got letterbox {data.letterbox.shape}")
        for layer in self.spec.layers:
            stored, scales = encode_maps(data.maps[layer.index], self.spec.map_dtype)
            self.group[f"maps/{layer.index}"][a:b] = stored
            if scales is not None:
                self.group[f"scales/{layer.index}"][a:b] = scales
            self.group[f"norms/{layer.index}"][a:b] = data.norms[layer.index].astype(np.float32, copy=False)
        self.group["letterbox"][a:b] = data.letterbox.astype(np.float32, copy=False)
        self.group["done"][a:b] = data.ok.astype(bool, copy=False)


REPAIR_HINT = 'run "atcache inspect --verify {path}", then "atcache build-cache ... --resume --repair"'


def _map_fill(spec: CacheSpec):
    return np.nan if spec.map_dtype == "float16" else 0


def _create_replay_arrays(group: zarr.Group, spec: CacheSpec) -> None:
    """The replay arrays (E epochs x M positions), chunked by one epoch x chunk_rows positions: one replay unit."""
    e, m, r = spec.replay.epochs, spec.replay.samples, spec.replay.chunk_rows
    for layer in spec.layers:
        group.create_array(
            f"replay/maps/{layer.index}", shape=(e, m, layer.height, layer.width), chunks=(1, r, layer.height, layer.width),
            dtype=spec.map_dtype, fill_value=_map_fill(spec), compressors=map_compressors(spec.map_dtype),
            dimension_names=("epoch", "position", "y", "x"), overwrite=True,
        )
        if spec.map_dtype == "uint8":
            group.create_array(f"replay/scales/{layer.index}", shape=(e, m), chunks=(1, r), dtype="float32",
                               fill_value=np.nan, compressors=small_compressors(4),
                               dimension_names=("epoch", "position"), overwrite=True)
        group.create_array(f"replay/norms/{layer.index}", shape=(e, m), chunks=(1, r), dtype="float32",
                           fill_value=np.nan, compressors=small_compressors(4), dimension_names=("epoch", "position"),
                           overwrite=True)
    for name, dtype, fill, size in (("sample", "int32", -1, 4), ("record", "uint64", 0, 8), ("done", "bool", False, 1)):
        group.create_array(f"replay/{name}", shape=(e, m), chunks=(1, r), dtype=dtype, fill_value=fill,
                           compressors=small_compressors(size), dimension_names=("epoch", "position"), overwrite=True)


def _decode_failure(e: Exception) -> str:
    text = first_line(e)
    if "checksum" in text.lower() or "crc" in text.lower():
        return "cannot be decoded (checksum mismatch: corrupted chunk)"
    return f"cannot be decoded ({type(e).__name__}: {text})"


def _nonfinite_finished(values: np.ndarray, done: np.ndarray) -> np.ndarray:
    """Offsets of the rows of a block (r, ...) that are finished (`done`, (r,)) but hold NaN or Inf."""
    finite = np.isfinite(np.asarray(values, dtype=np.float32).reshape(len(values), -1)).all(1)
    return np.flatnonzero(done & ~finite)


def _exists_error(loc: Location) -> AtcacheError:
    return AtcacheError(f"cache {loc} already exists; pass --resume to finish it or --overwrite to rebuild it from scratch")


def _claim_creation(loc: Location) -> bool:
    """True for exactly one of several builders that find no store at `loc`: it atomically writes the creation record
    (who creates it), the others wait for the spec while that creator is alive."""
    try:
        if not loc.remote:
            loc.local_path.mkdir(parents=True, exist_ok=True)
        if loc.exists("zarr.json") or loc.exists(CREATE_RECORD):
            return False
        if not loc.is_empty():
            raise AtcacheError(f"{loc} exists and is not an atcache store; choose another --out or remove it")
        return loc.create(CREATE_RECORD, json.dumps(_owner_record("create")).encode())
    except PermissionError as e:
        raise AtcacheError(f"cannot create cache {loc}: permission denied ({e.filename or e}); choose a writable --out") from None
    except OSError as e:
        raise AtcacheError(f"cannot create cache {loc}: {first_line(e)}; check the location and its free space") from None


def _owner_key(token) -> str:
    """Where a builder's heartbeat record lives (its chunk records carry the same token)."""
    return f"{LOCK_PREFIX}/owners/{token}.json"


def _parse_record(raw: bytes) -> dict:
    try:
        record = json.loads(raw)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _clear_for_build(path: "str | Path | Location", *, resume: bool, overwrite: bool) -> None:
    """Before a build: --overwrite deletes an existing store; without --resume an existing one is refused."""
    loc = Location.of(path)
    present = not loc.is_empty()
    if overwrite and present:
        _remove_store(loc)
    elif present and not resume:
        raise _exists_error(loc)


def _remove_store(loc: Location) -> None:
    if not loc.is_empty() and not loc.exists("zarr.json") and not loc.exists(CREATE_RECORD):
        raise AtcacheError(f"{loc} is not an atcache store, refusing to delete it; choose another --out")
    loc.remove_all()


# ---------------------------------------------------------------------------------------------------- ownership
def _proc_stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (Linux); [] elsewhere or when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _process_start(pid: int) -> str:
    """The kernel's start time of `pid`, so a recycled pid is not mistaken for the builder; '' when unknown."""
    fields = _proc_stat(pid)
    return fields[19] if len(fields) > 19 else ""


def _owner_record(role: str) -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid), "role": role,
            "token": uuid.uuid4().hex, "since": time.time(), "heartbeat": time.time()}


def owner_alive(record: dict, stale_s: float = LOCK_STALE_S) -> bool:
    """A builder on this host is alive if its process is (not a zombie, not a recycled pid); one elsewhere if it
    wrote a heartbeat recently."""
    if record.get("host") == socket.gethostname():
        pid = int(record.get("pid", 0) or 0)
        if pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        fields = _proc_stat(pid)
        if fields and fields[0] == "Z":  # killed, not yet reaped by its parent
            return False
        return not record.get("start") or record.get("start") == _process_start(pid)
    return time.time() - float(record.get("heartbeat", 0)) < stale_s


class ChunkClaim:
    """One builder's ownership of the row-chunks it computes: a record per chunk under `atcache-locks/`, each created
    atomically, so two builders with overlapping shards never interleave: the second is refused.

    Records of a dead builder (kill -9, lost node) are taken over: on this host when its process is gone, from
    another host after LOCK_STALE_S without a heartbeat, or at once with --break-locks."""

    def __init__(self, store: CacheStore, chunks: Iterable[int], break_locks: bool = False):
        self.store, self.location, self.chunks = store, store.location, list(chunks)
        self.record, self.break_locks = _owner_record("build"), break_locks
        self.held: list[int] = []
        self._released = threading.Event()

    def _key(self, k: int) -> str:
        return f"{LOCK_PREFIX}/chunk-{k:08d}.json"

    def _heartbeat_key(self) -> str:
        return _owner_key(self.record["token"])

    def acquire(self) -> "ChunkClaim":
        self.sweep_dead()
        data = json.dumps(self.record).encode()
        self.location.write(self._heartbeat_key(), data)
        try:
            for k in self.chunks:
                if self.location.create(self._key(k), data):
                    self.held.append(k)
                    continue
                holder = self._holder(k)
                if holder is not None and owner_alive(holder) and not self.break_locks:
                    raise AtcacheError(self._refusal(k, holder))
                self.location.delete(self._key(k))  # a dead builder's record: take it over
                if holder is not None:
                    self.location.delete(_owner_key(holder.get("token")))
                if not self.location.create(self._key(k), data):
                    raise AtcacheError(self._refusal(k, self._holder(k) or {}))
                self.held.append(k)
        except BaseException:
            self.release()
            raise
        threading.Thread(target=self._beat_until_released, daemon=True).start()
        return self

    def sweep_dead(self) -> None:
        """Delete the records of dead builders (a kill -9 leaves them behind, also for chunks they had finished)."""
        for name in self.location.list(LOCK_PREFIX):
            if name.endswith(".tmp"):  # another builder's record on its way into place (Location.create)
                continue
            raw = self.location.read(name)
            record = _parse_record(raw) if raw is not None else {}
            if name.startswith(f"{LOCK_PREFIX}/owners/"):
                if record and not owner_alive(record):
                    self.location.delete(name)
            elif name.startswith(f"{LOCK_PREFIX}/chunk-") and raw is not None and record.get("token") != self.record["token"]:
                if not owner_alive(self._with_heartbeat(record)):
                    self.location.delete(name)

    def _holder(self, k: int) -> dict | None:
        raw = self.location.read(self._key(k))
        return None if raw is None else self._with_heartbeat(_parse_record(raw))

    def _with_heartbeat(self, record: dict) -> dict:
        """A chunk record with its owner's latest heartbeat (the owner file, rewritten while the claim is held)."""
        beat = self.location.read(_owner_key(record.get("token")))
        if beat is not None:
            record["heartbeat"] = _parse_record(beat).get("heartbeat", record.get("heartbeat", 0))
        return record

    def _refusal(self, k: int, holder: dict) -> str:
        a, b = self.store.chunk_range(k)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since", 0))))
        return (
            f"cache {self.location}: row-chunk {k} (rows {a}-{b - 1}) is being built by pid "
            f"{holder.get('pid')} on {holder.get('host')} since {since}; two builders must not share chunks: wait for "
            "it to finish, give each builder its own --shard i/n, or pass --break-locks if that builder is dead"
        )

    def _beat_until_released(self) -> None:
        """Tell builders on other hosts that this one is alive, every HEARTBEAT_S while the claim is held."""
        while not self._released.wait(HEARTBEAT_S):
            try:
                self.location.write(self._heartbeat_key(), json.dumps({**self.record, "heartbeat": time.time()}).encode())
            except Exception:  # a transient storage error must not kill the build; the next beat retries
                pass

    def release(self) -> None:
        self._released.set()
        for k in self.held:
            self.location.delete(self._key(k))
        self.held = []
        self.location.delete(self._heartbeat_key())
        self.location.prune(LOCK_PREFIX)

    def __enter__(self) -> "ChunkClaim":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def chunks_for_shard(n_chunks: int, shard: int, n_shards: int) -> range:
    """The contiguous block of row-chunks that shard `shard` of `n_shards` owns (disjoint, covering all)."""
    if not (n_shards >= 1 and 0 <= shard < n_shards):
        raise AtcacheError(f"--shard {shard}/{n_shards} is out of range; use i/n with 0 <= i < n")
    start = n_chunks * shard // n_shards
    stop = n_chunks * (shard + 1) // n_shards
    return range(start, stop)


def iter_rows(chunks: Iterable[int], store: CacheStore) -> Iterable[int]:
    """The rows of row-chunks `chunks`, in order."""
    for k in chunks:
        a, b = store.chunk_range(k)
        yield from range(a, b)
