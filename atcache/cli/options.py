"""What the commands share: option types spelled once, defaults read from the config dataclasses (never written
here), and the helpers for --device, --cache and extra key=value words."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Optional

import typer

from atcache.config import AUTO_DEVICE, BuildConfig
from atcache.errors import AtcacheError


def text(values) -> str:
    """A tuple default (layers, seeds, ...) as the comma-separated text its option takes."""
    return ",".join(map(str, values))


def source_defaults(module: str, name: str) -> SimpleNamespace:
    """The literal defaults of dataclass or function `name` in `module`, read from its source without importing it
    (the tool modules import torch, which `atcache --help` must not); tests/test_cli.py checks them against the
    imported ones. Defaults that are not literals (DEFAULT_LAYERS, factories) are left out."""
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == name)
    if isinstance(node, ast.ClassDef):
        pairs = [(s.target.id, s.value) for s in node.body if isinstance(s, ast.AnnAssign) and s.value is not None]
    else:
        args = node.args.posonlyargs + node.args.args
        pairs = [(a.arg, d) for a, d in zip(args[len(args) - len(node.args.defaults):], node.args.defaults)]
        pairs += [(a.arg, d) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None]
    out = {}
    for key, value in pairs:
        try:
            out[key] = ast.literal_eval(value)
        except ValueError:
            pass
    return SimpleNamespace(**out)


LAYERS_TEXT = text(BuildConfig.layers)  # the reference setup's six layers
EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}
COMMANDS: dict = {}  # command name -> (function, context settings); atcache.cli registers them on the app


def command(name: str, extra_args: bool = False):
    """Make a function the command `name`; with `extra_args`, words after the options (key=value) reach it in
    ctx.args."""

    def mark(fn):
        COMMANDS[name] = (fn, EXTRA_ARGS if extra_args else {})
        return fn

    return mark
AUTO = "default: CUDA device 0 if there is one, else the CPU"
CACHE_HELP = "The cache store: a .zarr folder or an fsspec URL such as s3://bucket/voc.zarr."

StudentOpt = Annotated[str, typer.Option(help="Student: a model YAML (yolo11s.yaml, from scratch) or a checkpoint .pt.")]
DataOpt = Annotated[Path, typer.Option(help="Ultralytics detection data YAML (the one the cache was built on).")]
EpochsOpt = Annotated[int, typer.Option(help="Training epochs.")]
ImgszOpt = Annotated[int, typer.Option(help="Training image size (must equal the cache's).")]
BatchOpt = Annotated[int, typer.Option(help="Batch size over all devices.")]
DeviceOpt = Annotated[str, typer.Option(help=f"cpu, a CUDA index, or several (0,1) for DDP ({AUTO}).", show_default=False)]
OneDeviceOpt = Annotated[str, typer.Option("--device", help=f"cpu or a CUDA index ({AUTO}).", show_default=False)]
ProjectOpt = Annotated[Path, typer.Option(help="Parent of the run folder (ultralytics' project).")]
NameOpt = Annotated[str, typer.Option(help="Run name (default: the command's name; ultralytics adds a number if it exists).", show_default=False)]
AtWeightOpt = Annotated[float, typer.Option(help="Weight of the AT loss added to the detection loss.")]
AugSeedOpt = Annotated[Optional[int], typer.Option(help="Seeded augmentation: each sample's augmentation and each epoch's order a function of (seed, epoch, index) alone, so runs see identical batches.")]
POpt = Annotated[float, typer.Option(help="Exponent p of the attention map sum_c |F_c|^p.")]
KindOpt = Annotated[str, typer.Option(help="Attention map: sum_p (the reference setup's), sum, or max_p.")]
CacheOpt = Annotated[str, typer.Option("--cache", help=CACHE_HELP)]
CacheAliasOpt = Annotated[Optional[str], typer.Option("--cache", help=CACHE_HELP)]
CacheArg = Annotated[Optional[str], typer.Argument(help="The cache store, as --cache.", show_default=False)]
JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Also write the full report (JSON) here.")]


def the_cache(positional: Optional[str], option: Optional[str]) -> str:
    """The cache of a command that takes it as --cache CACHE or as its one positional CACHE."""
    if positional and option and positional != option:
        raise AtcacheError(f"two caches given ({positional} and --cache {option}); give one")
    if not (positional or option):
        raise AtcacheError("no cache given; pass --cache CACHE (a .zarr folder or an fsspec URL)")
    return positional or option


def pick_device(device: str, doing: str) -> str:
    """--device '' (the default) -> CUDA device 0 if there is one, else the CPU; an explicit 0 on a machine without
    CUDA becomes the CPU too, and says so."""
    from atcache.devices import cuda_fallback

    chosen = cuda_fallback(device or "0")
    if device != AUTO_DEVICE and chosen != device:
        typer.echo(f"atcache: no CUDA device found, {doing} on the CPU", err=True)
    return chosen


TRAIN_OPTION_KEYS = ("model", "data", "epochs", "imgsz", "batch", "device", "project", "name")


def ultralytics_overrides(extra: list[str], reserved: tuple[str, ...] = TRAIN_OPTION_KEYS) -> dict:
    """`key=value` words after the options -> ultralytics train arguments (checked against its defaults); `reserved`
    keys are atcache options of the command."""
    from atcache.yolo import DEFAULT_CFG_DICT, smart_value

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


def write_json(report: dict, path: Optional[Path]) -> None:
    """--json: the report, indented, into `path` (its folder made)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
