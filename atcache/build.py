"""Stage 1: run the teacher once over a split and write its per-layer attention maps into the cache store."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from atcache import __version__
from atcache.attention import EPS, KINDS, attention_with_norm
from atcache.data import LETTERBOX_COLUMNS, LetterboxedImages, SplitFiles, split_files
from atcache.errors import AtcacheError, first_line
from atcache.hooks import FeatureHooks, probe_layers
from atcache.spec import CacheSpec, LayerSpec, Letterbox
from atcache.store import CacheStore, ChunkClaim, ChunkData, chunks_for_shard, clear_for_build, iter_rows
from atcache.teacher import Teacher, load_teacher

DEFAULT_LAYERS = (6, 8, 13, 16, 19, 22)
DEFAULT_CHUNK_ROWS = 256


@dataclass(frozen=True)
class BuildConfig:
    """What `atcache build-cache` was asked to do."""

    teacher: str
    data: str
    out: str
    split: str = "train"
    layers: tuple[int, ...] = DEFAULT_LAYERS
    imgsz: int = 640
    batch: int = 64
    device: str = "cpu"
    p: float = 2.0
    kind: str = "sum_p"
    workers: int = 4
    resume: bool = False
    overwrite: bool = False
    shard: tuple[int, int] = (0, 1)
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    skip_bad: bool = False
    progress: bool = True
    repair: bool = False  # with --resume: recompute the row-chunks whose stored data fails to decode
    break_locks: bool = False  # take over row-chunks another builder claimed (only when that builder is dead)
    scheduler: str = ""  # dask.distributed: 'local:N' or a scheduler address; '' = this process
    retries: int = 2  # dask retries of a failed build task (a lost worker)


@dataclass
class BuildReport:
    """What a build did: rows computed now, rows already done, skipped images, time and store size."""

    out: str
    computed: int
    already_done: int
    total_rows: int
    seconds: float
    store_bytes: int
    loop_seconds: float = 0.0  # the teacher loop alone: decoding, forward, maps, writes (no model load, no setup)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    repaired: dict[int, list[str]] = field(default_factory=dict)  # row-chunk -> arrays that failed to decode

    @property
    def img_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_image(self) -> float:
        return self.store_bytes / max(self.total_rows, 1)

    def summary(self) -> str:
        repaired = f"repaired {len(self.repaired)} damaged row-chunk(s); " if self.repaired else ""
        return (
            f"{repaired}{self.computed} images in {self.seconds:.1f}s ({self.img_per_s:.1f} img/s), "
            f"{self.already_done} already done, {len(self.skipped)} skipped; store {self.out}: "
            f"{self.store_bytes / 1e6:.1f} MB, {self.bytes_per_image / 1e3:.1f} KB/image"
        )


def resolve_device(device: str) -> torch.device:
    """'cpu', '0', 'cuda:1' -> a torch.device; a clear error if that GPU is not there."""
    d = str(device).strip().lower()
    if d in ("cpu", ""):
        return torch.device("cpu")
    if d == "mps":
        return torch.device("mps")
    index = d.split(":", 1)[1] if d.startswith("cuda") and ":" in d else ("0" if d == "cuda" else d)
    if not index.isdigit():
        raise AtcacheError(f"--device {device!r} is not understood; use cpu, 0, 1, ... (one device per build process)")
    if not torch.cuda.is_available() or int(index) >= torch.cuda.device_count():
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise AtcacheError(f"--device {device}: CUDA device {index} is not available ({n} GPU(s) visible); use --device cpu")
    return torch.device(f"cuda:{index}")


def make_spec(cfg: BuildConfig, teacher: Teacher, split: SplitFiles, device: torch.device) -> CacheSpec:
    """Validate the layer/imgsz choice against the teacher and describe the cache to build."""
    if cfg.kind not in KINDS:
        raise AtcacheError(f"--kind {cfg.kind!r} is unknown; choose one of {', '.join(KINDS)}")
    if cfg.p <= 0:
        raise AtcacheError(f"--p must be positive, got {cfg.p}")
    max_stride = int(max(getattr(teacher.model, "stride", torch.tensor([32.0])).max().item(), 32))
    if cfg.imgsz <= 0 or cfg.imgsz % max_stride:
        raise AtcacheError(f"--imgsz {cfg.imgsz} is not a multiple of the teacher's max stride {max_stride}; use e.g. {max(max_stride, cfg.imgsz // max_stride * max_stride)}")
    if cfg.chunk_rows < 1 or cfg.batch < 1:
        raise AtcacheError("--batch and --chunk-rows must be at least 1")
    shapes = probe_layers(teacher.model, cfg.layers, cfg.imgsz, device)
    layers = []
    for index, (c, h, w) in zip(cfg.layers, shapes):
        if cfg.imgsz % h or cfg.imgsz // h != cfg.imgsz // w:
            raise AtcacheError(f"layer {index} maps {cfg.imgsz}px to {h}x{w}, not an integer stride; choose another layer")
        layers.append(LayerSpec(index=index, stride=cfg.imgsz // h, channels=c, height=h, width=w))
    import ultralytics

    return CacheSpec(
        layers=tuple(layers), imgsz=cfg.imgsz, p=float(cfg.p), kind=cfg.kind, eps=EPS,
        teacher_sha256=teacher.file_sha256, teacher_weights_sha256=teacher.weights_sha256, teacher_name=teacher.name,
        split=cfg.split, dataset_fingerprint=split.fingerprint(), n_rows=len(split.files), chunk_rows=cfg.chunk_rows,
        letterbox=Letterbox(columns=LETTERBOX_COLUMNS), teacher_path=teacher.path, data_yaml=split.data_yaml,
        atcache_version=__version__, ultralytics_version=ultralytics.__version__, torch_version=torch.__version__,
    )


class ChunkBatches(torch.utils.data.Sampler):
    """Batches that never span two row-chunks, so a chunk's batches are the same whether built whole or resumed."""

    def __init__(self, store: CacheStore, chunks: Sequence[int], batch: int, position: dict[int, int]):
        self.store, self.chunks, self.batch, self.position = store, list(chunks), batch, position

    def __iter__(self) -> Iterator[list[int]]:
        for k in self.chunks:
            a, b = self.store.chunk_range(k)
            for s in range(a, b, self.batch):
                yield [self.position[r] for r in range(s, min(s + self.batch, b))]

    def __len__(self) -> int:
        sizes = (b - a for a, b in map(self.store.chunk_range, self.chunks))
        return sum(-(-size // self.batch) for size in sizes)


class ChunkWriter:
    """Writes finished row-chunks on a background thread so compression and I/O overlap the teacher."""

    def __init__(self, store: CacheStore, depth: int = 2):
        self.store, self.q = store, queue.Queue(maxsize=depth)
        self.written = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.q.get()) is not None:
            if self.error is None:
                try:
                    self.store.write_chunk(*item)
                    self.written += 1
                except BaseException as e:  # surfaced in the main thread
                    self.error = e

    def put(self, k: int, data: ChunkData) -> None:
        self._check()
        self.q.put((k, data))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        self._check()

    def _check(self) -> None:
        if self.error is not None:
            raise AtcacheError(write_error_message(self.store, self.error, self.written)) from self.error


def write_error_message(store: CacheStore, error: BaseException, written: int) -> str:
    """One line for a failed chunk write: disk full, permission, or the storage layer's own message."""
    import errno

    code = getattr(error, "errno", None)
    kept = f"the {written} row-chunk(s) written before are kept" if written else "finished row-chunks are kept"
    if code in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on the device"
        fix = "free space (or choose another --out), then rerun with --resume"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS) or isinstance(error, PermissionError):
        what = "permission denied" if code != errno.EROFS else "read-only file system"
        fix = "make the store writable (or choose another --out), then rerun with --resume"
    else:
        what = f"{type(error).__name__}: {first_line(error)}"
        fix = "fix the storage problem, then rerun with --resume"
    return f"writing to cache {store.path} failed ({what}); {kept}; {fix}"


