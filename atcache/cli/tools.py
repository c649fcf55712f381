"""Commands around the pipeline: the demo data and VOC conversion, and the experiment harness (demo, study, bench)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from atcache.cli.options import (LAYERS_TEXT, JsonOpt, OneDeviceOpt, command, pick_device, source_defaults, text,
                                 write_json)
from atcache.config import DemoConfig, parse_layers
from atcache.errors import AtcacheError
from atcache.tools.study import STUDY_MODES, StudyConfig
from atcache.yolo import prepare

SYNTHETIC = source_defaults("atcache.data.synthetic", "make_demo_data")
BENCH = source_defaults("atcache.tools.bench", "BenchConfig")


@command("make-demo-data")
def make_demo_data_cmd(
    out: Annotated[Path, typer.Option(help="Folder that receives VOCdevkit/.")] = Path("data/demo"),
    images: Annotated[int, typer.Option(help="Number of images over all VOC years and sets.")] = SYNTHETIC.images,
    size: Annotated[int, typer.Option(help="Long side of the images in pixels (varies down to 0.75x).")] = SYNTHETIC.size,
    seed: Annotated[int, typer.Option(help="Seed; the same arguments write the same files.")] = SYNTHETIC.seed,
):
    """Write a deterministic synthetic dataset in real VOCdevkit format (20 VOC classes, XML annotations)."""
    from atcache.data.synthetic import make_demo_data

    if images < 5 or size < 16:
        raise AtcacheError("--images must be at least 5 and --size at least 16")
    devkit = make_demo_data(out, images=images, size=size, seed=seed)
    typer.echo(f"wrote {images} images to {devkit}; next: atcache prepare-voc --devkit {devkit} --out {Path(out) / 'VOC'}")


@command("prepare-voc")
def prepare_voc_cmd(
    devkit: Annotated[Path, typer.Option(help="Your VOCdevkit folder (with VOC2007/ and/or VOC2012/).")],
    out: Annotated[Path, typer.Option(help="Output dataset root: images/, labels/ and VOC.yaml are written here.")],
):
    """Convert a local VOCdevkit into ultralytics' VOC layout (offline, idempotent) and write its data YAML."""
    prepare()
    from atcache.data.voc import prepare_voc

    typer.echo(f"dataset ready: {prepare_voc(devkit, out)}")


@command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option(help="Run folder for data, cache and ultralytics settings.")] = Path(DemoConfig.out),
    images: Annotated[int, typer.Option(help="Synthetic images to generate.")] = DemoConfig.images,
    imgsz: Annotated[int, typer.Option(help="Image size.")] = DemoConfig.imgsz,
    teacher: Annotated[str, typer.Option(help="Teacher: a model YAML (trained here first) or a ready .pt.")] = DemoConfig.teacher,
    teacher_epochs: Annotated[int, typer.Option(help="Epochs to train a YAML teacher before caching it (0: random init).")] = DemoConfig.teacher_epochs,
    student: Annotated[str, typer.Option(help="Student trained from the cache: a model YAML or a .pt.")] = DemoConfig.student,
    student_epochs: Annotated[int, typer.Option(help="Epochs of each student run: plain, from the cache, online (0: stop after the cache).")] = DemoConfig.student_epochs,
    device: OneDeviceOpt = DemoConfig.device,
    quick: Annotated[bool, typer.Option(help="Tiny sizes, for tests.")] = DemoConfig.quick,
):
    """End-to-end on the embedded synthetic data: generate VOC data, convert it, train a teacher briefly, cache it,
    then train the student plain, from the cache and online AT for the same epochs, and print one table."""
    prepare(out / "ultralytics")  # settings and fonts stay inside the run folder
    from atcache.tools.demo import run_demo

    config = DemoConfig(out=str(out), images=images, imgsz=imgsz, teacher=teacher, teacher_epochs=teacher_epochs,
                        student=student, student_epochs=student_epochs, device=pick_device(device, "training"), quick=quick)
    for line in run_demo(**{**dataclasses.asdict(config), "out": out}):
        typer.echo(line)


