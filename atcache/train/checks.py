"""Stage 2's settings checks, made once when the trainer is made: does the cache fit this run (format, layers, imgsz,
dataset, completeness, RAM budget or streaming), and the settings replay targets take from the cache.
No ultralytics import.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from atcache.attention.functional import EPS
from atcache.config import TRAIN_MODES, DistillSettings, check_replay, check_targets
from atcache.data.splits import SplitFiles, split_files
from atcache.devices import ranks_on_this_node
from atcache.errors import AtcacheError
from atcache.cache.format import CacheSpec
from atcache.cache.store import CacheStore
from atcache.train.gradients import check_gradient_cache, check_gradient_mode
from atcache.train.targets import join_rows


# ---------------------------------------------------------------------- does the cache fit this run
def default_ram_budget_gb() -> float:
    """Half of this machine's physical memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 / 2
    except (ValueError, OSError, AttributeError):
        return 8.0


def ram_need_gb(spec: CacheSpec, layers: Sequence[int]) -> float:
    """GiB the maps of `layers` take in RAM when the whole cache is loaded, as stored (float16: 2 bytes a cell; uint8:
    1, plus a float32 scale per map)."""
    uint8 = spec.map_dtype == "uint8"
    per_row = sum(spec.layer(i).height * spec.layer(i).width * (1 if uint8 else 2) + (4 if uint8 else 0) for i in layers)
    return spec.n_rows * per_row / 2**30


def streams(need_gb: float, ram_budget_gb: float | None, stream: bool | None) -> bool:
    """Whether training streams the cache from disk: forced by --stream/--no-stream, else when it exceeds the budget."""
    budget = default_ram_budget_gb() if ram_budget_gb is None else ram_budget_gb
    return need_gb > budget if stream is None else stream


def check_cache(path: str | Path, layers: Sequence[int], imgsz: int, split: SplitFiles,
                ram_budget_gb: float | None = None, stream: bool | None = None, ranks: int = 1,
                store: CacheStore | None = None) -> CacheSpec:
    """Refuse, in one line each, a cache that does not fit this run: format, layers, imgsz, dataset, completeness, RAM
    (an in-RAM cache is held once per training process on this machine: `ranks` copies under DDP). `store`: the cache
    at `path` already opened."""
    store = store or CacheStore.open(path)  # opening checks the format version
    spec = store.spec
    missing = [i for i in layers if i not in spec.layer_indices]
    if missing:
        raise AtcacheError(
            f"layer {missing[0]} is not in cache {path} (it holds layers {list(spec.layer_indices)}); "
            "choose --layers among them or rebuild the cache with the layers you need"
        )
    if spec.imgsz != imgsz:
        raise AtcacheError(
            f"cache {path} was built at imgsz {spec.imgsz} but this run trains at imgsz {imgsz}; "
            f"train with --imgsz {spec.imgsz} or rebuild the cache with build-cache --imgsz {imgsz}"
        )
    cached = store.files()
    if spec.dataset_fingerprint != split.fingerprint():
        added, removed = len(set(split.files) - set(cached)), len(set(cached) - set(split.files))
        what = f"{added} images added, {removed} removed" if added or removed else "image files were edited or replaced"
        raise AtcacheError(
            f"the training split of {split.data_yaml} differs from the one cached in {path} ({what}); "
            "rebuild the cache on this data with `atcache build-cache --overwrite`"
        )
    join_rows(cached, store.done_mask(), split.files)
    need = ram_need_gb(spec, layers) * max(1, ranks)
    budget = default_ram_budget_gb() if ram_budget_gb is None else ram_budget_gb
    if need > budget and not streams(need, budget, stream):
        copies = f" ({ranks} DDP processes on this machine, a copy each)" if ranks > 1 else ""
        raise AtcacheError(
            f"cache {path} needs {need:.2f} GiB of RAM for layers {list(layers)}{copies}, more than --ram-budget "
            f"{budget:.2f} GiB, and --no-stream keeps it in RAM; raise --ram-budget or drop --no-stream to stream it "
            "from disk chunk by chunk"
        )
    return spec