class ChunkAssembler:
    """Collects the per-batch results of one row-chunk until it is complete."""

    def __init__(self, store: CacheStore, k: int):
        self.k, (self.a, self.b) = k, store.chunk_range(k)
        self.parts: list[tuple[np.ndarray, dict, dict, np.ndarray, np.ndarray]] = []
        self.count = 0

    def add(self, rows, maps, norms, letterbox, ok) -> bool:
        self.parts.append((rows, maps, norms, letterbox, ok))
        self.count += len(rows)
        return self.count == self.b - self.a

    def data(self) -> ChunkData:
        rows = np.concatenate([p[0] for p in self.parts])
        if not np.array_equal(rows, np.arange(self.a, self.b)):
            raise RuntimeError(f"chunk {self.k} assembled rows out of order")
        layers = self.parts[0][1].keys()
        return ChunkData(
            maps={i: np.concatenate([p[1][i] for p in self.parts]) for i in layers},
            norms={i: np.concatenate([p[2][i] for p in self.parts]) for i in layers},
            letterbox=np.concatenate([p[3] for p in self.parts]),
            ok=np.concatenate([p[4] for p in self.parts]),
        )


def build_cache(cfg: BuildConfig) -> BuildReport:
    """Run the teacher over the rows of this shard that are not done yet and write them chunk by chunk."""
    if cfg.scheduler:
        from atcache.cluster import build_cache_distributed

        return build_cache_distributed(cfg)
    t0 = time.perf_counter()
    shard, n_shards = cfg.shard
    check_flags(cfg)
    split = split_files(cfg.data, cfg.split)
    device = resolve_device(cfg.device)
    teacher = load_teacher(cfg.teacher, nc=len(split.names), device=device)
    store = open_store(cfg, teacher, split, device, join=n_shards > 1)
    owned = chunks_for_shard(store.n_chunks, shard, n_shards)
    with claim_chunks(store, owned, cfg) as (todo, repaired):
        rows = list(iter_rows(todo, store))
        already = store.rows_in(sorted(set(owned) - set(todo)))
        skipped: list[tuple[str, str]] = []
        t_loop = time.perf_counter()
        if rows:
            skipped = run_teacher(cfg, teacher, split, store, todo, device)
        seconds, loop_seconds = time.perf_counter() - t0, time.perf_counter() - t_loop
    return BuildReport(
        out=str(cfg.out), computed=len(rows) - len(skipped), already_done=already, total_rows=store.n_rows,
        seconds=seconds, loop_seconds=loop_seconds, store_bytes=store.nbytes_stored(), skipped=skipped,
        warnings=vanishing_layers(store), repaired=repaired,
    )


