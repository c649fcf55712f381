"""build-cache on dask.distributed: a LocalCluster of 2 CPU worker processes writes the same store as one process,
also when a worker is killed in the middle (dask retries its task, the retry skips what was finished)."""

import os
import signal
import subprocess
import threading
import time

import psutil
import pytest

from atcache.teacher.pipeline import build_cache
from atcache.teacher.runners import _task_blocks as task_blocks
from atcache.teacher.runners import _worker_device as worker_device
from atcache.scheduler import parse_scheduler
from atcache.errors import AtcacheError
from helpers import assert_clean, build_config, cli_command

pytest.importorskip("distributed")


def test_local_cluster_build_equals_one_process(built_cache, voc_yaml, teacher_pt, tmp_path, assert_same_store):
    out = tmp_path / "c.zarr"
    report = build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), scheduler="local:2"))
    assert report.computed == report.total_rows == 31
    assert_same_store(built_cache, out)
    assert_clean(out)


def test_cluster_build_resumes_and_the_cli_reports_progress(built_cache, voc_yaml, teacher_pt, tmp_path,
                                                            assert_same_store):
    out = tmp_path / "c.zarr"
    build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), shard=(0, 2)))  # half done, as if interrupted
    run = subprocess.run(cli_command(voc_yaml, teacher_pt, out) + ["--resume", "--scheduler", "local:2"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "15 images" in run.stdout and "16 already done" in run.stdout
    assert_same_store(built_cache, out)


def test_killed_worker_is_retried_and_the_store_is_whole(voc_yaml, teacher_pt, tmp_path, assert_same_store):
    out, reference = tmp_path / "c.zarr", tmp_path / "reference.zarr"
    build_cache(build_config(voc_yaml, reference, teacher=str(teacher_pt), chunk_rows=2))  # 16 small tasks
    me, killed = psutil.Process(), []

    def kill_a_worker_once_a_chunk_is_written():
        deadline = time.monotonic() + 120
        chunks = out / "done" / "c"  # a done chunk's file appears once its row-chunk is written (renamed into place)
        while time.monotonic() < deadline and not killed:
            started = chunks.is_dir() and any("." not in f.name for f in chunks.iterdir())
            workers = [p for p in me.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())] if started else []
            if workers:
                os.kill(workers[0].pid, signal.SIGKILL)
                killed.append(workers[0].pid)
            time.sleep(0.005)

    killer = threading.Thread(target=kill_a_worker_once_a_chunk_is_written, daemon=True)
    killer.start()
    report = build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), scheduler="local:2", chunk_rows=2,
                                      retries=3))
    killer.join()
    assert killed, "no worker was killed"
    assert report.computed + report.already_done == 31
    assert_same_store(reference, out)
    assert_clean(out)


def test_scheduler_flags_are_checked(voc_yaml, teacher_pt, tmp_path):
    for bad in ("local:0", "local:x", "", "sync", "threads"):
        with pytest.raises(AtcacheError, match="--scheduler"):
            parse_scheduler(bad)
    assert parse_scheduler("tcp://10.0.0.5:8786") == ("tcp://10.0.0.5:8786", 0)
    assert parse_scheduler("10.0.0.5:8786") == ("10.0.0.5:8786", 0)
    with pytest.raises(AtcacheError, match="leave out --shard"):
        build_cache(build_config(voc_yaml, tmp_path / "c.zarr", teacher=str(teacher_pt), scheduler="local:1",
                                 shard=(0, 2)))
    run = subprocess.run(cli_command(voc_yaml, teacher_pt, tmp_path / "d.zarr") + ["--scheduler", "tcp://127.0.0.1:9"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "cannot reach the dask scheduler" in run.stderr and "Traceback" not in run.stderr


def test_task_blocks_and_worker_devices(monkeypatch):
    assert task_blocks(range(10), 2) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert task_blocks(range(3), 4) == [[0], [1], [2]]
    assert max(map(len, task_blocks(range(1000), 1))) == 16
    monkeypatch.setattr("atcache.scheduler.this_worker_name", lambda: "3")
    assert worker_device("0,1") == "1" and worker_device("cpu") == "cpu"
    monkeypatch.setattr("atcache.scheduler.this_worker_name", lambda: "")
    assert worker_device("2,3") == "2"


def test_what_a_lost_attempt_left_mid_write_is_swept_once_the_store_is_complete(built_cache, voc_yaml, teacher_pt,
                                                                                tmp_path, assert_same_store):
    from atcache.teacher.runners import compute_block
    from atcache.cache.store import CacheStore

    out = tmp_path / "c.zarr"
    build_cache(build_config(voc_yaml, out, teacher=str(teacher_pt), shard=(0, 2)))  # chunks 0-1 done, 2-3 not
    leftover = out / "norms" / "22" / "c" / "3.0123456789abcdef.partial"  # a worker killed while writing chunk 3
    leftover.write_bytes(b"half a chunk")
    resume = build_config(voc_yaml, out, teacher=str(teacher_pt), resume=True)
    rows, skipped = compute_block(resume, [2, 3], "cpu")  # the retried task computes what is not done yet
    assert (rows, skipped) == (15, [])
    assert CacheStore.open(out).done_mask().all()
    report = build_cache(resume)  # a build that finds (or leaves) the store complete sweeps the leftovers
    assert report.computed == 0 and not leftover.exists()
    assert_clean(out)
    assert_same_store(built_cache, out)
