"""Who computes stage 1's row-chunks once `build.build_cache` has checked the settings, opened the store and claimed
the chunks: this process (`run_here`), one child process per device (`run_on_devices`, --device 0,1,2,3) or dask
tasks on a cluster (`run_on_cluster`, --scheduler). Children get the BuildConfig as JSON and run `compute_block`."""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

from atcache.teacher.compute import compute_units
from atcache.config import BuildConfig
from atcache.data.splits import SplitFiles, split_files
from atcache.errors import AtcacheError, as_interruption, stop_on_signals
from atcache.cache.store import CacheStore


@dataclass
class RunResult:
    """What a runner did: images skipped as unreadable, and per device process (device, rows, seconds, skipped)."""

    skipped: list[tuple[str, str]] = field(default_factory=list)
    parts: list[tuple[str, int, float, list[tuple[str, str]]]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- the runners
def run_here(cfg: BuildConfig, store: CacheStore, todo: Sequence[int], teacher, split: SplitFiles, device) -> RunResult:
    """The chunks computed in this process, with the teacher already loaded on `device`."""
    return RunResult(skipped=compute_units(cfg, teacher.model, split, store, todo, device))


def run_on_devices(cfg: BuildConfig, store: CacheStore, todo: Sequence[int], devices: Sequence[str]) -> RunResult:
    """One child process per device, each computing a contiguous block of the chunks (the first shows progress)."""
    blocks = [list(todo[len(todo) * i // len(devices):len(todo) * (i + 1) // len(devices)]) for i in range(len(devices))]
    jobs = [(d, b) for d, b in zip(devices, blocks) if b]
    procs = [subprocess.Popen([sys.executable, "-m", "atcache.teacher.runners",
                               dataclasses.replace(cfg, progress=cfg.progress and n == 0).to_json(), json.dumps(b), d],
                              stdout=subprocess.PIPE, text=True) for n, (d, b) in enumerate(jobs)]
    try:
        outputs = [p.communicate()[0] for p in procs]
    except BaseException as e:  # Ctrl-C or SIGTERM: the children stop too, keeping their finished chunks
        _stop_children(procs, stop.signum if (stop := as_interruption(e)) else signal.SIGTERM)
        raise
    failed = [f"device {d} (exit {p.returncode})" for (d, _), p in zip(jobs, procs) if p.returncode != 0]
    if failed:
        raise AtcacheError(f"shard process(es) failed on {', '.join(failed)}; see their messages above, fix, and rerun with --resume")
    result = RunResult()
    for (d, _), out in zip(jobs, outputs):
        rows, skipped, took = json.loads(out.strip().splitlines()[-1])
        skipped = [tuple(s) for s in skipped]
        result.skipped += skipped
        result.parts.append((d, rows, took, skipped))
    return result


def _stop_children(procs: Sequence[subprocess.Popen], signum: int, wait_s: float = 60) -> None:
    """Pass the signal that stopped this process on to the device processes still running (a terminal's Ctrl-C
    reaches them itself, `timeout` and `kill` do not) and wait until they are gone; one that hangs is killed."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signum)
    deadline = time.monotonic() + wait_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_on_cluster(cfg: BuildConfig, store: CacheStore, todo: Sequence[int]) -> RunResult:
    """Blocks of whole chunks as dask tasks (retried when a worker is lost), each written straight into the store."""
    from distributed import as_completed
    from tqdm import tqdm

    from atcache.scheduler import cpu_threads_per_worker, dask_client, worker_count

    result = RunResult()
    with dask_client(cfg.scheduler) as client:
        n_workers = worker_count(client)
        blocks = _task_blocks(todo, n_workers)
        task_cfg = dataclasses.replace(cfg, scheduler="", resume=True, overwrite=False, repair=False, progress=False)
        threads = 0
        if cfg.scheduler.startswith("local"):  # N workers share this machine's cores with their decoders
            client.run(_leave_stopping_to_parent)
            threads = cpu_threads_per_worker(n_workers)
            task_cfg = dataclasses.replace(task_cfg, workers=min(cfg.workers, max(0, threads - 1)))
        futures = client.map(cluster_task, [task_cfg.to_json()] * len(blocks), blocks, [threads] * len(blocks),
                             retries=cfg.retries, pure=False, key=[f"atcache-build-{b[0]}-{b[-1]}" for b in blocks])
        bar = tqdm(total=sum(store.unit_rows(todo)), desc=f"build-cache {store.location.name} ({n_workers} workers)",
                   unit="img", disable=not cfg.progress, dynamic_ncols=True)
        try:
            for future in as_completed(futures):
                n, bad = future.result()
                result.skipped += bad
                bar.update(n + len(bad))
        except BaseException:
            client.cancel(futures)
            raise
        finally:
            bar.close()
    return result


def _leave_stopping_to_parent() -> None:
    """Run in each local dask worker (its event loop runs in its main thread): a terminal's Ctrl-C and SLURM's SIGTERM
    reach the workers too, but this process stops them (futures cancelled, cluster closed), without their tracebacks
    or leaked semaphores; a worker whose parent is gone exits by itself (distributed watches the parent)."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def _task_blocks(chunks: Sequence[int], n_workers: int, per_worker: int = 4, max_chunks: int = 16) -> list[list[int]]:
    """Split the row-chunks to compute into contiguous task blocks: about `per_worker` tasks per worker (load
    balance, cheap retries), at most `max_chunks` chunks each."""
    chunks = list(chunks)
    size = max(1, min(max_chunks, -(-len(chunks) // (per_worker * max(1, n_workers)))))
    return [chunks[i:i + size] for i in range(0, len(chunks), size)]


# ---------------------------------------------------------------------------------------------------- the children
def _worker_device(device: str) -> str:
    """The device of this dask worker: --device 0,1 spreads local workers (named 0..N-1) over the list."""
    from atcache.devices import parse_devices
    from atcache.scheduler import this_worker_name

    devices = parse_devices(device) or ["cpu"]
    name = this_worker_name()
    return devices[int(name) % len(devices)] if name.isdigit() else devices[0]


@functools.lru_cache(maxsize=2)
def _process_teacher(path: str, nc: int, device: str):
    """The teacher, loaded once per process (a dask worker runs many tasks)."""
    from atcache.devices import resolve_device
    from atcache.yolo import load_model

    return load_model(path, nc=nc, device=resolve_device(device))


def compute_block(cfg: BuildConfig, chunks: Sequence[int], device: str, threads: int = 0) -> tuple[int, list[tuple[str, str]]]:
    """A child's work (a device process or a dask task): compute the row-chunks of `chunks` that are not complete yet
    (a retried task skips what its lost predecessor finished) on `device`; returns (rows computed, skipped images)."""
    import multiprocessing

    import torch

    from atcache.devices import resolve_device

    if threads:
        torch.set_num_threads(threads)
    split = split_files(cfg.data, cfg.split)
    store = CacheStore.open(cfg.out, writable=True)
    if split.fingerprint() != store.spec.dataset_fingerprint:
        raise AtcacheError(f"worker sees other images under {split.root} than the cache was created for; every "
                           "worker needs the same dataset at the same path (a shared filesystem)")
    teacher = _process_teacher(cfg.teacher, len(split.names), device)
    if teacher.weights_sha256 != store.spec.teacher_weights_sha256:
        raise AtcacheError(f"worker loaded other teacher weights from {cfg.teacher} than the cache was created with; "
                           "every worker needs the same teacher file at the same path")
    complete = store.complete_units()
    todo = [k for k in chunks if not complete[k]]
    if not todo:
        return 0, []
    if multiprocessing.current_process().daemon and cfg.workers:  # a daemonic dask worker cannot fork loaders
        cfg = dataclasses.replace(cfg, workers=0)
    skipped = compute_units(cfg, teacher.model, split, store, todo, resolve_device(device))
    return sum(store.unit_rows(todo)) - len(skipped), skipped


def cluster_task(cfg_json: str, chunks: Sequence[int], threads: int = 0) -> tuple[int, list[tuple[str, str]]]:
    """One dask task: `compute_block` on this worker's device."""
    cfg = BuildConfig.from_json(cfg_json)
    return compute_block(cfg, chunks, _worker_device(cfg.device), threads)


def _device_process(cfg_json: str, chunks_json: str, device: str) -> None:
    """`python -m atcache.teacher.runners CFG CHUNKS DEVICE`: one device's block; prints [rows, skipped, seconds] as JSON."""
    from atcache.yolo import prepare

    prepare()
    t0 = time.perf_counter()
    rows, skipped = compute_block(BuildConfig.from_json(cfg_json), json.loads(chunks_json), device)
    print(json.dumps([rows, skipped, time.perf_counter() - t0]))


if __name__ == "__main__":
    with stop_on_signals():  # SIGTERM, like Ctrl-C, unwinds (the writer finishes its chunk); the parent says the rest
        try:
            _device_process(*sys.argv[1:4])
        except BaseException as e:
            if (stop := as_interruption(e)) is not None:
                sys.exit(stop.exit_code)
            if not isinstance(e, AtcacheError):
                raise
            sys.stderr.write(f"atcache: error: {e}\n")
            sys.exit(2)
