"""The three ways to train a student, one trainer: train (plain), train-from-cache, train-online."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from atcache.cli.options import command, config_params, pick_device, ultralytics_overrides
from atcache.config import DEFAULT_LAYERS, DistillSettings, RunSettings
from atcache.errors import AtcacheError, explain_interruption
from atcache.yolo import prepare


def _train(ctx: typer.Context, settings: DistillSettings, run: RunSettings) -> None:
    """Shared by train / train-from-cache / train-online: one ultralytics run through AtcacheTrainer."""
    prepare()
    from atcache.train.trainer import train_student

    if Path(run.student).suffix.lower() == ".pt" and not Path(run.student).is_file():
        raise AtcacheError(f"student checkpoint {run.student} does not exist; pass a .pt you have or a model YAML (yolo11s.yaml)")
    if not Path(run.data).is_file():
        raise AtcacheError(f"data YAML {run.data} does not exist; pass the YAML written by `atcache prepare-voc` or your own")
    overrides = {"model": run.student, "data": run.data, **({} if run.epochs is None else {"epochs": run.epochs}),
                 "imgsz": run.imgsz, "batch": run.batch, "device": pick_device(run.device, "training"),
                 "project": str(Path(run.project).resolve()), "name": run.name or ctx.info_name,
                 **ultralytics_overrides(ctx.args)}
    with explain_interruption(lambda: "training had not begun, nothing new is kept: rerun the same command"):
        trainer = train_student(settings, overrides)  # once it trains, the trainer says which epochs are kept
    typer.echo(f"results: {trainer.csv}")
    typer.echo(f"weights: {trainer.best} (loads with plain ultralytics: YOLO('{trainer.best}'))")


@command("train", RunSettings, config_params(DistillSettings, "aug_seed flip_weight"), extra_args=True)
def train_cmd(run: RunSettings, settings: DistillSettings, ctx: typer.Context):
    """Baseline: train the student alone with the same trainer (no distillation). Extra key=value go to ultralytics."""
    _train(ctx, settings, run)


CACHE_FIELDS = "cache at_weight at_norm targets layers ram_budget_gb stream shuffle_window aug_seed gradient_weight gradient_stride flip_weight"


@command("train-from-cache", config_params(DistillSettings, CACHE_FIELDS, required=("cache",)), RunSettings, extra_args=True)
def train_from_cache_cmd(settings: DistillSettings, run: RunSettings, ctx: typer.Context):
    """Train the student with AT targets streamed from the cache; the teacher is never loaded. Extra key=value go to ultralytics."""
    from atcache.cache.store import CacheStore

    if not settings.layers:
        settings = dataclasses.replace(settings, layers=tuple((i, i) for i in CacheStore.open(settings.cache).spec.layer_indices))
    if settings.targets == "replay" and ctx.get_parameter_source("epochs").name == "DEFAULT":
        run = dataclasses.replace(run, epochs=None)  # the replay arrays' epochs
    _train(ctx, dataclasses.replace(settings, mode="cache"), run)


@command("train-online", config_params(DistillSettings, "teacher at_weight at_norm gradient_weight gradient_stride flip_weight layers p kind aug_seed", required=("teacher",),
                                       layers=tuple(zip(DEFAULT_LAYERS, DEFAULT_LAYERS))), RunSettings, extra_args=True)
def train_online_cmd(settings: DistillSettings, run: RunSettings, ctx: typer.Context):
    """Baseline: online AT as in the reference setup (teacher forward every step), same trainer, loss and weight.
    Extra key=value go to ultralytics."""
    if not settings.layers:  # '' (train-from-cache's "every cached layer") names no teacher layer here
        raise AtcacheError("--layers is empty; give at least one layer index")
    _train(ctx, dataclasses.replace(settings, mode="online"), run)
