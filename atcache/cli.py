"""The `atcache` command line: a thin typer layer that parses options and calls the stage modules."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from atcache.config import DEFAULT_AT_WEIGHT, DEFAULT_LAYERS, parse_layers, parse_shard
from atcache.yolo import prepare
from atcache.errors import AtcacheError
from atcache.tools.study import STUDY_MODES

app = typer.Typer(
    name="atcache",
    help="Attention-transfer distillation for YOLO with the teacher run once: cached attention maps in Zarr.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _friendly(fn):
    """Run a command; an AtcacheError or OSError (or Ctrl-C) becomes one line on stderr and exit code 2 (130), no
    traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AtcacheError as e:
            typer.echo(f"atcache: error: {e}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("atcache: interrupted; finished chunks are kept, rerun with --resume to continue", err=True)
            raise typer.Exit(130)
        except OSError as e:  # disk full, permission denied, ... outside the paths that explain themselves
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            typer.echo(f"atcache: error: {e.strerror or e}{where}; fix the file system problem and rerun "
                       "(a build keeps its finished chunks: add --resume)", err=True)
            raise typer.Exit(2)

    return wrapper


LAYERS_TEXT = ",".join(map(str, DEFAULT_LAYERS))


@app.command("make-demo-data")
@_friendly
def make_demo_data_cmd(
    out: Annotated[Path, typer.Option(help="Folder that receives VOCdevkit/.")] = Path("data/demo"),
    images: Annotated[int, typer.Option(help="Number of images over all VOC years and sets.")] = 400,
    size: Annotated[int, typer.Option(help="Long side of the images in pixels (varies down to 0.75x).")] = 160,
    seed: Annotated[int, typer.Option(help="Seed; the same arguments write the same files.")] = 0,
):
    """Write a deterministic synthetic dataset in real VOCdevkit format (20 VOC classes, XML annotations)."""
    from atcache.data.synthetic import make_demo_data

    if images < 5 or size < 16:
        raise AtcacheError("--images must be at least 5 and --size at least 16")
    devkit = make_demo_data(out, images=images, size=size, seed=seed)
    typer.echo(f"wrote {images} images to {devkit}; next: atcache prepare-voc --devkit {devkit} --out {Path(out) / 'VOC'}")


@app.command("prepare-voc")
@_friendly
def prepare_voc_cmd(
    devkit: Annotated[Path, typer.Option(help="Your VOCdevkit folder (with VOC2007/ and/or VOC2012/).")],
    out: Annotated[Path, typer.Option(help="Output dataset root: images/, labels/ and VOC.yaml are written here.")],
):
    """Convert a local VOCdevkit into ultralytics' VOC layout (offline, idempotent) and write its data YAML."""
    prepare()
    from atcache.data.voc import prepare_voc

    data_yaml = prepare_voc(devkit, out)
    typer.echo(f"dataset ready: {data_yaml}")


@app.command("build-cache", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_friendly
def build_cache_cmd(
    ctx: typer.Context,
    teacher: Annotated[str, typer.Option(help="Teacher: a trained ultralytics checkpoint .pt, or a model YAML (random init).")],
    data: Annotated[Path, typer.Option(help="Ultralytics detection data YAML.")],
    out: Annotated[str, typer.Option(help="Cache store to write: a Zarr v3 folder (voc_m.zarr) or an fsspec URL (s3://bucket/voc_m.zarr).")],
    split: Annotated[str, typer.Option(help="Split of the data YAML to cache.")] = "train",
    layers: Annotated[str, typer.Option(help="Teacher layer indices (model.model[i]) to cache.")] = LAYERS_TEXT,
    imgsz: Annotated[int, typer.Option(help="Training image size (multiple of the max stride).")] = 640,
    batch: Annotated[int, typer.Option(help="Images per teacher forward pass.")] = 64,
    device: Annotated[str, typer.Option(help="cpu, a CUDA index, or several (0,1,2,3): one shard process per device.")] = "0",
    p: Annotated[float, typer.Option(help="Exponent p of the attention map sum_c |F_c|^p.")] = 2.0,
    kind: Annotated[str, typer.Option(help="Attention map: sum_p (paper/seed), sum, or max_p.")] = "sum_p",
    workers: Annotated[int, typer.Option(help="DataLoader workers decoding images (default: min(4, CPU cores)).")] = -1,
    chunk_rows: Annotated[int, typer.Option(help="Rows per Zarr chunk: the unit of writing, resuming and sharding.")] = 256,
    resume: Annotated[bool, typer.Option(help="Finish an interrupted build of the same settings.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Delete an existing store at --out and rebuild it.")] = False,
    shard: Annotated[str, typer.Option(help="i/n: this process fills the i-th of n disjoint chunk ranges.")] = "0/1",
    skip_bad: Annotated[bool, typer.Option(help="Leave rows of unreadable images empty instead of stopping.")] = False,
    repair: Annotated[bool, typer.Option(help="With --resume: recompute the row-chunks whose stored data fails to decode (corrupted chunks).")] = False,
    scheduler: Annotated[Optional[str], typer.Option(help="Build on dask.distributed: local:N worker processes here, or a scheduler address tcp://host:8786.")] = None,
    break_locks: Annotated[bool, typer.Option(help="Take over row-chunks claimed by another builder that is known to be dead.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    replay_epochs: Annotated[int, typer.Option(help="Also store the teacher's maps on every augmented view of this many epochs of seeded training (train-from-cache --targets replay).")] = 0,
    aug_seed: Annotated[int, typer.Option(help="The replay's augmentation seed (train with the same --aug-seed, or let training take it from the cache).")] = 0,
    dtype: Annotated[str, typer.Option(help="Stored maps: float16, or uint8 (square-root domain with a scale per map: about half the bytes, cosine >= 0.9999).")] = "float16",
):
    """Run the teacher once over a split and write per-layer attention maps into a chunked Zarr v3 store. With
    --replay-epochs, extra key=value (mosaic=, mixup=, scale=, fliplr=, hsv_h=, close_mosaic=, epochs=, ...) set the
    ultralytics augmentation the replay arrays are made with."""
    prepare()
    from atcache.build.pipeline import build_cache
    from atcache.config import BuildConfig

    remote_workers = bool(scheduler) and not scheduler.strip().startswith("local")
    if not remote_workers:
        device = _default_device(device, "building")
    if workers < 0:
        import os

        workers = min(4, os.cpu_count() or 1)
    cfg = BuildConfig(
        teacher=teacher, data=str(data), out=str(out), split=split, layers=parse_layers(layers), imgsz=imgsz,
        batch=batch, device=device, p=p, kind=kind, workers=workers, resume=resume, overwrite=overwrite,
        shard=parse_shard(shard), chunk_rows=chunk_rows, skip_bad=skip_bad, progress=progress, repair=repair,
        break_locks=break_locks, scheduler=scheduler or "", replay_epochs=replay_epochs, aug_seed=aug_seed, dtype=dtype,
        augment=tuple(sorted(_ultralytics_overrides(ctx.args, ("model", "data", "imgsz", "batch", "device")).items())),
    )
    report = build_cache(cfg)
    for k, arrays in sorted(report.repaired.items()):
        typer.echo(f"repaired row-chunk {k} (damaged: {', '.join(arrays)})", err=True)
    if repair and not report.repaired:
        typer.echo("repair: every row-chunk decodes and its finished rows are finite; nothing was damaged", err=True)
    for rel, why in report.skipped:
        typer.echo(f"skipped {rel}: {why}", err=True)
    for warning in report.warnings:
        typer.echo(f"atcache: warning: {warning}", err=True)
    for line in report.device_lines() or [report.summary()]:
        typer.echo(line)


TRAIN_OPTION_KEYS = ("model", "data", "epochs", "imgsz", "batch", "device", "project", "name")
EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def _ultralytics_overrides(extra: list[str], reserved: tuple[str, ...] = TRAIN_OPTION_KEYS) -> dict:
    """`key=value` words after the options -> ultralytics train arguments (checked against its defaults); `reserved`
    keys are atcache options of the command."""
    from atcache.yolo import smart_value
    from atcache.yolo import DEFAULT_CFG_DICT

    out = {}
    for word in extra:
        key, sep, value = word.partition("=")
        key = key.lstrip("-").replace("-", "_")
        if not sep or not key:
            raise AtcacheError(f"unexpected argument {word!r}; extra ultralytics arguments are written key=value (e.g. lr0=0.01)")
        if key in reserved:
            raise AtcacheError(f"{key}= is an atcache option here; use --{'student' if key == 'model' else key}")
        if key not in DEFAULT_CFG_DICT:
            raise AtcacheError(f"{key!r} is not an ultralytics train argument; see `yolo cfg` for the valid ones")
        out[key] = smart_value(value)
    return out


def _train(settings, student: str, data: Path, epochs: int, imgsz: int, batch: int, device: str,
           project: Path, name: str, extra: list[str]) -> None:
    """Shared by train / train-from-cache / train-online: one ultralytics run through AtcacheTrainer."""
    from atcache.train.trainer import train_student

    if Path(student).suffix.lower() == ".pt" and not Path(student).is_file():
        raise AtcacheError(f"student checkpoint {student} does not exist; pass a .pt you have or a model YAML (yolo11s.yaml)")
    if not data.is_file():
        raise AtcacheError(f"data YAML {data} does not exist; pass the YAML written by `atcache prepare-voc` or your own")
    overrides = {"model": student, "data": str(data), **({} if epochs is None else {"epochs": epochs}), "imgsz": imgsz, "batch": batch,
                 "device": _default_device(device, "training"), "project": str(project.resolve()), "name": name,
                 **_ultralytics_overrides(extra)}
    trainer = train_student(settings, overrides)
    typer.echo(f"results: {trainer.csv}")
    typer.echo(f"weights: {trainer.best} (loads with plain ultralytics: YOLO('{trainer.best}'))")


def _default_device(device: str, doing: str) -> str:
    """The default --device 0 on a machine without CUDA becomes the CPU, and says so."""
    from atcache.devices import cuda_fallback

    chosen = cuda_fallback(device)
    if chosen != device:
        typer.echo(f"atcache: no CUDA device found, {doing} on the CPU", err=True)
    return chosen


StudentOpt = Annotated[str, typer.Option(help="Student: a model YAML (yolo11s.yaml, from scratch) or a checkpoint .pt.")]
DataOpt = Annotated[Path, typer.Option(help="Ultralytics detection data YAML (the one the cache was built on).")]
EpochsOpt = Annotated[int, typer.Option(help="Training epochs.")]
ImgszOpt = Annotated[int, typer.Option(help="Training image size (must equal the cache's).")]
BatchOpt = Annotated[int, typer.Option(help="Batch size over all devices.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, a CUDA index, or several (0,1) for DDP.")]
ProjectOpt = Annotated[Path, typer.Option(help="Parent of the run folder (ultralytics' project).")]
AtWeightOpt = Annotated[float, typer.Option(help="Weight of the AT loss added to the detection loss.")]
AugSeedOpt = Annotated[Optional[int], typer.Option(help="Seeded augmentation: each sample's augmentation and each epoch's order a function of (seed, epoch, index) alone, so runs see identical batches.")]


@app.command("train", context_settings=EXTRA_ARGS)
@_friendly
def train_cmd(
    ctx: typer.Context,
    student: StudentOpt,
    data: DataOpt,
    epochs: EpochsOpt = 100,
    imgsz: ImgszOpt = 640,
    batch: BatchOpt = 64,
    device: DeviceOpt = "0",
    project: ProjectOpt = Path("runs/detect"),
    name: Annotated[str, typer.Option(help="Run name (ultralytics adds a number if it exists).")] = "train",
    aug_seed: AugSeedOpt = None,
):
    """Baseline: train the student alone with the same trainer (no distillation). Extra key=value go to ultralytics."""
    prepare()
    from atcache.config import DistillSettings

    _train(DistillSettings(mode="plain", aug_seed=aug_seed), student, data, epochs, imgsz, batch, device, project, name, ctx.args)


@app.command("train-from-cache", context_settings=EXTRA_ARGS)
@_friendly
def train_from_cache_cmd(
    ctx: typer.Context,
    cache: Annotated[str, typer.Option(help="Cache store written by build-cache for this data's train split (a folder or an fsspec URL).")],
    student: StudentOpt,
    data: DataOpt,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs (default 100; with --targets replay the cache's).")] = None,
    imgsz: ImgszOpt = 640,
    batch: BatchOpt = 64,
    device: DeviceOpt = "0",
    at_weight: AtWeightOpt = 1.0,
    targets: Annotated[str, typer.Option(help="warp: align maps with mosaic/affine/flip/mixup; static: no geometric aug, exact maps; replay: the teacher's maps on every augmented view (build-cache --replay-epochs).")] = "warp",
    layers: Annotated[str, typer.Option(help="Layers to distil: 6,8,13 (same index in student and cache) or student:cache pairs 4:6,6:8. Default: all cached layers.")] = "",
    ram_budget: Annotated[Optional[float], typer.Option(help="GiB of RAM the cache may take (default: half of this machine's memory); a larger cache is streamed from disk.")] = None,
    stream: Annotated[Optional[bool], typer.Option("--stream/--no-stream", help="Read the maps from disk chunk by chunk (block-shuffled order) instead of RAM. Default: only when the cache exceeds --ram-budget.")] = None,
    shuffle_window: Annotated[int, typer.Option(help="Streaming: chunks whose samples are shuffled together (more: closer to a full shuffle, more RAM per loader worker).")] = 4,
    project: ProjectOpt = Path("runs/detect"),
    name: Annotated[str, typer.Option(help="Run name (ultralytics adds a number if it exists).")] = "train-from-cache",
    aug_seed: AugSeedOpt = None,
):
    """Train the student with AT targets streamed from the cache; the teacher is never loaded. Extra key=value go to ultralytics."""
    prepare()
    from atcache.config import DistillSettings
    from atcache.cache.store import CacheStore

    pairs = parse_layers(layers, pairs=True) if layers else tuple((i, i) for i in CacheStore.open(cache).spec.layer_indices)
    if epochs is None and targets != "replay":
        epochs = 100
    settings = DistillSettings(mode="cache", cache=str(cache), targets=targets, at_weight=at_weight, layers=pairs,
                               ram_budget_gb=ram_budget, stream=stream, shuffle_window=shuffle_window,
                               aug_seed=aug_seed)
    _train(settings, student, data, epochs, imgsz, batch, device, project, name, ctx.args)


@app.command("train-online", context_settings=EXTRA_ARGS)
@_friendly
def train_online_cmd(
    ctx: typer.Context,
    teacher: Annotated[str, typer.Option(help="Teacher checkpoint .pt, run forward on every augmented batch.")],
    student: StudentOpt,
    data: DataOpt,
    epochs: EpochsOpt = 100,
    imgsz: ImgszOpt = 640,
    batch: BatchOpt = 64,
    device: DeviceOpt = "0",
    at_weight: AtWeightOpt = 1.0,
    layers: Annotated[str, typer.Option(help="Layers: 6,8,13,16,19,22 or student:teacher pairs.")] = LAYERS_TEXT,
    p: Annotated[float, typer.Option(help="Exponent p of the attention map.")] = 2.0,
    kind: Annotated[str, typer.Option(help="Attention map: sum_p, sum or max_p.")] = "sum_p",
    project: ProjectOpt = Path("runs/detect"),
    name: Annotated[str, typer.Option(help="Run name (ultralytics adds a number if it exists).")] = "train-online",
    aug_seed: AugSeedOpt = None,
):
    """Baseline: the seed's online AT (teacher forward every step), same trainer, loss and weight. Extra key=value go to ultralytics."""
    prepare()
    from atcache.config import DistillSettings

    settings = DistillSettings(mode="online", teacher=teacher, at_weight=at_weight, layers=parse_layers(layers, pairs=True),
                               p=p, kind=kind, aug_seed=aug_seed)
    _train(settings, student, data, epochs, imgsz, batch, device, project, name, ctx.args)


@app.command("demo")
@_friendly
def demo_cmd(
    out: Annotated[Path, typer.Option(help="Run folder for data, cache and ultralytics settings.")] = Path("runs/demo"),
    images: Annotated[int, typer.Option(help="Synthetic images to generate.")] = 200,
    imgsz: Annotated[int, typer.Option(help="Image size.")] = 128,
    teacher: Annotated[str, typer.Option(help="Teacher: a model YAML (trained here first) or a ready .pt.")] = "yolo11s.yaml",
    teacher_epochs: Annotated[int, typer.Option(help="Epochs to train a YAML teacher before caching it (0: random init).")] = 20,
    student: Annotated[str, typer.Option(help="Student trained from the cache: a model YAML or a .pt.")] = "yolo11n.yaml",
    student_epochs: Annotated[int, typer.Option(help="Epochs of each student run: plain, from the cache, online (0: stop after the cache).")] = 15,
    device: Annotated[str, typer.Option(help="cpu or a CUDA index.")] = "cpu",
    quick: Annotated[bool, typer.Option(help="Tiny sizes, for tests.")] = False,
):
    """End-to-end on the embedded synthetic data: generate VOC data, convert it, train a teacher briefly, cache it,
    then train the student plain, from the cache and online AT for the same epochs, and print one table."""
    prepare(out / "ultralytics")  # settings and fonts stay inside the run folder
    from atcache.tools.demo import run_demo

    for line in run_demo(out=out, images=images, imgsz=imgsz, teacher=teacher, teacher_epochs=teacher_epochs,
                         device=device, quick=quick, student=student, student_epochs=student_epochs):
        typer.echo(line)


@app.command("study")
@_friendly
def study_cmd(
    out: Annotated[Path, typer.Option(help="Run folder (data, teacher, caches, students, accuracy.json/.md).")] = Path("runs/accuracy"),
    images: Annotated[int, typer.Option(help="Synthetic images to generate (~22% become the validation split).")] = 1600,
    imgsz: Annotated[int, typer.Option(help="Image size of teacher and students.")] = 160,
    teacher: Annotated[str, typer.Option(help="Teacher model YAML, trained here on the whole training split.")] = "yolo11s.yaml",
    teacher_epochs: Annotated[int, typer.Option(help="Teacher epochs (a teacher trained with the same settings in OUT is reused).")] = 15,
    student: Annotated[str, typer.Option(help="Student model YAML.")] = "yolo11n.yaml",
    student_images: Annotated[int, typer.Option(help="Training images the students see (the first N of the split).")] = 300,
    student_epochs: Annotated[int, typer.Option(help="Epochs of every student run.")] = 10,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds (each run's seed and --aug-seed).")] = "0,1,2",
    modes: Annotated[str, typer.Option(help="Comma-separated modes among plain, online, static, warp, replay.")] = ",".join(STUDY_MODES),
    at_weights: Annotated[str, typer.Option(help="Comma-separated --at-weight values; every AT mode runs once per value.")] = str(DEFAULT_AT_WEIGHT),
    layers: Annotated[str, typer.Option(help="Comma-separated layers cached and distilled (student layer = teacher layer).")] = LAYERS_TEXT,
    batch: Annotated[int, typer.Option(help="Batch size.")] = 16,
    device: Annotated[str, typer.Option(help="cpu or a CUDA index.")] = "cpu",
):
    """Seeded accuracy study: students trained plain, online AT and from the cache (static, warp, replay targets) with
    the same data, budget and --aug-seed per seed; mean and std of mAP over seeds on the whole validation split."""
    prepare(out / "ultralytics")
    from atcache.tools.study import StudyConfig, run_study

    unknown = [m for m in modes.split(",") if m not in STUDY_MODES]
    if unknown:
        raise AtcacheError(f"--modes {unknown[0]!r} is unknown; choose among {', '.join(STUDY_MODES)}")
    try:
        config = StudyConfig(images=images, imgsz=imgsz, teacher=teacher, teacher_epochs=teacher_epochs, student=student,
                             student_images=student_images, student_epochs=student_epochs,
                             seeds=tuple(int(x) for x in seeds.split(",")), modes=tuple(modes.split(",")),
                             at_weights=tuple(float(x) for x in at_weights.split(",")), layers=parse_layers(layers),
                             batch=batch, device=device)
    except ValueError as e:
        raise AtcacheError(f"--seeds and --at-weights take comma-separated numbers ({e})") from None
    for line in run_study(config, out):
        typer.echo(line)


@app.command("bench")
@_friendly
def bench_cmd(
    data: Annotated[Optional[Path], typer.Option(help="Data YAML to take the images from (default: synthetic VOC-format data).")] = None,
    teacher: Annotated[str, typer.Option(help="Teacher: a checkpoint .pt or a model YAML (random init).")] = "yolo11m.yaml",
    student: Annotated[str, typer.Option(help="Student: a model YAML or a checkpoint .pt.")] = "yolo11s.yaml",
    layers: Annotated[str, typer.Option(help="Comma-separated teacher layers (student layers of the same index).")] = LAYERS_TEXT,
    imgsz: Annotated[int, typer.Option(help="Image size.")] = 640,
    batch: Annotated[int, typer.Option(help="Batch size (build, inference and training).")] = 64,
    steps: Annotated[int, typer.Option(help="Measured training steps per trainer and round, inside its first epoch (after the warm-up).")] = 30,
    warmup: Annotated[int, typer.Option(help="Training steps run before measuring.")] = 5,
    images: Annotated[int, typer.Option(help="Training images used (0: warmup + steps + 2 batches, so one epoch holds the measured steps).")] = 0,
    workers: Annotated[int, typer.Option(help="DataLoader workers (ultralytics uses none on a CPU).")] = 8,
    repeats: Annotated[int, typer.Option(help="Alternating build / inference passes; medians are reported.")] = 3,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds of the four trainers (rotated order); medians and spread are reported.")] = 3,
    device: Annotated[str, typer.Option(help="One device: a CUDA index or cpu.")] = "0",
    out: Annotated[Path, typer.Option(help="Run folder (data links, cache, training runs, bench.json).")] = Path("runs/bench"),
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the JSON report here.")] = None,
):
    """Measure, in one run on one device: training img/s and peak memory of train / train-from-cache / train-online,
    build-cache vs pure teacher inference, the loader's target throughput, bytes/image and float16 precision."""
    prepare()
    from atcache.tools.bench import BenchConfig, format_report, run_bench

    cfg = BenchConfig(out=str(out), data=str(data or ""), teacher=teacher, student=student, layers=parse_layers(layers),
                      imgsz=imgsz, batch=batch, steps=steps, warmup=warmup, images=images, workers=workers,
                      device=_default_device(device, "training"), repeats=repeats, rounds=rounds)
    report = run_bench(cfg, log=lambda line: typer.echo(line, err=True))
    typer.echo(format_report(report))
    if json_out is not None:
        import json

        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(f"report: {json_out or Path(cfg.out) / 'bench.json'}")


WorkersOpt = Annotated[Optional[int], typer.Option(help="dask threads (default: one per core).")]
SchedulerOpt = Annotated[Optional[str], typer.Option(help="A dask.distributed scheduler address (tcp://host:8786) to compute on.")]


@app.command("inspect")
@_friendly
def inspect_cmd(
    cache: Annotated[str, typer.Argument(help="The cache store (.zarr folder or fsspec URL such as s3://bucket/voc.zarr).")],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the full report (histograms, heatmaps) here.")] = None,
    verify: Annotated[bool, typer.Option(help="Decode every chunk and check its crc32c; exit 1 if any is corrupted.")] = False,
    compare: Annotated[Optional[str], typer.Option(help="Another cache: per-layer cosine and AT distance over common images.")] = None,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
):
    """Statistics of a cache computed with dask, chunk by chunk: rows done, NaN/Inf, norms, value distributions, peak
    heatmap, entropy; optionally an integrity check and a comparison with another cache."""
    import json

    from atcache.cache.inspect import compare_caches, format_inspection, inspect_cache, verify_cache

    corrupted = verify_cache(cache, workers=workers, scheduler=scheduler) if verify else []
    for c in corrupted:
        typer.echo(f"corrupted: {c['array']} chunk {c['chunk']} (rows {c['rows'][0]}-{c['rows'][1] - 1}): {c['error']}")
    if corrupted:
        typer.echo(f"atcache: error: {len(corrupted)} corrupted chunk(s) in {cache} (listed above); recompute them "
                   "with build-cache ... --resume --repair (same settings as the build)", err=True)
        raise typer.Exit(1)
    report = inspect_cache(cache, workers=workers, scheduler=scheduler)
    typer.echo(format_inspection(report))
    if verify:
        report["verify"] = {"corrupted": []}
        typer.echo("verify: every chunk decodes and its checksum matches")
    if compare is not None:
        report["compare"] = compare_caches(cache, compare, workers=workers, scheduler=scheduler)
        typer.echo(f"\ncompared with {compare} over {report['compare']['common_images']} common images:")
        for i, c in report["compare"]["layers"].items():
            typer.echo(f"  layer {i:>3}: cosine mean {c['cosine']['mean']:.6f} p5 {c['cosine']['p5']:.6f} min "
                       f"{c['cosine']['min']:.6f}; AT distance mean {c['at_distance']['mean']:.4g} p95 {c['at_distance']['p95']:.4g}")
        for i, why in report["compare"]["skipped"].items():
            typer.echo(f"  layer {i:>3}: skipped ({why})")
        if "replay" in report["compare"]:
            typer.echo(f"replayed views in common: {report['compare']['replay']['common_views']}")
            for i, c in report["compare"]["replay"]["layers"].items():
                typer.echo(f"  layer {i:>3}: cosine mean {c['cosine']['mean']:.6f} p5 {c['cosine']['p5']:.6f}; "
                           f"AT distance mean {c['at_distance']['mean']:.4g}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
        typer.echo(f"report: {json_out}")


@app.command("visualize")
@_friendly
def visualize_cmd(
    cache: Annotated[str, typer.Argument(help="The cache store (.zarr folder or fsspec URL).")],
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="Folder for the PNGs.")],
    images: Annotated[int, typer.Option(help="How many images (spread over the cache).")] = 4,
    files: Annotated[str, typer.Option(help="Comma-separated images instead (paths relative to the dataset root).")] = "",
    student: Annotated[Optional[str], typer.Option(help="A student .pt (or YAML): adds its maps and |S-T| with the AT distance.")] = None,
    epoch: Annotated[Optional[int], typer.Option(help="Replay arrays: the augmented images of this cached epoch with the teacher's maps on them.")] = None,
):
    """PNG grids: each image with the teacher's cached map of every layer over it (through the stored letterbox), and
    with --student the student's maps and their difference; with --epoch, a replay epoch's augmented images."""
    from atcache.tools.visualize import visualize_cache

    if student and student.endswith(".pt") and not Path(student).is_file():
        raise AtcacheError(f"student checkpoint {student} does not exist; pass a trained .pt")
    wanted = [f.strip() for f in files.split(",") if f.strip()]
    for path in visualize_cache(cache, data, out, images=images, files=wanted, student=student, epoch=epoch):
        typer.echo(str(path))


@app.command("fidelity", context_settings=EXTRA_ARGS)
@_friendly
def fidelity_cmd(
    ctx: typer.Context,
    cache: Annotated[str, typer.Option(help="The cache store (.zarr folder or fsspec URL).")],
    teacher: Annotated[str, typer.Option(help="The teacher the cache was built with (.pt or the same YAML).")],
    data: DataOpt,
    batches: Annotated[int, typer.Option(help="Training batches to compare.")] = 8,
    batch: Annotated[int, typer.Option(help="Images per batch.")] = 16,
    targets: Annotated[str, typer.Option(help="warp (default augmentations) or static, as in train-from-cache.")] = "warp",
    device: Annotated[str, typer.Option(help="cpu or a CUDA index.")] = "0",
    seed: Annotated[int, typer.Option(help="Seed of the sample order and the augmentations.")] = 0,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the report here.")] = None,
):
    """Compare the targets train-from-cache would use with the live teacher on the same augmented images, per layer
    and per augmentation kind (none, flip, mosaic, affine, mixup). Extra key=value set ultralytics' augmentation."""
    import json

    from atcache.tools.fidelity import FidelityConfig, format_fidelity, measure_fidelity

    cfg = FidelityConfig(cache=str(cache), teacher=teacher, data=str(data), batches=batches, batch=batch,
                         targets=targets, device=_default_device(device, "training"), seed=seed,
                         hyp=_ultralytics_overrides(ctx.args))
    report = measure_fidelity(cfg)
    typer.echo(format_fidelity(report))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
        typer.echo(f"report: {json_out}")


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="atcache")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
