"""`atcache bench`: the three trainers, the build against pure teacher inference, the loader's target throughput and
the storage precision, measured side by side in one run on one device, with the ratios the product promises."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from atcache.teacher.pipeline import build_cache
from atcache.config import BuildConfig, DistillSettings
from atcache.data.splits import LetterboxedImages, SplitFiles, split_files
from atcache.devices import parse_devices, resolve_device
from atcache.errors import AtcacheError
from atcache.tools import plans
from atcache.tools.bench_report import (  # noqa: F401  (format_report: the CLI imports it from here)
    GRADIENT_MODES, GRADIENT_RATIOS, TRAINER_MODES, TRAINERS, over_rounds, format_report, goals, loader_figures,
    round_ratios)
from atcache.tools.measure import device_name
from atcache.settings import BenchConfig

MIN_STEPS = 16  # measured steps per trainer and round below which the bench warns


def _step_intervals(images: int, batch: int) -> int:
    """Step intervals inside one epoch of `images` at `batch` (the interval across an epoch end is not counted)."""
    return math.ceil(images / batch) - 1


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
    """Measure everything, write the JSON report into OUT/bench.json, and return it."""
    if len(parse_devices(cfg.device)) > 1:
        raise AtcacheError(f"--device {cfg.device}: bench measures one device; pass one (0, 1, ... or cpu)")
    if cfg.steps < 1 or cfg.warmup < 0 or cfg.repeats < 1 or cfg.rounds < 1:
        raise AtcacheError("--steps, --repeats and --rounds must be at least 1, --warmup at least 0")
    _check_epoch_holds_steps(cfg.n_images, cfg)
    warnings = []
    if cfg.steps < MIN_STEPS or cfg.rounds < 3:
        warnings.append(f"{cfg.steps} measured steps x {cfg.rounds} rounds: fewer than {MIN_STEPS} steps or 3 rounds "
                        "give noisy training ratios")
        log(f"bench: warning: {warnings[-1]}")
    for model in (cfg.teacher, cfg.student):
        if model.endswith(".pt") and not Path(model).is_file():
            raise AtcacheError(f"checkpoint {model} does not exist; pass a .pt you have or a model YAML (yolo11m.yaml)")
    t0 = time.perf_counter()
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)

    data_yaml = _bench_dataset(cfg, out, log)
    split = split_files(data_yaml, "train")
    _check_epoch_holds_steps(len(split.files), cfg)
    requested = cfg
    if Path(cfg.teacher).suffix.lower() in (".yaml", ".yml"):
        from atcache.yolo import save_random_teacher

        # ultralytics' stock init leaves every deep map ~eps: same speed, but no precision figure worth reading
        teacher = save_random_teacher(cfg.teacher, out / "bench_teacher.pt", nc=len(split.names), imgsz=cfg.imgsz)
        log(f"bench: {cfg.teacher} -> random teacher with He-normal init (O(1) maps) at {teacher}")
        cfg = replace(cfg, teacher=str(teacher))
    log(f"bench: {len(split.files)} training images at imgsz {cfg.imgsz}, batch {cfg.batch}, on {device_name(device)}")
    cache = out / "bench_cache.zarr"
    build = _measure_build(cfg, data_yaml, split, cache, device, log)
    storage = _measure_storage(cfg, split, cache, device)
    replay_cache = out / "bench_replay.zarr"
    replay = _measure_replay_build(cfg, data_yaml, split, replay_cache, build, device, log)
    gradient = None
    if cfg.gradient:  # the replay cache of the grad trainer holds J_T of every view
        gradient = _measure_gradient_builds(cfg, data_yaml, build, replay, out / "bench_replay_grad.zarr", log)
        replay_cache = out / "bench_replay_grad.zarr"
    train = _measure_trainers(cfg, data_yaml, split, cache, replay_cache, log)
    loader = loader_figures(train)
    spread = {name: {"min": min(v), "max": max(v)} for name, v in (
        ("cache_over_plain", round_ratios(train, "cache", "plain")),
        ("cache_over_online", round_ratios(train, "cache", "online")),
        ("replay_over_plain", round_ratios(train, "replay", "plain")))}
    ratios = {
        "cache_over_plain": train["cache"]["img_per_s"] / train["plain"]["img_per_s"],
        "cache_over_online": train["cache"]["img_per_s"] / train["online"]["img_per_s"],
        "mem_cache_over_plain": train["cache"]["peak_mem_gb"] / train["plain"]["peak_mem_gb"],
        "mem_online_over_plain": train["online"]["peak_mem_gb"] / train["plain"]["peak_mem_gb"],
        "build_over_inference": build["build_img_per_s"] / build["inference_img_per_s"],
        "loader_targets_over_training_need": loader.get("targets_over_training_need"),
        "replay_over_plain": train["replay"]["img_per_s"] / train["plain"]["img_per_s"],
        "replay_build_over_floor": replay["replay_build_img_per_s"] / replay["floor_img_per_s"],
    }
    if gradient is not None:
        ratios |= {name: train[a]["img_per_s"] / train[b]["img_per_s"] for name, (a, b) in GRADIENT_RATIOS.items()}
        ratios["gradient_build_over_build"] = gradient["build_img_per_s"] / build["build_img_per_s"]
        ratios["gradient_replay_build_over_replay_build"] = (gradient["replay_build_img_per_s"]
                                                             / replay["replay_build_img_per_s"])
        spread |= {name: {"min": min(v), "max": max(v)} for name, v in
                   ((n, round_ratios(train, a, b)) for n, (a, b) in GRADIENT_RATIOS.items())}
    report = {
        "device": device_name(device),
        "versions": _versions(),
        "config": asdict(requested),
        "teacher_used": cfg.teacher,
        "ratios": ratios,
        "ratio_spread_over_rounds": spread,
        "goals": goals(ratios, requested, device),
        "warnings": warnings,
        "train": train,
        "build": build,
        "replay_build": replay,
        "gradient": gradient,
        "loader": loader,
        "storage": storage,
        "seconds": time.perf_counter() - t0,
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _check_epoch_holds_steps(images: int, cfg: BenchConfig) -> None:
    """Trainers are measured inside their first epoch: refuse data too small for warmup + steps step intervals."""
    per_epoch = _step_intervals(images, cfg.batch)
    if per_epoch < cfg.warmup + cfg.steps:
        raise AtcacheError(
            f"{images} training images at batch {cfg.batch} give {per_epoch} step intervals per epoch, fewer than "
            f"--warmup {cfg.warmup} + --steps {cfg.steps}; trainers are measured inside one epoch: use --images "
            f"{cfg.images_needed} or more (0: that many), or fewer --steps")


# ---------------------------------------------------------------------------------------------------------- data
def _bench_dataset(cfg: BenchConfig, out: Path, log) -> Path:
    """The first N training images (and a few validation images) of --data, or of generated synthetic data, linked
    into OUT/data with their labels: the user's dataset folder is never written to (no label cache rewritten)."""
    source = Path(cfg.data) if cfg.data else None
    if source is None:
        from atcache.data.synthetic import make_demo_data
        from atcache.data.voc import prepare_voc

        count = math.ceil(cfg.n_images / 0.75) + 8  # the synthetic train split holds ~78% of the images
        log(f"bench: generating {count} synthetic VOC-format images")
        devkit = make_demo_data(out / "synthetic", images=count, size=500, seed=0, progress=False)
        source = prepare_voc(devkit, out / "synthetic" / "VOC", progress=False)
    elif not source.is_file():
        raise AtcacheError(f"data YAML {source} does not exist; pass the YAML written by `atcache prepare-voc` or your own")
    train, val = split_files(source, "train"), split_files(source, "val")
    target = out / "data"
    if target.exists():
        shutil.rmtree(target)
    _link_subset(train, range(min(cfg.n_images, len(train.files))), target, "train")
    _link_subset(val, range(min(2 * cfg.batch, len(val.files))), target, "val")
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(train.names))
    yaml = target / "bench.yaml"
    yaml.write_text(f"path: {target}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return yaml


def _link_subset(split: SplitFiles, rows, target: Path, name: str) -> None:
    from atcache.yolo import img2label_paths

    for row in rows:
        image = split.absolute(row)
        label = Path(img2label_paths([str(image)])[0])
        flat = split.files[row].replace("/", "__")  # unique inside one folder, whatever the source layout
        for source, dest in ((image, target / "images" / name / flat), (label, target / "labels" / name / Path(flat).with_suffix(".txt"))):
            if not source.is_file():
                continue  # an image without a label file is a background image for ultralytics too
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, dest)
            except OSError:
                shutil.copy2(source, dest)