@dataclass(frozen=True)
class RunPlan:
    """What the one settings check found: the AT map's (p, kind, eps) and, in cache mode, the opened store and whether
    its targets are streamed from disk."""

    p: float
    kind: str
    eps: float
    store: CacheStore | None = None
    streaming: bool = False


def check_settings(s: DistillSettings, imgsz: int, data: str, rect: bool = False, device: str | None = None,
                    store: CacheStore | None = None) -> RunPlan:
    """Refuse settings that cannot work before anything is built (each split is listed once, the store opened once)."""
    if s.mode not in TRAIN_MODES:
        raise AtcacheError(f"unknown training mode {s.mode!r}; choose one of {', '.join(TRAIN_MODES)}")
    check_gradient_mode(s)
    train_split = split_files(data, "train")  # an empty or missing split is one line here, not ultralytics' traceback
    split_files(data, "val")
    if s.mode == "plain":
        return RunPlan(s.p, s.kind, EPS)
    if not s.layers:
        raise AtcacheError("attention transfer needs at least one layer (--layers)")
    if s.mode == "online":
        if Path(s.teacher).suffix.lower() not in (".yaml", ".yml") and not Path(s.teacher).is_file():
            raise AtcacheError(f"teacher {s.teacher} does not exist; pass the path of your trained checkpoint (.pt)")
        return RunPlan(s.p, s.kind, EPS)
    check_targets(s.targets, rect)
    if s.shuffle_window < 1:
        raise AtcacheError(f"--shuffle-window {s.shuffle_window} must be at least 1 (chunks shuffled together)")
    store = store or CacheStore.open(s.cache)
    ranks = ranks_on_this_node(device)
    if s.targets == "replay":  # read chunk by chunk in training order, never loaded whole
        spec = check_cache(s.cache, s.source_layers, imgsz, train_split, stream=True, store=store)
        check_gradient_cache(s, store, streaming=False)
        return RunPlan(spec.p, spec.kind, spec.eps, store, streaming=False)
    spec = check_cache(s.cache, s.source_layers, imgsz, train_split, s.ram_budget_gb, s.stream, ranks, store)
    streaming = _streams(spec, s, ranks)
    check_gradient_cache(s, store, streaming)
    return RunPlan(spec.p, spec.kind, spec.eps, store, streaming)


def cache_streams(s: DistillSettings, device: str | None = None) -> bool:
    """Whether a cache run reads its targets from disk chunk by chunk instead of loading them into RAM (every DDP
    process on this machine would hold its own copy)."""
    return s.mode == "cache" and _streams(CacheStore.open(s.cache).spec, s, ranks_on_this_node(device))


def _streams(spec: CacheSpec, s: DistillSettings, ranks: int) -> bool:
    return streams(ram_need_gb(spec, s.source_layers) * ranks, s.ram_budget_gb, s.stream)


def replay_overrides(s: DistillSettings, overrides: dict | None, store: CacheStore) -> tuple[dict, DistillSettings]:
    """--targets replay: the augmentation settings, epochs and aug-seed the cache's replay arrays were made with, for
    every one the run does not give; a given one that differs is refused in one line naming it."""
    replay = store.spec.replay
    settings = check_replay(s.cache, replay, dict(overrides or {}), instead="train with --targets warp or static")
    if replay.augment["epochs"] > replay.epochs:
        raise AtcacheError(f"cache {s.cache} holds replay arrays for {replay.epochs} of {replay.augment['epochs']} "
                           f"epochs; rebuild it with --replay-epochs {replay.augment['epochs']} to train them all")
    if s.aug_seed is not None and s.aug_seed != replay.aug_seed:
        raise AtcacheError(f"--aug-seed {s.aug_seed} differs from the replay arrays of cache {s.cache}, built with "
                           f"--aug-seed {replay.aug_seed}; leave it out or rebuild with --aug-seed {s.aug_seed}")
    return settings, dataclasses.replace(s, aug_seed=replay.aug_seed)
