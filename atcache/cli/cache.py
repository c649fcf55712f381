"""Commands that make and look at a cache: build-cache, inspect, visualize, fidelity."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from atcache.cli.options import (CacheAliasOpt, CacheArg, JsonOpt, command, pick_device, the_cache,
                                 ultralytics_overrides, write_json)
from atcache.config import BuildConfig
from atcache.errors import AtcacheError, explain_interruption
from atcache.settings import FidelityConfig, InspectConfig, VisualizeConfig
from atcache.yolo import prepare


@command("build-cache", BuildConfig, extra_args=True)
def build_cache_cmd(cfg: BuildConfig, ctx: typer.Context):
    """Run the teacher once over a split and write per-layer attention maps into a chunked Zarr v3 store. With
    --replay-epochs, extra key=value (mosaic=, mixup=, scale=, fliplr=, hsv_h=, close_mosaic=, epochs=, ...) set the
    ultralytics augmentation the replay arrays are made with."""
    prepare()
    from atcache.teacher.pipeline import build_cache

    remote = cfg.scheduler and not cfg.scheduler.strip().startswith("local")  # devices resolved by the remote workers
    augment = ultralytics_overrides(ctx.args, ("model", "data", "imgsz", "batch", "device"))
    rerun = " with --resume in place of --overwrite" if cfg.overwrite else "" if cfg.resume else " with --resume"
    with explain_interruption(lambda: f"the finished chunks of {cfg.out} are kept: rerun the same command{rerun} to continue"):
        report = build_cache(dataclasses.replace(cfg, device=(cfg.device or "0") if remote else pick_device(cfg.device, "building"),
                                                 augment=tuple(sorted(augment.items()))))
    notes, summary = report.lines(cfg.repair)
    for line in notes:
        typer.echo(line, err=True)
    typer.echo("\n".join(summary))


@command("inspect", InspectConfig)
def inspect_cmd(cfg: InspectConfig, cache: CacheArg = None, cache_option: CacheAliasOpt = None, json_out: JsonOpt = None):
    """Statistics of a cache computed with dask, chunk by chunk: rows done, NaN/Inf, norms, value distributions, peak
    heatmap, entropy; optionally an integrity check and a comparison with another cache."""
    from atcache.cache.inspect import (compare_caches, format_comparison, format_corrupted, format_inspection,
                                       inspect_cache, verify_cache)

    cache, dask = the_cache(cache, cache_option), {"workers": cfg.workers, "scheduler": cfg.scheduler}
    if corrupted := verify_cache(cache, **dask) if cfg.verify else []:
        typer.echo(format_corrupted(corrupted))
        typer.echo(f"atcache: error: {len(corrupted)} corrupted chunk(s) in {cache} (listed above); recompute them "
                   "with build-cache ... --resume --repair (same settings as the build)", err=True)
        raise typer.Exit(1)
    report = inspect_cache(cache, **dask)
    typer.echo(format_inspection(report))
    if cfg.verify:
        report["verify"] = {"corrupted": []}
        typer.echo("verify: every chunk decodes and its checksum matches")
    if cfg.compare is not None:
        report["compare"] = compare_caches(cache, cfg.compare, **dask)
        typer.echo(format_comparison(report["compare"], cfg.compare))
    write_json(report, json_out)


@command("visualize", VisualizeConfig)
def visualize_cmd(cfg: VisualizeConfig, cache: CacheArg = None, cache_option: CacheAliasOpt = None):
    """PNG grids: each image with the teacher's cached map of every layer over it (through the stored letterbox), and
    with --student the student's maps and their difference; with --epoch, a replay epoch's augmented images."""
    from atcache.tools.visualize import visualize_cache

    cache = the_cache(cache, cache_option)
    if cfg.student and cfg.student.endswith(".pt") and not Path(cfg.student).is_file():
        raise AtcacheError(f"student checkpoint {cfg.student} does not exist; pass a trained .pt")
    for path in visualize_cache(cache, **{**dataclasses.asdict(cfg), "data": Path(cfg.data), "out": Path(cfg.out)}):
        typer.echo(str(path))


@command("fidelity", FidelityConfig, extra_args=True)
def fidelity_cmd(cfg: FidelityConfig, ctx: typer.Context, json_out: JsonOpt = None):
    """Compare the targets train-from-cache would use with the live teacher on the same augmented images, per layer
    and per augmentation kind (none, flip, mosaic, affine, mixup). Extra key=value set ultralytics' augmentation."""
    from atcache.tools.fidelity import format_fidelity, measure_fidelity

    report = measure_fidelity(dataclasses.replace(cfg, device=pick_device(cfg.device, "running the teacher"),
                                                  hyp=ultralytics_overrides(ctx.args)))
    typer.echo(format_fidelity(report))
    write_json(report, json_out)
