"""The three ways to train a student, one trainer: train (plain), train-from-cache, train-online."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from atcache.cli.options import (LAYERS_TEXT, AtWeightOpt, AugSeedOpt, BatchOpt, CacheOpt, DataOpt, DeviceOpt,
                                 EpochsOpt, ImgszOpt, KindOpt, NameOpt, POpt, ProjectOpt, StudentOpt, command,
                                 pick_device, text, ultralytics_overrides)
from atcache.config import DistillSettings, RunSettings, parse_layers
from atcache.errors import AtcacheError
from atcache.yolo import prepare

RUN, DISTILL = RunSettings, DistillSettings  # every default below is one of their fields


def _train(ctx: typer.Context, settings, run: RunSettings, student: str, data: Path) -> None:
    """Shared by train / train-from-cache / train-online: one ultralytics run through AtcacheTrainer."""
    from atcache.train.trainer import train_student

    if Path(student).suffix.lower() == ".pt" and not Path(student).is_file():
        raise AtcacheError(f"student checkpoint {student} does not exist; pass a .pt you have or a model YAML (yolo11s.yaml)")
    if not data.is_file():
        raise AtcacheError(f"data YAML {data} does not exist; pass the YAML written by `atcache prepare-voc` or your own")
    overrides = {"model": student, "data": str(data), **({} if run.epochs is None else {"epochs": run.epochs}),
                 "imgsz": run.imgsz, "batch": run.batch, "device": pick_device(run.device, "training"),
                 "project": str(Path(run.project).resolve()), "name": run.name or ctx.info_name,
                 **ultralytics_overrides(ctx.args)}
    trainer = train_student(settings, overrides)
    typer.echo(f"results: {trainer.csv}")
    typer.echo(f"weights: {trainer.best} (loads with plain ultralytics: YOLO('{trainer.best}'))")


@command("train", extra_args=True)
def train_cmd(
    ctx: typer.Context,
    student: StudentOpt,
    data: DataOpt,
    epochs: EpochsOpt = RUN.epochs,
    imgsz: ImgszOpt = RUN.imgsz,
    batch: BatchOpt = RUN.batch,
    device: DeviceOpt = RUN.device,
    project: ProjectOpt = Path(RUN.project),
    name: NameOpt = RUN.name,
    aug_seed: AugSeedOpt = DISTILL.aug_seed,
):
    """Baseline: train the student alone with the same trainer (no distillation). Extra key=value go to ultralytics."""
    prepare()
    run = RunSettings(epochs=epochs, imgsz=imgsz, batch=batch, device=device, project=str(project), name=name)
    _train(ctx, DistillSettings(mode="plain", aug_seed=aug_seed), run, student, data)


@command("train-from-cache", extra_args=True)
def train_from_cache_cmd(
    ctx: typer.Context,
    cache: CacheOpt,
    student: StudentOpt,
    data: DataOpt,
    epochs: Annotated[Optional[int], typer.Option(help=f"Training epochs (default {RUN.epochs}; with --targets replay the cache's).", show_default=False)] = None,
    imgsz: ImgszOpt = RUN.imgsz,
    batch: BatchOpt = RUN.batch,
    device: DeviceOpt = RUN.device,
    at_weight: AtWeightOpt = DISTILL.at_weight,
    targets: Annotated[str, typer.Option(help="warp: align maps with mosaic/affine/flip/mixup; static: no geometric aug, exact maps; replay: the teacher's maps on every augmented view (build-cache --replay-epochs).")] = DISTILL.targets,
    layers: Annotated[str, typer.Option(help="Layers to distil: 6,8,13 (same index in student and cache) or student:cache pairs 4:6,6:8. Default: all cached layers.", show_default=False)] = text(DISTILL.layers),
    ram_budget_gb: Annotated[Optional[float], typer.Option("--ram-budget", help="GiB of RAM the cache may take (default: half of this machine's memory); a larger cache is streamed from disk.")] = DISTILL.ram_budget_gb,
    stream: Annotated[Optional[bool], typer.Option("--stream/--no-stream", help="Read the maps from disk chunk by chunk (block-shuffled order) instead of RAM. Default: only when the cache exceeds --ram-budget.", show_default=False)] = DISTILL.stream,
    shuffle_window: Annotated[int, typer.Option(help="Streaming: chunks whose samples are shuffled together (more: closer to a full shuffle, more RAM per loader worker).")] = DISTILL.shuffle_window,
    project: ProjectOpt = Path(RUN.project),
    name: NameOpt = RUN.name,
    aug_seed: AugSeedOpt = DISTILL.aug_seed,
):
    """Train the student with AT targets streamed from the cache; the teacher is never loaded. Extra key=value go to ultralytics."""
    prepare()
    from atcache.cache.store import CacheStore

    pairs = parse_layers(layers, pairs=True) if layers else tuple((i, i) for i in CacheStore.open(cache).spec.layer_indices)
    if epochs is None and targets != "replay":
        epochs = RUN.epochs
    settings = DistillSettings(mode="cache", cache=str(cache), targets=targets, at_weight=at_weight, layers=pairs,
                               ram_budget_gb=ram_budget_gb, stream=stream, shuffle_window=shuffle_window,
                               aug_seed=aug_seed)
    run = RunSettings(epochs=epochs, imgsz=imgsz, batch=batch, device=device, project=str(project), name=name)
    _train(ctx, settings, run, student, data)


@command("train-online", extra_args=True)
def train_online_cmd(
    ctx: typer.Context,
    teacher: Annotated[str, typer.Option(help="Teacher checkpoint .pt, run forward on every augmented batch.")],
    student: StudentOpt,
    data: DataOpt,
    epochs: EpochsOpt = RUN.epochs,
    imgsz: ImgszOpt = RUN.imgsz,
    batch: BatchOpt = RUN.batch,
    device: DeviceOpt = RUN.device,
    at_weight: AtWeightOpt = DISTILL.at_weight,
    layers: Annotated[str, typer.Option(help="Layers: 6,8,13,16,19,22 or student:teacher pairs.")] = LAYERS_TEXT,
    p: POpt = DISTILL.p,
    kind: KindOpt = DISTILL.kind,
    project: ProjectOpt = Path(RUN.project),
    name: NameOpt = RUN.name,
    aug_seed: AugSeedOpt = DISTILL.aug_seed,
):
    """Baseline: online AT as in the reference setup (teacher forward every step), same trainer, loss and weight.
    Extra key=value go to ultralytics."""
    prepare()
    settings = DistillSettings(mode="online", teacher=teacher, at_weight=at_weight, layers=parse_layers(layers, pairs=True),
                               p=p, kind=kind, aug_seed=aug_seed)
    run = RunSettings(epochs=epochs, imgsz=imgsz, batch=batch, device=device, project=str(project), name=name)
    _train(ctx, settings, run, student, data)
