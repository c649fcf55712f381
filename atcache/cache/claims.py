"""Who builds which part of a cache: ownership records in the store, created atomically (create-if-absent on
the store's location), so several builders (shards, devices, dask tasks, machines) never write the same unit, and a dead
builder's units are taken over. Liveness: on this host the builder's process (pid + kernel start time, /proc), from
elsewhere a heartbeat record rewritten every HEARTBEAT_S.

The records stay out of the zarr hierarchy (zarr warns on, and xarray trips over, any key of a group that is not a
node): the creator's record is the attribute CREATOR_ATTR of the root group's `zarr.json`, which the creator creates
atomically (so the store is a plain empty zarr group while it is being created, and the spec replaces the record when
it is complete); the builders' claim records (one per builder: the ranges of units it owns) live under LOCK_PREFIX,
inside the `done` array's prefix, which zarr never lists (an array has no members; its chunks are addressed by key)."""

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
        # a creator writes CREATE_RECORD (through a temporary file) before anything else, so content other than
        # that temporary file without CREATE_RECORD after a second look is foreign
        if not loc.is_empty(but_pending=True) and not loc.exists(CREATE_RECORD):
            raise AtcacheError(f"{loc} exists and is not an atcache store; choose another --out or remove it")
        root = {"zarr_format": 3, "node_type": "group", "attributes": {CREATOR_ATTR: owner_record("create")}}
        return loc.create(CREATE_RECORD, json.dumps(root, indent=2).encode())
    except PermissionError as e:
        raise AtcacheError(f"cannot create cache {loc}: permission denied ({e.filename or e}); choose a writable --out") from None
    except OSError as e:
        raise AtcacheError(f"cannot create cache {loc}: {first_line(e)}; check the location and its free space") from None


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


CLAIM_WAIT_S = 2.0  # how long a claim waits for a later, overlapping one to withdraw (see ChunkClaim.acquire)


def unit_ranges(units: Iterable[int]) -> list[list[int]]:
    """Sorted units as contiguous [start, stop) ranges: what one claim record holds, however many units."""
    out: list[list[int]] = []
    for k in sorted(set(units)):
        if out and out[-1][1] == k:
            out[-1][1] = k + 1
        else:
            out.append([k, k + 1])
    return out


def _first_common(a: list[list[int]], b: list[list[int]]) -> int | None:
    """The first unit in both range lists, None if they are disjoint."""
    best = None
    for s0, e0 in a:
        for s1, e1 in b:
            lo = max(s0, s1)
            if lo < min(e0, e1) and (best is None or lo < best):
                best = lo
    return best


class ChunkClaim:
    """One builder's ownership of the units (row-chunks, replay units) it computes: ONE record, the contiguous ranges
    it owns, under LOCK_PREFIX as `claim-<seq>.json`, whatever the number of units. Two builders with overlapping units
    never both proceed: each creates its record (atomically, at the next free sequence number), then reads the others;
    a live overlapping record with a lower number refuses it at once, one with a higher number is given CLAIM_WAIT_S
    to withdraw (its builder sees this record and refuses), after which this builder refuses too. A builder proceeds
    only when, after its record exists, it sees no live overlap, so of two overlapping builders at most one proceeds.

    A dead builder's record (kill -9, lost node) is taken over: on this host when its process is gone, from another
    host after LOCK_STALE_S without a heartbeat (the record is rewritten every HEARTBEAT_S), or at once with
    --break-locks."""

    def __init__(self, store: CacheStore, chunks: Iterable[int], break_locks: bool = False):
        self.store, self.location = store, store.location
        self.chunks = sorted(set(chunks))
        self.record, self.break_locks = {**owner_record("build"), "ranges": unit_ranges(self.chunks)}, break_locks
        self.held: list[int] = []
        self.key: str | None = None
        self._released = threading.Event()

    @staticmethod
    def _seq(name: str) -> int | None:
        stem = name.rsplit("/", 1)[-1]
        if stem.startswith("claim-") and stem.endswith(".json"):
            digits = stem[len("claim-"):-len(".json")]
            return int(digits) if digits.isdigit() else None
        return None

    def _records(self) -> dict[str, dict]:
        """Every other builder's claim record, by key (records being written, `.tmp`, are not claims yet)."""
        out = {}
        for name in self.location.list(LOCK_PREFIX):
            if name == self.key or self._seq(name) is None:
                continue
            raw = self.location.read(name)
            if raw is not None:
                out[name] = parse_record(raw)
        return out

    def acquire(self) -> "ChunkClaim":
        if not self.chunks:
            return self
        self.sweep_dead()
        names = [n for n in self.location.list(LOCK_PREFIX) if self._seq(n) is not None]
        seq = max((self._seq(n) for n in names), default=-1) + 1
        data = json.dumps(self.record).encode()
        while not self.location.create(f"{LOCK_PREFIX}/claim-{seq:010d}.json", data):
            seq += 1
        self.key = f"{LOCK_PREFIX}/claim-{seq:010d}.json"
        try:
            deadline = time.monotonic() + CLAIM_WAIT_S
            while True:
                later = self._check(seq)
                if later is None:
                    break
                if time.monotonic() > deadline:
                    raise AtcacheError(self._refusal(*later))
                time.sleep(0.05)
        except BaseException:
            self.release()
            raise
        self.held = list(self.chunks)
        threading.Thread(target=self._beat_until_released, daemon=True).start()
        return self

    def _check(self, seq: int) -> tuple[int, dict] | None:
        """Refuse a live overlapping claim with a lower number; delete dead ones (taken over); return (unit, record)
        of a live overlapping claim with a higher number (it should withdraw), None if there is none."""
        later = None
        for name, other in self._records().items():
            common = _first_common(self.record["ranges"], other.get("ranges") or [])
            if common is None:
                continue
            if not other or not owner_alive(other) or self.break_locks:
                self.location.delete(name)  # a dead builder's claim (or an unreadable one): taken over
                continue
            if self._seq(name) < seq:
                raise AtcacheError(self._refusal(common, other))
            later = later or (common, other)
        return later

    def sweep_dead(self) -> None:
        """Delete the claim records of dead builders (a kill -9 leaves them behind, also for units they finished)."""
        for name, other in self._records().items():
            if not other or not owner_alive(other):
                self.location.delete(name)

    def _refusal(self, k: int, holder: dict) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since", 0))))
        replay = self.store.replay_unit(k)
        if replay is None:
            a, b = self.store.chunk_range(k)
            what = f"row-chunk {k} (rows {a}-{b - 1})"
        else:
            what = f"replay unit {k} (epoch {replay[0]}, positions {replay[1]}-{replay[2] - 1})"
        return (
            f"cache {self.location}: {what} is being built by pid {holder.get('pid')} on {holder.get('host')} since "
            f"{since}; two builders must not share chunks: wait for it to finish, give each builder its own --shard "
            "i/n, or pass --break-locks if that builder is dead"
        )

    def _beat_until_released(self) -> None:
        """Tell builders on other hosts that this one is alive: its record rewritten every HEARTBEAT_S while held."""
        while not self._released.wait(HEARTBEAT_S):
            try:
                self.location.write(self.key, json.dumps({**self.record, "heartbeat": time.time()}).encode())
            except Exception:  # a transient storage error must not kill the build; the next beat retries
                pass

    def release(self) -> None:
        self._released.set()
        if self.key is not None:
            self.location.delete(self.key)
        self.held, self.key = [], None
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
