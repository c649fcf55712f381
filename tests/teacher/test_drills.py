"""Crash and corruption drills: kill -9 at random points, disk full, permission denied, flipped bytes, two builders on
one store. Each ends in a store identical to an uninterrupted build, or in a one-line refusal that loses nothing."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from atcache.teacher.pipeline import build_cache
from atcache.errors import AtcacheError
from atcache.cache.claims import LOCK_PREFIX, ChunkClaim
from atcache.cache.store import CacheStore
from helpers import TEST_LAYERS, assert_clean, build_config, cli_command

DRILL = Path(__file__).with_name("drill_build.py")
N_KILLS = 10


def drill(mode: str, n: int, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(DRILL), mode, str(n), "--"] + args[3:]  # args[:3] = python -m atcache
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def resume(voc_yaml, teacher_pt, out, **kw):
    return build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), resume=True, **kw))


def assert_done_rows_hold_their_data(out: Path, reference: Path) -> int:
    """No row is marked done without its data: every done row equals the uninterrupted build. Returns rows done."""
    if not (out / "zarr.json").exists():
        return 0
    g = zarr.open_group(str(out), mode="r")
    if "atcache" not in g.attrs:
        return 0
    ref = zarr.open_group(str(reference), mode="r")
    done = g["done"][:]
    for layer in TEST_LAYERS:
        np.testing.assert_array_equal(g[f"maps/{layer}"][:][done], ref[f"maps/{layer}"][:][done])
        np.testing.assert_array_equal(g[f"norms/{layer}"][:][done], ref[f"norms/{layer}"][:][done])
    np.testing.assert_array_equal(g["letterbox"][:][done], ref["letterbox"][:][done])
    return int(done.sum())


@pytest.fixture(scope="module")
def write_count(voc_yaml, teacher_pt, tmp_path_factory) -> int:
    out = tmp_path_factory.mktemp("count") / "c.zarr"
    run = drill("count", 0, cli_command(voc_yaml, teacher_pt, out))
    assert run.returncode == 0, run.stderr
    return int(run.stderr.rsplit("writes=", 1)[1].split()[0])


@pytest.mark.slow
def test_kill_at_ten_random_points_then_resume_is_identical(built_cache, voc_yaml, teacher_pt, tmp_path, write_count,
                                                            assert_same_store):
    points = sorted(np.random.default_rng(6).choice(np.arange(1, write_count + 1), N_KILLS, replace=False).tolist())
    for n in points:
        out = tmp_path / f"killed-at-{n}.zarr"
        run = drill("kill", n, cli_command(voc_yaml, teacher_pt, out))
        assert run.returncode == -9, f"write {n}: {run.stderr[-400:]}"
        assert_done_rows_hold_their_data(out, built_cache)
        report = resume(voc_yaml, teacher_pt, out)
        assert report.computed + report.already_done == report.total_rows
        assert_same_store(built_cache, out)
        assert_clean(out)


@pytest.mark.parametrize("code,words", [("ENOSPC", "no space left"), ("EACCES", "permission denied")])
def test_disk_full_or_permission_denied_keeps_earlier_rows(built_cache, voc_yaml, teacher_pt, tmp_path, write_count,
                                                           code, words, assert_same_store):
    out = tmp_path / "c.zarr"
    run = drill(code, write_count - 20, cli_command(voc_yaml, teacher_pt, out))  # fails in the last row-chunks
    assert run.returncode == 2 and "Traceback" not in run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith("atcache: error: writing to cache") and words in line and "--resume" in line
    assert assert_done_rows_hold_their_data(out, built_cache) > 0
    resume(voc_yaml, teacher_pt, out)
    assert_same_store(built_cache, out)


def test_store_creation_on_a_full_disk_is_one_line(voc_yaml, teacher_pt, tmp_path):
    run = drill("ENOSPC", 1, cli_command(voc_yaml, teacher_pt, tmp_path / "c.zarr"))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "No space left on device" in run.stderr.strip().splitlines()[-1]


def unfinished_copy(built_cache: Path, tmp_path: Path, chunks=()) -> tuple[Path, CacheStore]:
    """A copy of the finished cache with row-chunks `chunks` marked not done, as an interrupted build leaves them."""
    out = tmp_path / "c.zarr"
    shutil.copytree(built_cache, out)
    store = CacheStore.open(out, writable=True)
    store.mark_not_done(chunks)
    return out, store


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_repair_recomputes_exactly_the_damaged_chunks(built_cache, voc_yaml, teacher_pt, tmp_path, assert_same_store):
    out, _ = unfinished_copy(built_cache, tmp_path)
    flip_byte(out / "maps" / "13" / "c" / "1" / "0" / "0")
    flip_byte(out / "norms" / "8" / "c" / "2")
    flip_byte(out / "files" / "c" / "3")
    before = {k: (out / k).read_bytes() for k in ("maps/6/c/0/0/0", "maps/6/c/3/0/0", "done/c/0")}
    with pytest.raises(AtcacheError, match="--repair"):
        resume(voc_yaml, teacher_pt, out)  # the damaged image list is noticed before anything is computed
    report = resume(voc_yaml, teacher_pt, out, repair=True)
    assert report.repaired == {1: ["maps/13"], 2: ["norms/8"]}
    store = CacheStore.open(out)
    assert report.computed == sum(len(range(*store.chunk_range(k))) for k in (1, 2))
    assert_same_store(built_cache, out)
    assert {k: (out / k).read_bytes() for k in before} == before  # undamaged chunks were not rewritten


def test_repair_needs_resume(voc_yaml, teacher_pt, tmp_path):
    with pytest.raises(AtcacheError, match="--resume --repair"):
        build_cache(build_config(voc_yaml, tmp_path / "c.zarr", teacher=str(teacher_pt), repair=True))


def test_overlapping_builders_are_refused(built_cache, voc_yaml, teacher_pt, tmp_path, assert_same_store):
    out, store = unfinished_copy(built_cache, tmp_path, [1, 2])
    with ChunkClaim(store, [2]):  # a live builder (this process) owns row-chunk 2
        with pytest.raises(AtcacheError, match=rf"row-chunk 2 \(rows 16-23\) is being built by pid {os.getpid()}"):
            resume(voc_yaml, teacher_pt, out)
        assert not store.done_mask()[8:24].any()  # refused before computing anything, chunk 1 included
        [record] = [json.loads(p.read_text()) for p in (out / LOCK_PREFIX).glob("claim-*.json")]
        assert record["ranges"] == [[2, 3]] and record["pid"] == os.getpid()
        resume(voc_yaml, teacher_pt, out, shard=(0, 2))  # a disjoint shard (chunks 0-1) is fine
        assert store.done_mask()[8:16].all()
    resume(voc_yaml, teacher_pt, out)
    assert_same_store(built_cache, out)
    assert_clean(out)


def test_two_concurrent_builders_one_is_refused_the_store_is_whole(built_cache, voc_yaml, teacher_pt, tmp_path,
                                                                   assert_same_store):
    out, _ = unfinished_copy(built_cache, tmp_path, range(4))
    cmd = cli_command(voc_yaml, teacher_pt, out) + ["--resume"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0, results
    if codes[1] != 0:  # they overlapped in time: the second was refused with one line
        refused = next(err for code, err in results if code != 0)
        assert "is being built by pid" in refused and "Traceback" not in refused
    resume(voc_yaml, teacher_pt, out)
    assert_same_store(built_cache, out)
    assert_clean(out)


def test_dead_builders_claims_are_taken_over(built_cache, voc_yaml, teacher_pt, tmp_path, assert_same_store):
    out, store = unfinished_copy(built_cache, tmp_path, [0])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim = ChunkClaim(store, [0])
    claim.record = {**claim.record, "pid": int(dead.stdout)}  # as if a builder that was killed had claimed it
    claim.acquire()
    resume(voc_yaml, teacher_pt, out)
    assert_same_store(built_cache, out)
    assert_clean(out)


def test_claims_from_other_hosts_expire_without_heartbeats(built_cache, tmp_path):
    import json
    import time

    from atcache.cache.claims import LOCK_STALE_S

    out, store = unfinished_copy(built_cache, tmp_path)
    remote = ChunkClaim(store, [0])
    remote.record = {**remote.record, "host": "node7.elsewhere", "pid": 1}  # a builder on another machine
    remote.acquire()
    remote._released.set()  # it stops beating (the node was lost) but its records stay
    with pytest.raises(AtcacheError, match="on node7.elsewhere"):
        ChunkClaim(store, [0]).acquire()  # its last heartbeat is recent: presumed alive
    with ChunkClaim(store, [0], break_locks=True):  # unless the user says it is dead
        pass
    remote.acquire()
    remote._released.set()
    store.location.write(remote.key, json.dumps({**remote.record, "heartbeat": time.time() - LOCK_STALE_S - 1}).encode())
    with ChunkClaim(store, [0]) as mine:  # silent for longer than LOCK_STALE_S: taken over
        assert mine.held == [0]
    assert_clean(out)


def test_owner_liveness_on_this_host():
    import socket

    from atcache.cache.claims import owner_record, owner_alive

    me = owner_record("build")
    assert owner_alive(me)
    assert not owner_alive({**me, "pid": 0}) and not owner_alive({**me, "pid": None})
    assert not owner_alive({**me, "start": "1"})  # this pid, but another process (recycled pid)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    for _ in range(100):  # wait until it has exited but is not reaped
        if (Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split() or ["?"])[0] == "Z":
            break
        __import__("time").sleep(0.05)
    assert not owner_alive({"host": socket.gethostname(), "pid": zombie.pid})
    zombie.wait()
