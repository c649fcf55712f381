"""A handle on one cache store (`CacheStore`): create, open and check it, read whole arrays, row ranges and replay
units, write them, and give dask views. Layout and codecs: `atcache.cache.format`. Reading goes through
`read` / `read_layer` / `letterbox`: a chunk that fails to decode, or a finished row that is not finite, is one
AtcacheError naming the array and rows (training never runs on garbage)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import zarr

from atcache.errors import AtcacheError, first_line
from atcache.cache.location import Location
from atcache.cache.writes import read_together, write_together
from atcache.cache.claims import CREATOR_ATTR, claim_creation, clear_for_build, creation_state, exists_error, owner_alive, remove_store
from atcache.cache.format import CacheSpec, ChunkData, LetterboxTable, decode_maps, encode_maps
from atcache.cache.layout import create_arrays, pack_replay, replay_array_names, replay_reads, unpack_replay

SPEC_ATTR = "atcache"
CREATE_WAIT_S = 120.0



class CacheStore:
    """A handle on one cache store (a local directory or an fsspec URL); open with `create`, `open` or
    `open_or_create`."""

    def __init__(self, location: Location, group: zarr.Group, spec: CacheSpec):
        self.location, self.group, self.spec = location, group, spec
        self._arrays: dict[str, zarr.Array] = {}

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
            group = zarr.open_group(loc.url, mode="r+" if writable else "r", storage_options=loc.storage_options or None)
        except Exception as e:
            raise AtcacheError(f"cache {loc} is not a readable Zarr v3 group: {first_line(e)}") from e
        raw = group.attrs.get(SPEC_ATTR)
        if raw is None:
            raise AtcacheError(
                f"cache {loc} has no atcache spec (its creation was interrupted or it is not an atcache store); "
                "rebuild with `atcache build-cache --overwrite`"
            )
        try:
            spec = CacheSpec.from_dict(raw, str(loc))  # refuses another format version, in one line
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
        group = zarr.open_group(loc.url, mode="a", zarr_format=3, storage_options=loc.storage_options or None)
        create_arrays(group, spec, files)
        # written last: a store with a spec is complete; the creator's record (claims.claim_creation) goes in the same
        # write of the root metadata, so the attributes of a finished store are the spec alone
        group.attrs.put({**{k: v for k, v in group.attrs.asdict().items() if k != CREATOR_ATTR}, SPEC_ATTR: spec.to_dict()})
        return cls(loc, group, spec)

    @classmethod
    def open_or_create(
        cls, path: "str | Path | Location", spec: CacheSpec, files: Sequence[str], *, resume: bool, overwrite: bool,
        join: bool, repair: bool = False,
    ) -> "CacheStore":
        """The build's entry point: claim and create the store, or reopen it for --resume / a sibling --shard.

        Creation is claimed atomically (the root `zarr.json`, created if absent with the creator's record), so n shard
        processes started together create it exactly once."""
        loc = Location.of(path)
        clear_for_build(loc, resume=resume or join, overwrite=overwrite)
        if claim_creation(loc):
            return cls.create(loc, spec, files)
        if not (resume or join):  # another process created it since the check above
            raise exists_error(loc)
        store = cls._wait_for_spec(loc, wait=join)
        if store is None:  # creation never finished: nothing was computed yet, so start over
            remove_store(loc)
            return cls.open_or_create(loc, spec, files, resume=resume, overwrite=False, join=join)
        store.check_compatible(spec, files, repair=repair)
        return store

    @classmethod
    def _wait_for_spec(cls, loc: Location, wait: bool) -> "CacheStore | None":
        """Open `loc` once its spec is written. While its creator is alive this waits (up to CREATE_WAIT_S); None if
        the creation was interrupted (its creator is dead), so the caller starts over: nothing was computed yet."""
        deadline = time.monotonic() + CREATE_WAIT_S
        while True:
            state, record = creation_state(loc)
            if state == "complete":
                return cls.open(loc, writable=True)
            if state == "absent":
                if not loc.is_empty() and not wait:
                    raise AtcacheError(f"{loc} exists and is not an atcache store; choose another --out or remove it")
            elif state == "orphan" or (state == "creating" and not owner_alive(record)):
                return None  # (unreadable metadata is being written: wait for it)
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
        return np.asarray(self._array("files")[:], dtype=object)

    def done_mask(self) -> np.ndarray:
        """(N,) bool; a chunk of `done` that cannot be decoded counts as not done (its rows get recomputed)."""
        arr = self._array("done")
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
        """(E, M) bool: replayed samples written. A unit is written whole and its `replay/done` chunk (all True) last,
        and zarr stores no chunk that is all fill value (False), so the chunks that exist are the done units: one
        listing (a LIST per 1,000 units on a bucket) instead of a read per unit. `inspect --verify` decodes them."""
        replay = self.spec.replay
        units = np.zeros((replay.epochs, replay.chunks_per_epoch), dtype=bool)
        for name in self.location.list("replay/done/c"):
            e, k = name.split("/")[-2:]
            if e.isdigit() and k.isdigit() and int(e) < replay.epochs and int(k) < replay.chunks_per_epoch:
                units[int(e), int(k)] = True  # (not a temporary file of a write in flight)
        return np.repeat(units, replay.chunk_rows, axis=1)[:, :replay.samples]

    def write_replay(self, u: int, maps: dict[int, np.ndarray], norms: dict[int, np.ndarray], samples: np.ndarray,
                     records: np.ndarray, grad: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Write replay unit u whole (data first, `done` last): per layer the maps (r, H, W) and norms (r,) of the
        positions, the dataset index of each position and the fingerprint of its augmented image; with gradients
        (spec.gradient_stride) `grad` = (direction (r, 3, G, G), norm (r,)) of each view's J_T."""
        e, a, b = self.replay_unit(u)
        at = (e, slice(a, b))
        if self.spec.gradient_stride:
            g = self.spec.gradient_size
            if grad is None or grad[0].shape != (b - a, 3, g, g):
                raise ValueError(f"replay unit {u}: this store keeps gradients (3 x {g} x {g} per view), got "
                                 f"{None if grad is None else grad[0].shape}")
        values = pack_replay(self.spec, maps, norms, grad if self.spec.gradient_stride else None)
        writes = [(name, at, v) for name, v in values.items()]
        writes.append(("replay/sample", at, samples.astype(np.int32, copy=False)))
        writes.append(("replay/record", at, records.astype(np.uint64, copy=False)))
        write_together(self._array, writes)
        self._array("replay/done")[at] = True

    def read_replay(self, layers: Sequence[int], e: int, a: int, b: int, grad: bool = False
                    ) -> tuple[dict[int, np.ndarray], np.ndarray] | tuple[dict[int, np.ndarray], np.ndarray, tuple]:
        """({layer: maps (r, H, W) float16}, fingerprints (r,) uint64) of positions a:b of epoch e, and with `grad`
        (direction (r, 3, G, G) float16, norm (r,) float32) of their J_T; a chunk that fails to decode is one
        AtcacheError naming the array, epoch and positions."""
        out = {}
        if grad and not self.spec.gradient_stride:
            raise AtcacheError(f"cache {self.path} holds no input gradients; build it with build-cache --gradient")
        for name in replay_reads(self.spec, layers, grad) + ["replay/record", "replay/done"]:
            try:
                out[name] = np.asarray(self._array(name)[e, a:b])
            except Exception as error:
                raise AtcacheError(f"cache {self.path}: {name} epoch {e} positions {a}-{b - 1} "
                                   f"{decode_failure(error)}; rebuild the replay arrays with build-cache --overwrite") from None
        if not out["replay/done"].all():
            raise AtcacheError(f"cache {self.path}: replay epoch {e} positions {a}-{b - 1} are not built yet; finish "
                               "the cache with `atcache build-cache ... --resume`")
        maps, grads = unpack_replay(self.spec, layers, out, grad)
        if grad:
            return maps, out["replay/record"], grads
        return maps, out["replay/record"]

    def array_names(self) -> list[str]:
        """Every array of the store; each is chunked by `chunk_rows` rows along axis 0."""
        kinds = ("maps", "norms") + (("scales",) if self.spec.map_dtype == "uint8" else ())
        per_layer = [f"{kind}/{layer}" for kind in kinds for layer in self.spec.layer_indices]
        grad = ["grad/direction", "grad/norm"] if self.spec.gradient_stride else []
        return per_layer + grad + ["letterbox", "files", "done"]

    def read(self, name: str, a: int = 0, b: int | None = None) -> np.ndarray:
        """Rows a:b (default: all) of array `name`; a chunk that fails to decode (crc32c mismatch, truncated file) is
        one AtcacheError naming the array and the rows of the first chunk that fails."""
        b = self.n_rows if b is None else b
        try:
            return np.asarray(self._array(name)[a:b])
        except Exception as e:
            error = e
        r = self.spec.chunk_rows
        for k in range(a // r, -(-b // r)):  # which chunk: decode them one at a time
            lo, hi = max(a, k * r), min(b, (k + 1) * r)
            try:
                self._array(name)[lo:hi]
            except Exception as e:
                raise self.chunk_error(name, lo, hi, decode_failure(e)) from None
        raise self.chunk_error(name, a, b, decode_failure(error)) from None

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
        return self.read_stored_layers([layer], a, b, done)[layer]

    def read_stored_layers(self, layers: Sequence[int], a: int = 0, b: int | None = None, done: np.ndarray | None = None
                           ) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """read_stored_layer of several layers, every array read concurrently (on a bucket a GET per chunk: they
        overlap); with `done`, non-finite finished rows are refused as in `refuse_nonfinite`."""
        uint8 = self.spec.map_dtype == "uint8"
        kinds = ("maps", "norms") + (("scales",) if uint8 else ())
        read = read_together(lambda name: self.read(name, a, b), [f"{k}/{i}" for i in layers for k in kinds])
        out = {i: (read[f"maps/{i}"], read[f"norms/{i}"].astype(np.float32, copy=False),
                   read[f"scales/{i}"].astype(np.float32, copy=False) if uint8 else None) for i in layers}
        if done is not None:
            for i in layers:
                self.refuse_nonfinite(i, *out[i], done=done, a=a)
        return out

    def refuse_nonfinite(self, layer: int, stored: np.ndarray, norms: np.ndarray, scales: np.ndarray | None,
                         done: np.ndarray, a: int = 0) -> None:
        """One line naming the array and chunk if a finished row (per `done`, the store's mask) of rows a.. of `layer`
        holds NaN or Inf."""
        finite = ((f"scales/{layer}", scales),) if scales is not None else ((f"maps/{layer}", stored),)
        for name, values in finite + ((f"norms/{layer}", norms),):
            bad = nonfinite_finished(values, done[a:a + len(values)])
            if len(bad):
                first = a + int(bad[0])
                raise self.chunk_error(name, *self.chunk_range(first // self.spec.chunk_rows),
                                       f"hold non-finite values in {len(bad)} finished rows (first row {first})")

    def letterbox(self) -> LetterboxTable:
        """Every row's letterbox, read by the column names stored with the array."""
        columns = tuple(self._array("letterbox").attrs.get("columns", self.spec.letterbox.columns))
        return LetterboxTable(self.read("letterbox").astype(np.float32, copy=False), columns)

    def chunk_error(self, name: str, a: int, b: int, what: str) -> AtcacheError:
        """One line naming the array and rows that cannot be used, and how to find and fix the rest."""
        return AtcacheError(f"cache {self.path}: {name} rows {a}-{b - 1} {what}; {REPAIR_HINT.format(path=self.path)}")

    def nbytes_stored(self) -> int:
        """Bytes on disk (or in the bucket) of the whole store."""
        return self.location.nbytes()

    def replay_array_names(self) -> list[str]:
        """The replay arrays (none without --replay-epochs); each is chunked by one epoch x chunk_rows positions."""
        return replay_array_names(self.spec)

    def rewrite_files(self, files: Sequence[str]) -> None:
        """Rewrite the image list (for --repair of a damaged `files` chunk; the list is known from the split)."""
        self._array("files")[:] = np.asarray(files, dtype=object)

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
            self._array("done")[a:b] = False

    # ------------------------------------------------------------------ writing
    def write_chunk(self, k: int, data: ChunkData) -> None:
        """Write row-chunk k whole (data first, `done` last), so an interrupted write leaves it not done."""
        a, b = self.chunk_range(k)
        if data.letterbox.shape != (b - a, len(self.spec.letterbox.columns)):
            raise ValueError(f"chunk {k} holds {b - a} rows, got letterbox {data.letterbox.shape}")
        at, writes = slice(a, b), []
        for layer in self.spec.layers:
            stored, scales = encode_maps(data.maps[layer.index], self.spec.map_dtype)
            writes.append((f"maps/{layer.index}", at, stored))
            if scales is not None:
                writes.append((f"scales/{layer.index}", at, scales))
            writes.append((f"norms/{layer.index}", at, data.norms[layer.index].astype(np.float32, copy=False)))
        if self.spec.gradient_stride:
            g = self.spec.gradient_size
            if data.grad_direction is None or data.grad_direction.shape != (b - a, 3, g, g) or data.grad_norm is None:
                raise ValueError(f"chunk {k}: this store keeps gradients (3 x {g} x {g} per row), got "
                                 f"{None if data.grad_direction is None else data.grad_direction.shape}")
            writes.append(("grad/direction", at, data.grad_direction.astype(np.float16, copy=False)))
            writes.append(("grad/norm", at, data.grad_norm.astype(np.float32, copy=False)))
        writes.append(("letterbox", at, data.letterbox.astype(np.float32, copy=False)))
        write_together(self._array, writes)
        self._array("done")[at] = data.ok.astype(bool, copy=False)

    def array(self, name: str) -> zarr.Array:
        """The zarr array `name` of this store (for the package's readers: atcache.cache.integrity)."""
        return self._array(name)

    def _array(self, name: str) -> zarr.Array:
        """Array `name`, its metadata read once per handle (on a bucket every lookup is a GET)."""
        arr = self._arrays.get(name)
        if arr is None:
            arr = self._arrays[name] = self.group[name]
        return arr


REPAIR_HINT = 'run "atcache inspect --verify {path}", then "atcache build-cache ... --resume --repair"'


def decode_failure(e: Exception) -> str:
    text = first_line(e)
    if "checksum" in text.lower() or "crc" in text.lower():
        return "cannot be decoded (checksum mismatch: corrupted chunk)"
    return f"cannot be decoded ({type(e).__name__}: {text})"


def nonfinite_finished(values: np.ndarray, done: np.ndarray) -> np.ndarray:
    """Offsets of the rows of a block (r, ...) that are finished (`done`, (r,)) but hold NaN or Inf."""
    finite = np.isfinite(np.asarray(values, dtype=np.float32).reshape(len(values), -1)).all(1)
    return np.flatnonzero(done & ~finite)


def iter_rows(chunks: Iterable[int], store: CacheStore) -> Iterable[int]:
    """The rows of row-chunks `chunks`, in order."""
    for k in chunks:
        a, b = store.chunk_range(k)
        yield from range(a, b)