# --------------------------------------------------------------------------------------------------------- build
def _forward_seconds(model, images, device: torch.device) -> float:
    """Seconds for a floor: the batches of uint8 images `images` yields, each through the teacher's full forward."""
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in images:
            x = batch.to(device, non_blocking=True).float().div_(255)
            with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
                model(x)
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _inference_pass(model, split: SplitFiles, cfg: BenchConfig, device: torch.device) -> float:
    """Seconds for the floor: the same decoding and letterboxing as the build, then the teacher's full forward."""
    workers = _build_workers(cfg)
    loader = torch.utils.data.DataLoader(
        LetterboxedImages(split, range(len(split.files)), cfg.imgsz), batch_size=cfg.batch, num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    return _forward_seconds(model, (images for _, images, _, _ in loader), device)


def _measure_build(cfg: BenchConfig, data_yaml: Path, split: SplitFiles, cache: Path, device: torch.device, log) -> dict:
    """build-cache img/s against the teacher's pure inference on the same batches, alternating, medians of repeats."""
    from atcache.yolo import load_model

    teacher = load_model(cfg.teacher, nc=len(split.names), device=device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as build-cache sets it
    n = len(split.files)
    _inference_pass(teacher.model, split, cfg, device)  # warm-up: page cache, cudnn autotuning, workers
    inference, build = [], []
    for r in range(cfg.repeats):
        inference.append(n / _inference_pass(teacher.model, split, cfg, device))
        report = build_cache(BuildConfig(
            teacher=cfg.teacher, data=str(data_yaml), out=str(cache), layers=cfg.layers, imgsz=cfg.imgsz,
            batch=cfg.batch, device=cfg.device, workers=_build_workers(cfg), overwrite=True, progress=False))
        build.append(report.computed / report.loop_seconds)
        log(f"bench: build {build[-1]:.1f} img/s vs teacher inference {inference[-1]:.1f} img/s (repeat {r + 1}/{cfg.repeats})")
    del teacher
    return {
        "images": n, "batch": cfg.batch, "workers": _build_workers(cfg), "repeats": cfg.repeats,
        "inference_img_per_s": statistics.median(inference), "build_img_per_s": statistics.median(build),
        "inference_img_per_s_runs": inference, "build_img_per_s_runs": build,
        "store_bytes": report.store_bytes, "bytes_per_image": report.bytes_per_image,
        "warnings": report.warnings,
    }


def _build_workers(cfg: BenchConfig) -> int:
    return max(0, min(cfg.workers, os.cpu_count() or 1))


# ------------------------------------------------------------------------------------------------------- storage
def _measure_storage(cfg: BenchConfig, split: SplitFiles, cache: Path, device: torch.device, rows: int = 64) -> dict:
    """Bytes per image, and the stored float16 maps against the same teacher run in float32 (cosine, max abs)."""
    from atcache.attention.agreement import map_agreement
    from atcache.attention.recipe import layer_maps
    from atcache.cache.store import CacheStore
    from atcache.yolo import load_model

    store = CacheStore.open(cache)
    spec = store.spec
    teacher = load_model(cfg.teacher, nc=len(split.names), device=device).model.float()
    n = min(rows, store.n_rows)
    loader = torch.utils.data.DataLoader(LetterboxedImages(split, range(n), cfg.imgsz), batch_size=cfg.batch)
    cosines = {i: [] for i in cfg.layers}
    max_abs = dict.fromkeys(cfg.layers, 0.0)
    for batch_rows, images, _, _ in loader:
        exact_maps, _ = layer_maps(teacher, images, cfg.layers, spec.p, spec.kind, spec.eps, amp=False)  # float32
        a, b = int(batch_rows[0]), int(batch_rows[-1]) + 1
        for layer, m in zip(cfg.layers, exact_maps):
            exact = m.flatten(1).cpu().numpy()
            stored = store.read_layer(layer, a, b)[0].astype(np.float32).reshape(len(exact), -1)
            cosines[layer] += map_agreement(stored, exact)[0].tolist()
            max_abs[layer] = max(max_abs[layer], float(np.abs(stored - exact).max()))
    raw16 = sum(layer.height * layer.width * 2 for layer in spec.layers)
    return {
        "map_dtype": spec.map_dtype, "rows_compared": n,
        "bytes_per_image": store.nbytes_stored() / store.n_rows,
        "raw_float16_bytes_per_image": raw16, "raw_float32_bytes_per_image": 2 * raw16,
        "cosine_vs_float32": {str(i): {"mean": float(np.mean(c)), "min": float(np.min(c))} for i, c in cosines.items()},
        "max_abs_vs_float32": {str(i): v for i, v in max_abs.items()},
    }


# ------------------------------------------------------------------------------------------------------ training
def _train_epochs(cfg: BenchConfig, split: SplitFiles) -> int:
    """Epochs the measured trainers run: enough for warmup + steps batch intervals inside epochs."""
    per_epoch = max(_step_intervals(len(split.files), cfg.batch), 1)
    return math.ceil((cfg.warmup + cfg.steps) / per_epoch) + 1


def _measure_replay_build(cfg: BenchConfig, data_yaml: Path, split: SplitFiles, cache: Path, build: dict,
                          device: torch.device, log) -> dict:
    """A replay build for the trainers' epochs: its views/s (its loop less the static build's, measured before on the
    same images) against the floor, ultralytics' augmented loader plus the teacher's full forward on the same batches."""
    from atcache.train.replay import augment_settings, training_dataset
    from atcache.train.samplers import EpochSampler
    from atcache.yolo import load_model

    epochs = _train_epochs(cfg, split)
    report = build_cache(BuildConfig(
        teacher=cfg.teacher, data=str(data_yaml), out=str(cache), layers=cfg.layers, imgsz=cfg.imgsz,
        batch=cfg.batch, device=cfg.device, workers=_build_workers(cfg), overwrite=True, progress=False,
        replay_epochs=epochs, augment=(("close_mosaic", 0),)))
    static_s = build["images"] / build["build_img_per_s"]
    replay_s = max(report.loop_seconds - static_s, 1e-9)
    dataset, _ = training_dataset(str(data_yaml), augment_settings({"close_mosaic": 0}, epochs, cfg.imgsz), 0)
    workers = _build_workers(cfg)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch, sampler=EpochSampler(len(dataset), encode_epoch=True),
                                         num_workers=workers, collate_fn=dataset.collate_fn,
                                         prefetch_factor=4 if workers else None)
    model = load_model(cfg.teacher, nc=len(split.names), device=device).model
    floor = len(dataset) / _forward_seconds(model, (batch["img"] for batch in loader), device)
    out = {"epochs": epochs, "views": report.replayed, "replay_build_img_per_s": report.replayed / replay_s,
           "floor_img_per_s": floor, "bytes_per_view": (report.store_bytes - build["store_bytes"]) / max(report.replayed, 1)}
    log(f"bench: replay build {out['replay_build_img_per_s']:.1f} views/s vs floor {floor:.1f} img/s "
        f"(augmented loader + teacher forward)")
    return out


def _measure_gradient_builds(cfg: BenchConfig, data_yaml: Path, build: dict, replay: dict, replay_cache: Path,
                             log) -> dict:
    """build-cache --gradient: the static build (median of repeats, as without) and the replay build of the same
    epochs, their img/s and the bytes the gradients add per image and per view."""
    common = dict(teacher=cfg.teacher, data=str(data_yaml), layers=cfg.layers, imgsz=cfg.imgsz, batch=cfg.batch,
                  device=cfg.device, workers=_build_workers(cfg), overwrite=True, progress=False, gradient=True)
    static = []
    for _ in range(cfg.repeats):
        report = build_cache(BuildConfig(out=str(Path(cfg.out).resolve() / "bench_cache_grad.zarr"), **common))
        static.append(report.computed / report.loop_seconds)
    static_bytes = report.store_bytes
    report = build_cache(BuildConfig(out=str(replay_cache), replay_epochs=replay["epochs"],
                                     augment=(("close_mosaic", 0),), **common))
    replay_s = max(report.loop_seconds - build["images"] / statistics.median(static), 1e-9)
    out = {"stride": BuildConfig.gradient_stride, "repeats": cfg.repeats, "build_img_per_s": statistics.median(static),
           "build_img_per_s_runs": static, "bytes_per_image": static_bytes / build["images"],
           "gradient_bytes_per_image": (static_bytes - build["store_bytes"]) / build["images"],
           "replay_build_img_per_s": report.replayed / replay_s,
           "bytes_per_view": (report.store_bytes - static_bytes) / max(report.replayed, 1),
           "gradient_bytes_per_view": (report.store_bytes - static_bytes) / max(report.replayed, 1)
           - replay["bytes_per_view"]}
    log(f"bench: build --gradient {out['build_img_per_s']:.1f} img/s (without: {build['build_img_per_s']:.1f}); "
        f"replay build --gradient {out['replay_build_img_per_s']:.1f} views/s (without: "
        f"{replay['replay_build_img_per_s']:.1f}); gradients add {out['gradient_bytes_per_image'] / 1e3:.1f} KB/image, "
        f"{out['gradient_bytes_per_view'] / 1e3:.1f} KB/view")
    return out


def _measure_trainers(cfg: BenchConfig, data_yaml: Path, split: SplitFiles, cache: Path, replay_cache: Path, log) -> dict:
    """Each trainer for warmup + steps batches inside one epoch, in a fresh process (same data, student, batch, device),
    interleaved: `rounds` rounds, each in an order rotated by one, so drift and warm-up hit every trainer alike. Per
    trainer: the medians over rounds, the per-round figures and their spread."""
    from atcache.tools.measure import measure_training

    overrides = {
        "model": cfg.student, "data": str(data_yaml), "imgsz": cfg.imgsz, "batch": cfg.batch, "device": cfg.device,
        "workers": cfg.workers, "epochs": _train_epochs(cfg, split),
        "project": str(Path(cfg.out).resolve() / "train"), "exist_ok": True, "plots": False, "val": False,
        "save": False, "close_mosaic": 0, "nbs": cfg.batch,  # nbs=batch: an optimizer step every batch, for all three
        "seed": 0, "deterministic": False,
    }
    plan = trainer_settings(cfg, cache, replay_cache)
    _read_once([split.absolute(i) for i in range(len(split.files))] + [p for c in (cache, replay_cache)
                                                                       for p in Path(c).rglob("*") if p.is_file()])
    runs: dict[str, list[dict]] = {name: [] for name in plan}
    names = tuple(plan)
    for r in range(cfg.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            loader = cfg.loader_samples if r == 0 and name in ("plain", "cache") else 0
            result = measure_training(plan[name], {**overrides, "name": name}, steps=cfg.steps, warmup=cfg.warmup,
                                      loader_samples=loader)
            runs[name].append({**result, "round": r, "position": order.index(name)})
            log(f"bench: round {r + 1}/{cfg.rounds} {name}: {result['img_per_s']:.1f} img/s, peak memory "
                f"{result['peak_mem_gb']:.2f} GB ({result['mem_kind']})")
    return {name: over_rounds(results) for name, results in runs.items()}


def trainer_settings(cfg: BenchConfig, cache: Path, replay_cache: Path) -> dict[str, DistillSettings]:
    """Each trainer's settings, by report name (plain, cache, online, replay; with --gradient also grad, grad_online,
    flip), from the one plan of student modes."""
    sources = plans.Sources(layers=tuple((i, i) for i in cfg.layers), teacher=cfg.teacher, cache=str(cache),
                            replay_cache=str(replay_cache))
    modes = TRAINER_MODES + (GRADIENT_MODES if cfg.gradient else ())
    return {plans.report_name(mode): plans.plan(mode, sources).settings for mode in modes}


def _read_once(paths) -> None:
    """Read every file the trainers will read, so that no trainer pays for a cold page cache (the first one did)."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def _versions() -> dict:
    from importlib.metadata import version

    from atcache.version import __version__

    return {"atcache": __version__, "torch": torch.__version__, "cuda": torch.version.cuda,
            **{name: version(name) for name in ("ultralytics", "zarr", "numcodecs", "dask")}}
