"""Stage 1: run the teacher once over a split and write its per-layer attention maps into the cache store.

One pipeline for every way of running it: check the flags, describe the cache and create (or reopen) the store,
claim this builder's row-chunks, hand the chunks still to compute to a runner (`runners.py`: this process, one process
per device, or a dask cluster), then report."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from atcache.version import __version__
from atcache.attention.functional import EPS, KINDS
from atcache.config import DEFAULT_GRADIENT_STRIDE, BuildConfig
from atcache.data.splits import SplitFiles, split_files
from atcache.devices import parse_devices, resolve_device
from atcache.errors import AtcacheError
from atcache.attention.hooks import probe_layers
from atcache.teacher.runners import RunResult, run_here, run_on_cluster, run_on_devices
from atcache.cache.format import CacheSpec, LayerSpec, Letterbox
from atcache.cache.claims import ChunkClaim, chunks_for_shard
from atcache.cache.integrity import damaged_chunks
from atcache.cache.format import MAP_DTYPES
from atcache.cache.store import CacheStore
from atcache.yolo import LoadedModel, load_model


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
    parts: list[tuple[str, int, float, list]] = field(default_factory=list)  # per device process: rows, s, skipped
    replayed: int = 0  # replay samples (augmented views) computed now
    views: int = 0  # replay samples the store holds when complete (epochs x samples)

    @property
    def img_per_s(self) -> float:
        return (self.computed + self.replayed) / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_image(self) -> float:
        return self.store_bytes / max(self.total_rows, 1)

    def summary(self) -> str:
        repaired = f"repaired {len(self.repaired)} damaged row-chunk(s); " if self.repaired else ""
        replayed = f" and {self.replayed} replayed views" if self.replayed else ""
        return (
            f"{repaired}{self.computed} images{replayed} in {self.seconds:.1f}s ({self.img_per_s:.1f} img/s), "
            f"{self.already_done} already done, {len(self.skipped)} skipped; store {self.out}: "
            f"{self.store_bytes / 1e6:.1f} MB, {self.bytes_per_image / 1e3:.1f} KB/image"
            + (f" ({self.store_bytes / (self.total_rows + self.views) / 1e3:.1f} KB per image or replayed view)"
               if self.views else "")
        )

    def device_lines(self) -> list[str]:
        """One summary per device process of a several-device build (none for the other runners)."""
        return [f"device {d}: " + dataclasses.replace(self, computed=rows, replayed=0, seconds=seconds, already_done=0,
                                                      skipped=skipped, repaired={}).summary()
                for d, rows, seconds, skipped in self.parts]

    def lines(self, repair: bool = False) -> tuple[list[str], list[str]]:
        """What build-cache prints: (notes for stderr: repaired chunks, skipped images, warnings; the summary lines
        for stdout, one per device process of a several-device build). `repair`: --repair was asked for."""
        notes = [f"repaired row-chunk {k} (damaged: {', '.join(arrays)})" for k, arrays in sorted(self.repaired.items())]
        if repair and not self.repaired:
            notes.append("repair: every row-chunk decodes and its finished rows are finite; nothing was damaged")
        notes += [f"skipped {rel}: {why}" for rel, why in self.skipped]
        notes += [f"atcache: warning: {warning}" for warning in self.warnings]
        return notes, self.device_lines() or [self.summary()]


def _make_spec(cfg: BuildConfig, teacher: LoadedModel, split: SplitFiles, device: torch.device) -> CacheSpec:
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
    if cfg.dtype not in MAP_DTYPES:
        raise AtcacheError(f"--dtype {cfg.dtype!r} is unknown; choose one of {', '.join(MAP_DTYPES)}")
    if cfg.gradient and (cfg.gradient_stride < 1 or cfg.imgsz % cfg.gradient_stride):
        raise AtcacheError(f"--gradient-stride {cfg.gradient_stride} does not divide --imgsz {cfg.imgsz}; choose a "
                           "divisor such as 8 (1 keeps full resolution)")
    if (cfg.gradient_gains or cfg.gradient_stride != DEFAULT_GRADIENT_STRIDE) and not cfg.gradient:
        what = "--gradient-gains sets the loss" if cfg.gradient_gains else "--gradient-stride sets the resolution"
        raise AtcacheError(f"{what} of the stored gradients; add --gradient")
    shapes = probe_layers(teacher.model, cfg.layers, cfg.imgsz, device)
    layers = []
    for index, (c, h, w) in zip(cfg.layers, shapes):
        if cfg.imgsz % h or cfg.imgsz // h != cfg.imgsz // w:
            raise AtcacheError(f"layer {index} maps {cfg.imgsz}px to {h}x{w}, not an integer stride; choose another layer")
        layers.append(LayerSpec(index=index, stride=cfg.imgsz // h, channels=c, height=h, width=w))
    from atcache.yolo import ultralytics_version

    return CacheSpec(
        layers=tuple(layers), imgsz=cfg.imgsz, p=float(cfg.p), kind=cfg.kind, eps=EPS,
        teacher_sha256=teacher.file_sha256, teacher_weights_sha256=teacher.weights_sha256, teacher_name=teacher.name,
        split=cfg.split, dataset_fingerprint=split.fingerprint(), n_rows=len(split.files), chunk_rows=cfg.chunk_rows,
        map_dtype=cfg.dtype,
        letterbox=Letterbox(), teacher_path=teacher.path, data_yaml=split.data_yaml,
        atcache_version=__version__, ultralytics_version=ultralytics_version(), torch_version=torch.__version__,
        replay=_replay_spec(cfg) if cfg.replay_epochs else None,
        gradient_stride=cfg.gradient_stride if cfg.gradient else 0,
        gradient_gains=_gradient_gains(cfg) if cfg.gradient else None,
    )


def _gradient_gains(cfg: BuildConfig) -> dict:
    from atcache.teacher.gradients import loss_gains

    return loss_gains(cfg.gradient_gains)


def _replay_spec(cfg: BuildConfig):
    from atcache.teacher.replay import replay_spec

    return replay_spec(cfg, cfg.imgsz)


def build_cache(cfg: BuildConfig) -> BuildReport:
    """Compute the rows of this builder's row-chunks that are not done yet and write them chunk by chunk."""
    t0 = time.perf_counter()
    devices = _check_flags(cfg)
    split = split_files(cfg.data, cfg.split)
    here = not cfg.scheduler and len(devices) == 1
    device = resolve_device(devices[0]) if here else torch.device("cpu")  # elsewhere: the spec only needs shapes
    teacher = load_model(cfg.teacher, nc=len(split.names), device=device)
    store = _open_store(cfg, teacher, split, device, join=cfg.shard[1] > 1)
    if not here:
        del teacher
    owned = chunks_for_shard(store.n_units, *cfg.shard)
    with _claim_chunks(store, owned, cfg) as (todo, repaired):
        already = store.unit_rows(sorted(set(owned) - set(todo)))[0]
        t_loop = time.perf_counter()
        result = RunResult()
        if todo and here:
            result = run_here(cfg, store, todo, teacher, split, device)
        elif todo and cfg.scheduler:
            result = run_on_cluster(cfg, store, todo)
        elif todo:
            result = run_on_devices(cfg, store, todo, devices)
        loop_seconds = time.perf_counter() - t_loop
        # done now, whichever process (or attempt of a retried task) wrote them
        done, replay_done = store.done_mask(), store.replay_done() if store.spec.replay else None
        computed = int(sum(done[slice(*store.chunk_range(k))].sum() for k in todo if k < store.n_chunks))
        replayed = int(sum(replay_done[e, a:b].sum() for e, a, b in
                           (store.replay_unit(u) for u in todo if u >= store.n_chunks)))
        if done.all() and (replay_done is None or replay_done.all()):  # complete: nobody writes a chunk of it, so
            store.sweep_partial_writes()  # what killed writers left can go
    return BuildReport(
        out=str(cfg.out), computed=computed, already_done=already, total_rows=store.n_rows,
        seconds=time.perf_counter() - t0, loop_seconds=loop_seconds, store_bytes=store.nbytes_stored(),
        skipped=result.skipped, warnings=vanishing_layers(store), repaired=repaired, parts=result.parts,
        replayed=replayed, views=store.spec.replay.epochs * store.spec.replay.samples if store.spec.replay else 0,
    )


