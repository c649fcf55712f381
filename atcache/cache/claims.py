"""Who builds which part of a cache: ownership records in the store, created atomically (create-if-absent on
the store's location), so several builders (shards, devices, dask tasks, machines) never write the same unit, and a dead
builder's units are taken over. Liveness: on this host the builder's process (pid + kernel start time, /proc), from
elsewhere a heartbeat record rewritten every HEARTBEAT_S.

The records stay out of the zarr hierarchy (zarr warns on, and xarray trips over, any key of a group that is not a
node): the creator's record is the attribute CREATOR_ATTR of the root group's `zarr.json`, which the creator creates
atomically (so the store is a plain empty zarr group while it is being created, and the spec replaces the record when
it is complete); the builders' chunk records live under LOCK_PREFIX, inside the `done` array's prefix, which zarr never
lists (an array has no members; its chunks are addressed by key)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from atcache.cache.location import Location
from atcache.config import check_shard
from atcache.errors import AtcacheError, first_line

if TYPE_CHECKING:
    from atcache.cache.store import CacheStore

CREATE_RECORD = "zarr.json"  # the root group's metadata: whoever creates it (atomically) creates the store
CREATOR_ATTR = "atcache-creator"  # the creator's owner record, a root attribute until the spec replaces it
LOCK_PREFIX = "done/atcache-locks"  # ownership records of builders (ChunkClaim), inside an array's prefix: zarr never lists it
LOCK_STALE_S = 600.0
HEARTBEAT_S = 30.0


def exists_error(loc: Location) -> AtcacheError:
    return AtcacheError(f"cache {loc} already exists; pass --resume to finish it or --overwrite to rebuild it from scratch")


def claim_creation(loc: Location) -> bool:
    """True for exactly one of several builders that find no store at `loc`: it atomically creates the root group's
    metadata holding the creation record (who creates it), the others wait for the spec while that creator is alive."""
    try:
        if not loc.remote:
            loc.local_path.mkdir(parents=True, exist_ok=True)
        if loc.exists(CREATE_RECORD):
            return False
        if not loc.is_empty():
            raise AtcacheError(f"{loc} exists and is not an atcache store; choose another --out or remove it")
        root = {"zarr_format": 3, "node_type": "group", "attributes": {CREATOR_ATTR: owner_record("create")}}
        return loc.create(CREATE_RECORD, json.dumps(root, indent=2).encode())
    except PermissionError as e:
        raise AtcacheError(f"cannot create cache {loc}: permission denied ({e.filename or e}); choose a writable --out") from None
    except OSError as e:
        raise AtcacheError(f"cannot create cache {loc}: {first_line(e)}; check the location and its free space") from None


def _owner_key(token) -> str:
    """Where a builder's heartbeat record lives (its chunk records carry the same token)."""
    return f"{LOCK_PREFIX}/owners/{token}.json"


def creation_state(loc: Location) -> tuple[str, dict]:
    """Where the creation of the store at `loc` stands, read from its root metadata: ("absent", {}) no store yet;
    ("complete", {}) its spec is written; ("creating", record) its creator's record; ("orphan", {}) a group with neither
    (not created by a builder, or by an atcache of another format); ("unreadable", {}) metadata not parseable (yet)."""
    raw = loc.read(CREATE_RECORD)
    if raw is None:
        return "absent", {}
    attributes = parse_record(raw).get("attributes")
    if not isinstance(attributes, dict):
        return "unreadable", {}
    if "atcache" in attributes:  # store.SPEC_ATTR
        return "complete", {}
    record = attributes.get(CREATOR_ATTR)
    return ("creating", record) if isinstance(record, dict) and record else ("orphan", {})


def parse_record(raw: bytes) -> dict:
    try:
        record = json.loads(raw)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def clear_for_build(path: "str | Path | Location", *, resume: bool, overwrite: bool) -> None:
    """Before a build: --overwrite deletes an existing store; without --resume an existing one is refused."""
    loc = Location.of(path)
    present = not loc.is_empty()
    if overwrite and present:
        remove_store(loc)
    elif present and not resume:
        raise exists_error(loc)


def remove_store(loc: Location) -> None:
    if not loc.is_empty() and not loc.exists(CREATE_RECORD):
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


def owner_record(role: str) -> dict:
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
    """One builder's ownership of the row-chunks it computes: a record per chunk under LOCK_PREFIX (`done/atcache-locks/`), each created
    atomically, so two builders with overlapping shards never interleave: the second is refused.

    Records of a dead builder (kill -9, lost node) are taken over: on this host when its process is gone, from
    another host after LOCK_STALE_S without a heartbeat, or at once with --break-locks."""

    def __init__(self, store: CacheStore, chunks: Iterable[int], break_locks: bool = False):
        self.store, self.location, self.chunks = store, store.location, list(chunks)
        self.record, self.break_locks = owner_record("build"), break_locks
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
            record = parse_record(raw) if raw is not None else {}
            if name.startswith(f"{LOCK_PREFIX}/owners/"):
                if record and not owner_alive(record):
                    self.location.delete(name)
            elif name.startswith(f"{LOCK_PREFIX}/chunk-") and raw is not None and record.get("token") != self.record["token"]:
                if not owner_alive(self._with_heartbeat(record)):
                    self.location.delete(name)

    def _holder(self, k: int) -> dict | None:
        raw = self.location.read(self._key(k))
        return None if raw is None else self._with_heartbeat(parse_record(raw))

    def _with_heartbeat(self, record: dict) -> dict:
        """A chunk record with its owner's latest heartbeat (the owner file, rewritten while the claim is held)."""
        beat = self.location.read(_owner_key(record.get("token")))
        if beat is not None:
            record["heartbeat"] = parse_record(beat).get("heartbeat", record.get("heartbeat", 0))
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
    check_shard(shard, n_shards)
    start = n_chunks * shard // n_shards
    stop = n_chunks * (shard + 1) // n_shards
    return range(start, stop)
