"""Commands around the pipeline: the demo data and VOC conversion, and the experiment harness (demo, study, bench)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from atcache.cli.options import JsonOpt, command, pick_device, write_json
from atcache.settings import BenchConfig, DemoConfig, DemoDataConfig, StudyConfig, StudyOutput, VocConfig
from atcache.yolo import prepare


@command("make-demo-data", DemoDataConfig)
def make_demo_data_cmd(cfg: DemoDataConfig):
    """Write a deterministic synthetic dataset in real VOCdevkit format (20 VOC classes, XML annotations)."""
    from atcache.data.synthetic import make_demo_data

    devkit = make_demo_data(**dataclasses.asdict(cfg))
    typer.echo(f"wrote {cfg.images} images to {devkit}; next: atcache prepare-voc --devkit {devkit} --out {Path(cfg.out) / 'VOC'}")


@command("prepare-voc", VocConfig)
def prepare_voc_cmd(cfg: VocConfig):
    """Convert a local VOCdevkit, or images + Pascal VOC XML as an annotation tool exports them, into ultralytics'
    layout (offline, idempotent); print where every object went, and the data YAML."""
    prepare()
    from atcache.data.voc import convert_voc

    result = convert_voc(**dataclasses.asdict(cfg))
    for line in result.summary():
        typer.echo(line)
    typer.echo(f"dataset ready: {result.data_yaml}")


@command("demo", DemoConfig)
def demo_cmd(cfg: DemoConfig):
    """End-to-end on the embedded synthetic data: generate VOC data, convert it, train a teacher briefly, cache it,
    then train the student plain, from the cache and online AT for the same epochs, and print one table."""
    device = pick_device(cfg.device, "training")  # before anything is written
    prepare(Path(cfg.out) / "ultralytics")  # settings and fonts stay inside the run folder
    from atcache.tools.demo import run_demo

    for line in run_demo(dataclasses.replace(cfg, device=device)):
        typer.echo(line)


@command("study", StudyOutput, StudyConfig)
def study_cmd(where: StudyOutput, cfg: StudyConfig):
    """Seeded accuracy study: students trained plain, online AT and from the cache (static, warp, replay targets) with
    the same data, budget and --aug-seed per seed; mean and std of mAP over seeds on the whole validation split."""
    device = pick_device(cfg.device, "training")  # before anything is written
    prepare(Path(where.out) / "ultralytics")
    from atcache.tools.study import run_study

    for line in run_study(dataclasses.replace(cfg, device=device), Path(where.out),
                          ledger=Path(where.ledger) if where.ledger else None):
        typer.echo(line)


@command("bench", BenchConfig)
def bench_cmd(cfg: BenchConfig, json_out: JsonOpt = None):
    """Measure, in one run on one device: training img/s and peak memory of train / train-from-cache / train-online,
    build-cache vs pure teacher inference, the loader's target throughput, bytes/image and float16 precision."""
    prepare()
    from atcache.tools.bench import format_report, run_bench

    report = run_bench(dataclasses.replace(cfg, device=pick_device(cfg.device, "training")),
                       log=lambda line: typer.echo(line, err=True))
    typer.echo(format_report(report))
    write_json(report, json_out)
    if json_out is None:
        typer.echo(f"report: {Path(cfg.out) / 'bench.json'}")