@command("study")
def study_cmd(
    out: Annotated[Path, typer.Option(help="Run folder (data, teacher, caches, students, accuracy.json/.md).")] = Path("runs/accuracy"),
    images: Annotated[int, typer.Option(help="Synthetic images to generate (~22% become the validation split).")] = StudyConfig.images,
    imgsz: Annotated[int, typer.Option(help="Image size of teacher and students.")] = StudyConfig.imgsz,
    teacher: Annotated[str, typer.Option(help="Teacher model YAML, trained here on the whole training split.")] = StudyConfig.teacher,
    teacher_epochs: Annotated[int, typer.Option(help="Teacher epochs (a teacher trained with the same settings in OUT is reused).")] = StudyConfig.teacher_epochs,
    student: Annotated[str, typer.Option(help="Student model YAML.")] = StudyConfig.student,
    student_images: Annotated[int, typer.Option(help="Training images the students see (the first N of the split).")] = StudyConfig.student_images,
    student_epochs: Annotated[int, typer.Option(help="Epochs of every student run.")] = StudyConfig.student_epochs,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds (each run's seed and --aug-seed).")] = text(StudyConfig.seeds),
    modes: Annotated[str, typer.Option(help="Comma-separated modes among plain, online, static, warp, replay.")] = text(StudyConfig.modes),
    at_weights: Annotated[str, typer.Option(help="Comma-separated --at-weight values; every AT mode runs once per value.")] = text(StudyConfig.at_weights),
    layers: Annotated[str, typer.Option(help="Comma-separated layers cached and distilled (student layer = teacher layer).")] = text(StudyConfig.layers),
    batch: Annotated[int, typer.Option(help="Batch size.")] = StudyConfig.batch,
    device: OneDeviceOpt = StudyConfig.device,
):
    """Seeded accuracy study: students trained plain, online AT and from the cache (static, warp, replay targets) with
    the same data, budget and --aug-seed per seed; mean and std of mAP over seeds on the whole validation split."""
    prepare(out / "ultralytics")
    from atcache.tools.study import run_study

    unknown = [m for m in modes.split(",") if m not in STUDY_MODES]
    if unknown:
        raise AtcacheError(f"--modes {unknown[0]!r} is unknown; choose among {', '.join(STUDY_MODES)}")
    try:
        config = StudyConfig(images=images, imgsz=imgsz, teacher=teacher, teacher_epochs=teacher_epochs, student=student,
                             student_images=student_images, student_epochs=student_epochs,
                             seeds=tuple(int(x) for x in seeds.split(",")), modes=tuple(modes.split(",")),
                             at_weights=tuple(float(x) for x in at_weights.split(",")), layers=parse_layers(layers),
                             batch=batch, device=pick_device(device, "training"))
    except ValueError as e:
        raise AtcacheError(f"--seeds and --at-weights take comma-separated numbers ({e})") from None
    for line in run_study(config, out):
        typer.echo(line)


@command("bench")
def bench_cmd(
    data: Annotated[str, typer.Option(help="Data YAML to take the images from (default: synthetic VOC-format data).", show_default=False)] = BENCH.data,
    teacher: Annotated[str, typer.Option(help="Teacher: a checkpoint .pt or a model YAML (random init).")] = BENCH.teacher,
    student: Annotated[str, typer.Option(help="Student: a model YAML or a checkpoint .pt.")] = BENCH.student,
    layers: Annotated[str, typer.Option(help="Comma-separated teacher layers (student layers of the same index).")] = LAYERS_TEXT,
    imgsz: Annotated[int, typer.Option(help="Image size.")] = BENCH.imgsz,
    batch: Annotated[int, typer.Option(help="Batch size (build, inference and training).")] = BENCH.batch,
    steps: Annotated[int, typer.Option(help="Measured training steps per trainer and round, inside its first epoch (after the warm-up).")] = BENCH.steps,
    warmup: Annotated[int, typer.Option(help="Training steps run before measuring.")] = BENCH.warmup,
    images: Annotated[int, typer.Option(help="Training images used (0: warmup + steps + 2 batches, so one epoch holds the measured steps).")] = BENCH.images,
    workers: Annotated[int, typer.Option(help="DataLoader workers (ultralytics uses none on a CPU).")] = BENCH.workers,
    repeats: Annotated[int, typer.Option(help="Alternating build / inference passes; medians are reported.")] = BENCH.repeats,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds of the four trainers (rotated order); medians and spread are reported.")] = BENCH.rounds,
    device: OneDeviceOpt = BENCH.device,
    out: Annotated[Path, typer.Option(help="Run folder (data links, cache, training runs, bench.json).")] = Path(BENCH.out),
    json_out: JsonOpt = None,
):
    """Measure, in one run on one device: training img/s and peak memory of train / train-from-cache / train-online,
    build-cache vs pure teacher inference, the loader's target throughput, bytes/image and float16 precision."""
    prepare()
    from atcache.tools.bench import BenchConfig, format_report, run_bench

    cfg = BenchConfig(out=str(out), data=data, teacher=teacher, student=student, layers=parse_layers(layers),
                      imgsz=imgsz, batch=batch, steps=steps, warmup=warmup, images=images, workers=workers,
                      device=pick_device(device, "training"), repeats=repeats, rounds=rounds)
    report = run_bench(cfg, log=lambda line: typer.echo(line, err=True))
    typer.echo(format_report(report))
    write_json(report, json_out)
    typer.echo(f"report: {json_out or Path(cfg.out) / 'bench.json'}")
