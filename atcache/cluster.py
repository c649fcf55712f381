"""Stage 1 on dask.distributed (`build-cache --scheduler`), and the cluster plumbing `inspect --scheduler` shares:
connect to a running scheduler (`tcp://host:8786`) or start a local cluster (`local:N`, N worker processes here)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from typing import Iterator, Sequence

import torch

from atcache.build import (
    BuildConfig, BuildReport, check_flags, claim_chunks, open_store, resolve_device, run_teacher, vanishing_layers,
)
from atcache.data import split_files
from atcache.errors import AtcacheError
from atcache.store import CacheStore
from atcache.teacher import Teacher, load_teacher


def parse_scheduler(text: str) -> tuple[str, int]:
    """'local:4' -> ('local', 4); 'tcp://host:8786' (or host:8786) -> (address, 0)."""
    text = text.strip()
    if text.startswith("local"):
        _, _, n = text.partition(":")
        if not n.isdigit() or int(n) < 1:
            raise AtcacheError(f"--scheduler {text!r}: write local:N with N >= 1 worker processes (e.g. local:2)")
        return "local", int(n)
    if not text:
        raise AtcacheError("--scheduler is empty; pass local:N or a scheduler address like tcp://host:8786")
    return text, 0


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise AtcacheError("--scheduler needs dask.distributed: pip install 'dask[distributed]'") from None
    return distributed


@contextlib.contextmanager
def dask_client(scheduler: str, threads_per_worker: int = 1) -> Iterator["object"]:
    """A distributed.Client on `scheduler` (see parse_scheduler); a local cluster is closed on exit.

    Local workers are non-daemonic processes so each can run its own DataLoader workers, and they inherit this
    process's environment (YOLO_OFFLINE, CUDA_VISIBLE_DEVICES)."""
    distributed = _import_distributed()
    import dask

    address, n = parse_scheduler(scheduler)
    if address == "local":
        with dask.config.set({"distributed.worker.daemon": False, "distributed.scheduler.worker-ttl": None,
                              "distributed.admin.system-monitor.gil.enabled": False}):
            cluster = distributed.LocalCluster(
                n_workers=n, threads_per_worker=threads_per_worker, processes=True, dashboard_address=None,
                memory_limit=0, silence_logs=40,
            )
            try:
                with distributed.Client(cluster) as client:
                    yield client
            finally:
                cluster.close()
        return
    _check_reachable(address)
    try:
        client = distributed.Client(address, timeout="20s")
    except Exception as e:
        raise AtcacheError(f"cannot reach the dask scheduler at {address}: {e}; start it with `dask scheduler` "
                           "and workers with `dask worker ADDRESS --nworkers 1 --nthreads 1`") from None
    with client:
        if not client.scheduler_info().get("workers"):
            client.wait_for_workers(1, timeout=60)
        yield client


def _check_reachable(address: str) -> None:
    """Fail at once (not after the client's timeout) when nothing listens at a tcp:// address."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not port.isdigit() or address.split("://", 1)[0] not in ("tcp", hostport):
        return
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=10).close()
    except OSError as e:
        raise AtcacheError(f"cannot reach the dask scheduler at {address} ({e.strerror or e}); start it with "
                           "`dask scheduler` and workers with `dask worker ADDRESS`, or use --scheduler local:N") from None


def worker_count(client) -> int:
    return max(1, len(client.scheduler_info().get("workers", {})))


def this_worker_name() -> str:
    """The dask worker's name inside a task ('' outside a worker): local workers are named 0..N-1."""
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):
        return ""