def _check_flags(cfg: BuildConfig) -> list[str]:
    """Refuse flag combinations that cannot work, before anything is loaded; returns the devices to build on."""
    from atcache.scheduler import parse_scheduler

    if cfg.overwrite and cfg.shard[1] > 1:
        raise AtcacheError("--overwrite cannot be combined with --shard (shards share one store); delete the store once, then start the shards")
    if cfg.repair and not cfg.resume:
        raise AtcacheError("--repair works on an existing store: pass --resume --repair")
    if cfg.repair and cfg.overwrite:
        raise AtcacheError("--repair keeps the store and --overwrite deletes it; pass one of them")
    if cfg.replay_epochs < 0:
        raise AtcacheError(f"--replay-epochs {cfg.replay_epochs} must be 0 (no replay arrays) or more")
    if not cfg.replay_epochs and (cfg.augment or cfg.aug_seed):
        raise AtcacheError("--aug-seed and augmentation key=value shape the replay arrays; add --replay-epochs E")
    devices = parse_devices(cfg.device) or ["cpu"]
    if cfg.scheduler:
        if cfg.shard != (0, 1):
            raise AtcacheError("--scheduler splits the build over the cluster itself; leave out --shard")
        parse_scheduler(cfg.scheduler)
    elif len(devices) > 1:
        if cfg.shard != (0, 1):
            raise AtcacheError("--device with several devices shards the build itself; leave out --shard")
        for d in devices:
            resolve_device(d)
    return devices