def check_flags(cfg: BuildConfig) -> None:
    if cfg.overwrite and cfg.shard[1] > 1:
        raise AtcacheError("--overwrite cannot be combined with --shard (shards share one store); delete the store once, then start the shards")
    if cfg.repair and not cfg.resume:
        raise AtcacheError("--repair works on an existing store: pass --resume --repair")
    if cfg.repair and cfg.overwrite:
        raise AtcacheError("--repair keeps the store and --overwrite deletes it; pass one of them")


def open_store(cfg: BuildConfig, teacher: Teacher, split: SplitFiles, device: torch.device, join: bool) -> CacheStore:
    """Describe the cache and create the store, or reopen it (resume / a sibling shard) after checking it matches."""
    spec = make_spec(cfg, teacher, split, device).stamped()
    return CacheStore.open_or_create(cfg.out, spec, split.files, resume=cfg.resume, overwrite=cfg.overwrite,
                                     join=join, repair=cfg.repair)


@contextlib.contextmanager
def claim_chunks(store: CacheStore, owned: Sequence[int], cfg: BuildConfig):
    """Own the row-chunks this builder will compute (refused if a live builder holds any), repair damaged ones with
    --repair, and yield (the chunks still to compute, {repaired chunk: arrays}). Leftovers of an interrupted write
    in those chunks are removed first."""
    owned = list(owned)
    complete = store.complete_chunks()
    candidates = owned if cfg.repair else [k for k in owned if not complete[k]]
    if not candidates:
        yield [], {}
        return
    with ChunkClaim(store, candidates, break_locks=cfg.break_locks):
        store.remove_partial_writes(candidates)
        repaired = store.damaged_chunks(candidates) if cfg.repair else {}
        if repaired:
            store.mark_not_done(repaired)
            complete = store.complete_chunks()
        yield [k for k in candidates if not complete[k]], repaired


def vanishing_layers(store: CacheStore, floor: float = 1e3 * EPS) -> list[str]:
    """Layers whose ||a|| is so small that eps dominates A (maps ~0): the mark of an untrained teacher."""
    out = []
    for layer in store.spec.layers:
        norms = store.norms_array(layer.index)[:]
        median = float(np.nanmedian(norms)) if np.isfinite(norms).any() else float("nan")
        if median < floor:
            out.append(
                f"layer {layer.index}: median ||a|| = {median:.1e} is near eps={EPS:g}, so its maps are ~0 "
                "(an untrained teacher?); train the teacher first for useful targets"
            )
    return out