def cpu_threads_per_worker(n_workers: int) -> int:
    """CPU threads each local worker may use so that N workers do not oversubscribe this machine."""
    return max(1, (os.cpu_count() or 1) // max(1, n_workers))


# ---------------------------------------------------------------------------------------------------- the build
def build_cache_distributed(cfg: BuildConfig) -> BuildReport:
    """The build on a dask.distributed cluster: this process creates/claims the store, each task computes a block of
    row-chunks on its worker's device and writes them straight into the shared store; dask retries lost tasks."""
    from distributed import as_completed
    from tqdm import tqdm

    t0 = time.perf_counter()
    check_flags(cfg)
    if cfg.shard != (0, 1):
        raise AtcacheError("--scheduler splits the build over the cluster itself; leave out --shard")
    parse_scheduler(cfg.scheduler)
    split = split_files(cfg.data, cfg.split)
    cpu = torch.device("cpu")  # the spec only needs the layer shapes; workers bring the devices
    teacher = load_teacher(cfg.teacher, nc=len(split.names), device=cpu)
    store = open_store(cfg, teacher, split, cpu, join=False)
    del teacher
    owned = range(store.n_chunks)
    computed, skipped = 0, []
    with claim_chunks(store, owned, cfg) as (todo, repaired):
        already = store.rows_in(sorted(set(owned) - set(todo)))
        t_loop = time.perf_counter()
        if todo:
            with dask_client(cfg.scheduler) as client:
                n_workers = worker_count(client)
                blocks = task_blocks(todo, n_workers)
                task_cfg = dataclasses.replace(cfg, scheduler="", resume=True, overwrite=False, repair=False,
                                               progress=False)
                threads = 0
                if cfg.scheduler.startswith("local"):  # N workers share this machine's cores with their decoders
                    threads = cpu_threads_per_worker(n_workers)
                    task_cfg = dataclasses.replace(task_cfg, workers=min(cfg.workers, max(0, threads - 1)))
                futures = client.map(build_chunks_task, [task_cfg] * len(blocks), blocks, [threads] * len(blocks),
                                     retries=cfg.retries, pure=False, key=[f"atcache-build-{b[0]}-{b[-1]}" for b in blocks])
                bar = tqdm(total=store.rows_in(todo), desc=f"build-cache {store.location.name} ({n_workers} workers)", unit="img",
                           disable=not cfg.progress, dynamic_ncols=True)
                try:
                    for future in as_completed(futures):
                        n, bad = future.result()
                        skipped += bad
                        bar.update(n + len(bad))
                except BaseException:
                    client.cancel(futures)
                    raise
                finally:
                    bar.close()
        loop_seconds = time.perf_counter() - t_loop
        if todo:  # rows done now, whichever attempt of a retried task wrote them
            done = store.done_mask()
            computed = int(sum(done[slice(*store.chunk_range(k))].sum() for k in todo))
    return BuildReport(
        out=str(cfg.out), computed=computed, already_done=already, total_rows=store.n_rows,
        seconds=time.perf_counter() - t0, loop_seconds=loop_seconds, store_bytes=store.nbytes_stored(),
        skipped=skipped, warnings=vanishing_layers(store), repaired=repaired,
    )


def task_blocks(chunks: Sequence[int], n_workers: int, per_worker: int = 4, max_chunks: int = 16) -> list[list[int]]:
    """Split the row-chunks to compute into contiguous task blocks: about `per_worker` tasks per worker (load
    balance, cheap retries), at most `max_chunks` chunks each."""
    chunks = list(chunks)
    size = max(1, min(max_chunks, -(-len(chunks) // (per_worker * max(1, n_workers)))))
    return [chunks[i:i + size] for i in range(0, len(chunks), size)]


def worker_device(device: str) -> str:
    """The device of this dask worker: --device 0,1 spreads local workers (named 0..N-1) over the list."""
    devices = [d.strip() for d in str(device).split(",") if d.strip()] or ["cpu"]
    name = this_worker_name()
    return devices[int(name) % len(devices)] if name.isdigit() else devices[0]


@functools.lru_cache(maxsize=2)
def _worker_teacher(path: str, nc: int, device: str) -> Teacher:
    return load_teacher(path, nc=nc, device=resolve_device(device))


def build_chunks_task(cfg: BuildConfig, chunks: Sequence[int], threads: int = 0) -> tuple[int, list[tuple[str, str]]]:
    """One dask task: compute the row-chunks of `chunks` that are not complete yet (a retried task skips what its
    lost predecessor finished) and write them; returns (rows computed, skipped images)."""
    import multiprocessing

    if threads:
        torch.set_num_threads(threads)
    device = worker_device(cfg.device)
    split = split_files(cfg.data, cfg.split)
    store = CacheStore.open(cfg.out, writable=True)
    if split.fingerprint() != store.spec.dataset_fingerprint:
        raise AtcacheError(f"worker sees other images under {split.root} than the cache was created for; every "
                           "worker needs the same dataset at the same path (a shared filesystem)")
    teacher = _worker_teacher(cfg.teacher, len(split.names), device)
    if teacher.weights_sha256 != store.spec.teacher_weights_sha256:
        raise AtcacheError(f"worker loaded other teacher weights from {cfg.teacher} than the cache was created with; "
                           "every worker needs the same teacher file at the same path")
    complete = store.complete_chunks()
    todo = [k for k in chunks if not complete[k]]
    if not todo:
        return 0, []
    store.remove_partial_writes(todo)  # what a lost attempt of this task left mid-write
    if multiprocessing.current_process().daemon and cfg.workers:  # a daemonic dask worker cannot fork loaders
        cfg = dataclasses.replace(cfg, workers=0)
    skipped = run_teacher(cfg, teacher, split, store, todo, resolve_device(device))
    return store.rows_in(todo) - len(skipped), skipped