def _open_store(cfg: BuildConfig, teacher: LoadedModel, split: SplitFiles, device: torch.device, join: bool) -> CacheStore:
    """Describe the cache and create the store, or reopen it (resume / a sibling shard) after checking it matches."""
    spec = _make_spec(cfg, teacher, split, device).stamped()
    return CacheStore.open_or_create(cfg.out, spec, split.files, resume=cfg.resume, overwrite=cfg.overwrite,
                                     join=join, repair=cfg.repair)


@contextlib.contextmanager
def _claim_chunks(store: CacheStore, owned: Sequence[int], cfg: BuildConfig):
    """Own the row-chunks this builder will compute (refused if a live builder holds any), repair damaged ones with
    --repair, and yield (the chunks still to compute, {repaired chunk: arrays})."""
    owned = list(owned)
    complete = store.complete_units()
    candidates = owned if cfg.repair else [k for k in owned if not complete[k]]
    if not candidates:
        yield [], {}
        return
    with ChunkClaim(store, candidates, break_locks=cfg.break_locks):
        repaired = damaged_chunks(store, [k for k in candidates if k < store.n_chunks]) if cfg.repair else {}
        if repaired:
            store.mark_not_done(repaired)
            complete = store.complete_units()
        yield [k for k in candidates if not complete[k]], repaired


def vanishing_layers(store: CacheStore, floor: float = 1e3 * EPS) -> list[str]:
    """Layers whose ||a|| is so small that eps dominates A (maps ~0): the mark of an untrained teacher. Judged on the
    first row-chunks (about 1,000 rows), so the check costs the same at any size."""
    out, rows = [], min(store.n_rows, -(-1000 // store.spec.chunk_rows) * store.spec.chunk_rows)
    for layer in store.spec.layers:
        norms = store.read(f"norms/{layer.index}", 0, rows)
        median = float(np.nanmedian(norms)) if np.isfinite(norms).any() else float("nan")
        if median < floor:
            out.append(
                f"layer {layer.index}: median ||a|| = {median:.1e} is near eps={EPS:g}, so its maps are ~0 "
                "(an untrained teacher?); train the teacher first for useful targets"
            )
    return out
