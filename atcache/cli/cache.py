"""Commands that make and look at a cache: build-cache, inspect, visualize, fidelity."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from atcache.cli.options import (CacheAliasOpt, CacheArg, CacheOpt, DataOpt, JsonOpt, KindOpt, OneDeviceOpt, POpt,
                                 command, pick_device, source_defaults, text, the_cache, ultralytics_overrides,
                                 write_json)
from atcache.config import BuildConfig, parse_layers, parse_shard
from atcache.errors import AtcacheError
from atcache.yolo import prepare

FIDELITY = source_defaults("atcache.tools.fidelity", "FidelityConfig")
VISUALIZE = source_defaults("atcache.tools.visualize", "visualize_cache")


@command("build-cache", extra_args=True)
def build_cache_cmd(
    ctx: typer.Context,
    teacher: Annotated[str, typer.Option(help="Teacher: a trained ultralytics checkpoint .pt, or a model YAML (random init).")],
    data: Annotated[Path, typer.Option(help="Ultralytics detection data YAML.")],
    out: Annotated[str, typer.Option(help="Cache store to write: a Zarr v3 folder (voc_m.zarr) or an fsspec URL (s3://bucket/voc_m.zarr).")],
    split: Annotated[str, typer.Option(help="Split of the data YAML to cache.")] = BuildConfig.split,
    layers: Annotated[str, typer.Option(help="Teacher layer indices (model.model[i]) to cache.")] = text(BuildConfig.layers),
    imgsz: Annotated[int, typer.Option(help="Training image size (multiple of the max stride).")] = BuildConfig.imgsz,
    batch: Annotated[int, typer.Option(help="Images per teacher forward pass.")] = BuildConfig.batch,
    device: Annotated[str, typer.Option(help="cpu, a CUDA index, or several (0,1,2,3): one shard process per device (default: CUDA device 0 if there is one, else the CPU).", show_default=False)] = BuildConfig.device,
    p: POpt = BuildConfig.p,
    kind: KindOpt = BuildConfig.kind,
    workers: Annotated[int, typer.Option(help="DataLoader workers decoding images (default: min(4, CPU cores)).")] = BuildConfig.workers,
    chunk_rows: Annotated[int, typer.Option(help="Rows per Zarr chunk: the unit of writing, resuming and sharding.")] = BuildConfig.chunk_rows,
    resume: Annotated[bool, typer.Option(help="Finish an interrupted build of the same settings.")] = BuildConfig.resume,
    overwrite: Annotated[bool, typer.Option(help="Delete an existing store at --out and rebuild it.")] = BuildConfig.overwrite,
    shard: Annotated[str, typer.Option(help="i/n: this process fills the i-th of n disjoint chunk ranges.")] = "/".join(map(str, BuildConfig.shard)),
    skip_bad: Annotated[bool, typer.Option(help="Leave rows of unreadable images empty instead of stopping.")] = BuildConfig.skip_bad,
    repair: Annotated[bool, typer.Option(help="With --resume: recompute the row-chunks whose stored data fails to decode (corrupted chunks).")] = BuildConfig.repair,
    scheduler: Annotated[str, typer.Option(help="Build on dask.distributed: local:N worker processes here, or a scheduler address tcp://host:8786.", show_default=False)] = BuildConfig.scheduler,
    break_locks: Annotated[bool, typer.Option(help="Take over row-chunks claimed by another builder that is known to be dead.")] = BuildConfig.break_locks,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = BuildConfig.progress,
    replay_epochs: Annotated[int, typer.Option(help="Also store the teacher's maps on every augmented view of this many epochs of seeded training (train-from-cache --targets replay).")] = BuildConfig.replay_epochs,
    aug_seed: Annotated[int, typer.Option(help="The replay's augmentation seed (train with the same --aug-seed, or let training take it from the cache).")] = BuildConfig.aug_seed,
    dtype: Annotated[str, typer.Option(help="Stored maps: float16, or uint8 (square-root domain with a scale per map: about half the bytes, cosine >= 0.9999).")] = BuildConfig.dtype,
):
    """Run the teacher once over a split and write per-layer attention maps into a chunked Zarr v3 store. With
    --replay-epochs, extra key=value (mosaic=, mixup=, scale=, fliplr=, hsv_h=, close_mosaic=, epochs=, ...) set the
    ultralytics augmentation the replay arrays are made with."""
    prepare()
    from atcache.build.pipeline import build_cache

    if scheduler and not scheduler.strip().startswith("local"):
        device = device or "0"  # resolved by the remote workers
    else:
        device = pick_device(device, "building")
    cfg = BuildConfig(
        teacher=teacher, data=str(data), out=str(out), split=split, layers=parse_layers(layers), imgsz=imgsz,
        batch=batch, device=device, p=p, kind=kind, workers=workers, resume=resume, overwrite=overwrite,
        shard=parse_shard(shard), chunk_rows=chunk_rows, skip_bad=skip_bad, progress=progress, repair=repair,
        break_locks=break_locks, scheduler=scheduler, replay_epochs=replay_epochs, aug_seed=aug_seed, dtype=dtype,
        augment=tuple(sorted(ultralytics_overrides(ctx.args, ("model", "data", "imgsz", "batch", "device")).items())),
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


@command("inspect")
def inspect_cmd(
    cache: CacheArg = None,
    cache_option: CacheAliasOpt = None,
    json_out: JsonOpt = None,
    verify: Annotated[bool, typer.Option(help="Decode every chunk and check its crc32c; exit 1 if any is corrupted.")] = False,
    compare: Annotated[Optional[str], typer.Option(help="Another cache: per-layer cosine and AT distance over common images.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="dask threads (default: one per core).")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="A dask.distributed scheduler address (tcp://host:8786) to compute on.")] = None,
):
    """Statistics of a cache computed with dask, chunk by chunk: rows done, NaN/Inf, norms, value distributions, peak
    heatmap, entropy; optionally an integrity check and a comparison with another cache."""
    from atcache.cache.inspect import compare_caches, format_inspection, inspect_cache, verify_cache

    cache = the_cache(cache, cache_option)
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
    write_json(report, json_out)
    if json_out is not None:
        typer.echo(f"report: {json_out}")


@command("visualize")
def visualize_cmd(
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="Folder for the PNGs.")],
    cache: CacheArg = None,
    cache_option: CacheAliasOpt = None,
    images: Annotated[int, typer.Option(help="How many images (spread over the cache).")] = VISUALIZE.images,
    files: Annotated[str, typer.Option(help="Comma-separated images instead (paths relative to the dataset root).")] = text(VISUALIZE.files),
    student: Annotated[Optional[str], typer.Option(help="A student .pt (or YAML): adds its maps and |S-T| with the AT distance.")] = None,
    epoch: Annotated[Optional[int], typer.Option(help="Replay arrays: the augmented images of this cached epoch with the teacher's maps on them.")] = None,
):
    """PNG grids: each image with the teacher's cached map of every layer over it (through the stored letterbox), and
    with --student the student's maps and their difference; with --epoch, a replay epoch's augmented images."""
    from atcache.tools.visualize import visualize_cache

    cache = the_cache(cache, cache_option)
    if student and student.endswith(".pt") and not Path(student).is_file():
        raise AtcacheError(f"student checkpoint {student} does not exist; pass a trained .pt")
    wanted = [f.strip() for f in files.split(",") if f.strip()]
    for path in visualize_cache(cache, data, out, images=images, files=wanted, student=student, epoch=epoch):
        typer.echo(str(path))


@command("fidelity", extra_args=True)
def fidelity_cmd(
    ctx: typer.Context,
    cache: CacheOpt,
    teacher: Annotated[str, typer.Option(help="The teacher the cache was built with (.pt or the same YAML).")],
    data: DataOpt,
    batches: Annotated[int, typer.Option(help="Training batches to compare.")] = FIDELITY.batches,
    batch: Annotated[int, typer.Option(help="Images per batch.")] = FIDELITY.batch,
    targets: Annotated[str, typer.Option(help="warp (default augmentations), static or replay, as in train-from-cache.")] = FIDELITY.targets,
    device: OneDeviceOpt = FIDELITY.device,
    seed: Annotated[int, typer.Option(help="Seed of the sample order and the augmentations.")] = FIDELITY.seed,
    json_out: JsonOpt = None,
):
    """Compare the targets train-from-cache would use with the live teacher on the same augmented images, per layer
    and per augmentation kind (none, flip, mosaic, affine, mixup). Extra key=value set ultralytics' augmentation."""
    from atcache.tools.fidelity import FidelityConfig, format_fidelity, measure_fidelity

    cfg = FidelityConfig(cache=str(cache), teacher=teacher, data=str(data), batches=batches, batch=batch,
                         targets=targets, device=pick_device(device, "running the teacher"), seed=seed,
                         hyp=ultralytics_overrides(ctx.args))
    report = measure_fidelity(cfg)
    typer.echo(format_fidelity(report))
    write_json(report, json_out)
    if json_out is not None:
        typer.echo(f"report: {json_out}")
