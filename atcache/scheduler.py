"""dask plumbing shared by `build-cache --scheduler` and `inspect --scheduler`: connect to a running scheduler
(`tcp://host:8786`) or start a local cluster (`local:N`, N worker processes here), or use dask's threads. Imports no
torch and no ultralytics."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from atcache.errors import AtcacheError


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
    if "://" not in text and not text.rpartition(":")[2].isdigit():  # not an address (e.g. dask's 'sync', 'threads')
        raise AtcacheError(f"--scheduler {text!r} is neither local:N nor a scheduler address with its port; pass "
                           "local:N, or tcp://host:8786, or leave it out for this process's threads")
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


@contextlib.contextmanager
def dask_scheduler(workers: int | None = None, address: str | None = None):
    """dask's threaded scheduler with `workers` threads, or dask.distributed: `local:N` or a scheduler address."""
    if address:
        with dask_client(address, threads_per_worker=max(1, workers or 1)):
            yield
        return
    import dask

    with dask.config.set(scheduler="threads", num_workers=workers or None):
        yield