def child_command(cfg: BuildConfig, device: str, shard: int, n_shards: int) -> list[str]:
    """The `atcache build-cache` command line of one shard process of a multi-device build."""
    import sys

    cmd = [sys.executable, "-m", "atcache", "build-cache", "--teacher", cfg.teacher, "--data", cfg.data,
           "--out", cfg.out, "--split", cfg.split, "--layers", ",".join(map(str, cfg.layers)),
           "--imgsz", str(cfg.imgsz), "--batch", str(cfg.batch), "--device", device, "--p", str(cfg.p),
           "--kind", cfg.kind, "--workers", str(cfg.workers), "--chunk-rows", str(cfg.chunk_rows),
           "--shard", f"{shard}/{n_shards}", "--resume"]
    if cfg.skip_bad:
        cmd.append("--skip-bad")
    if cfg.repair:
        cmd.append("--repair")
    if cfg.break_locks:
        cmd.append("--break-locks")
    if not cfg.progress or shard > 0:
        cmd.append("--no-progress")
    return cmd


def build_cache_on_devices(cfg: BuildConfig, devices: Sequence[str]) -> list[str]:
    """One shard process per device (e.g. --device 0,1,2,3), all filling the same store; returns their summaries."""
    import subprocess

    if cfg.shard != (0, 1):
        raise AtcacheError("--device with several devices shards the build itself; leave out --shard")
    for d in devices:
        resolve_device(d)
    clear_for_build(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)
    procs = [subprocess.Popen(child_command(cfg, d, i, len(devices)), stdout=subprocess.PIPE, text=True)
             for i, d in enumerate(devices)]
    outputs = [p.communicate()[0].strip() for p in procs]
    failed = [f"device {d} (exit {p.returncode})" for d, p in zip(devices, procs) if p.returncode != 0]
    if failed:
        raise AtcacheError(f"shard process(es) failed on {', '.join(failed)}; see their messages above, fix, and rerun with --resume")
    return [f"device {d}: {out}" for d, out in zip(devices, outputs)]


def run_teacher(cfg: BuildConfig, teacher: Teacher, split: SplitFiles, store: CacheStore, todo: Sequence[int],
                device: torch.device) -> list[tuple[str, str]]:
    """Teacher forward over the rows of row-chunks `todo`, batches never spanning two chunks; returns skipped images."""
    from tqdm import tqdm

    rows = list(iter_rows(todo, store))
    position = {r: i for i, r in enumerate(rows)}
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    dataset = LetterboxedImages(split, rows, cfg.imgsz)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=ChunkBatches(store, todo, cfg.batch, position), num_workers=cfg.workers,
        pin_memory=cuda, persistent_workers=False, prefetch_factor=4 if cfg.workers > 0 else None,
    )
    writer = ChunkWriter(store)
    skipped: list[tuple[str, str]] = []
    layers = cfg.layers
    chunk_iter = iter(todo)
    assembler = ChunkAssembler(store, next(chunk_iter))
    bar = tqdm(total=len(rows), desc=f"build-cache {Path(cfg.out).name}", unit="img", disable=not cfg.progress,
               dynamic_ncols=True)
    try:
        with torch.no_grad(), FeatureHooks(teacher.model, layers, stop_after_last=True) as hooks:
            for batch_rows, images, letterbox, errors in loader:
                ok = np.array([not e for e in errors], dtype=bool)
                for r, e in zip(batch_rows.tolist(), errors):
                    if e:
                        if not cfg.skip_bad:
                            raise AtcacheError(e)
                        skipped.append((split.files[r], e))
                x = images.to(device, non_blocking=True).float().div_(255.0)
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=cuda):
                    feats = hooks.run(teacher.model, x)
                maps, norms = {}, {}
                for index, fm in zip(layers, feats):
                    with torch.autocast(device_type=device.type, enabled=False):
                        a, n = attention_with_norm(fm, cfg.p, cfg.kind)
                    a[~torch.as_tensor(ok, device=a.device)] = float("nan")
                    n[~torch.as_tensor(ok, device=n.device)] = float("nan")
                    maps[index] = a.to(torch.float16).cpu().numpy()
                    norms[index] = n.cpu().numpy()
                if assembler.add(batch_rows.numpy(), maps, norms, letterbox.numpy(), ok):
                    writer.put(assembler.k, assembler.data())
                    nxt = next(chunk_iter, None)
                    assembler = ChunkAssembler(store, nxt) if nxt is not None else None
                bar.update(len(batch_rows))
    finally:
        bar.close()
        writer.close()
    return skipped
