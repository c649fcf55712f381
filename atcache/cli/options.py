"""What the commands share: `command`, which makes a command of a function taking config dataclasses (their fields'
defaults and help texts, atcache.config.opt, become its options: nothing is written twice), the few options that are
no config field, and the helpers for --device, --cache and extra key=value words."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer

from atcache.config import AUTO_DEVICE, CACHE_HELP
from atcache.errors import AtcacheError, first_line

EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}
COMMANDS: dict = {}  # command name -> (function, context settings); atcache.cli registers them on the app
KEYWORD = inspect.Parameter.KEYWORD_ONLY


class Params(list):
    """The typer parameters made of fields of the config dataclass `cls`, and the parsers of their option text."""

    def build(self, values: dict):
        """The config from the parsed options (taken out of `values`); its other fields keep their defaults."""
        return self.cls(**{p.name: self.parsers[p.name](values.pop(p.name)) for p in self})


def config_params(cls, names=None, *, required=(), **defaults) -> Params:
    """Options of the fields `names` of `cls` (a space-separated string or a list; default: every field with a help
    text): Annotated[type, typer.Option(help=...)] = the field's default, or the one given in `defaults`; fields
    without a default, or named in `required`, are required. A field with a (parse, format) pair takes text."""
    fields, hints = {f.name: f for f in dataclasses.fields(cls)}, typing.get_type_hints(cls)
    names = names.split() if isinstance(names, str) else names or [n for n, f in fields.items() if f.metadata.get("help")]
    params, parsers = [], {}
    for name in names:
        meta = fields[name].metadata
        default, (parse, show) = defaults.get(name, fields[name].default), meta["cli"] or (None, None)
        parsers[name] = parse or (lambda value: value)
        if name in required or default is dataclasses.MISSING:
            default = inspect.Parameter.empty
        elif show:
            default = show(default)
        option = typer.Option(*filter(None, [meta["option"]]), help=meta["help"], show_default=default not in ("", None))
        params.append(inspect.Parameter(name, KEYWORD, default=default, annotation=Annotated[str if show else hints[name], option]))
    out = Params(params)
    out.cls, out.parsers = cls, parsers
    return out


def command(name: str, *configs, extra_args: bool = False):
    """Make `fn` the command `name`. Its first parameters receive the configs (a dataclass: every field with a help
    text, or config_params(...): some fields), built from their options; its other parameters are options of their own
    (ctx, CACHE, --json, ...). With `extra_args`, words after the options (key=value) reach it in ctx.args. An
    AtcacheError or OSError becomes one line on stderr and exit code 2; Ctrl-C or SIGTERM one line saying what was kept
    and how to continue, exit code 130 or 143; no traceback."""
    specs = [c if isinstance(c, Params) else config_params(c) for c in configs]

    def make(fn):
        own = [p.replace(kind=KEYWORD) for p in list(inspect.signature(fn, eval_str=True).parameters.values())[len(specs):]]

        @functools.wraps(fn)
        def run(**values):
            from atcache.errors import one_line, stop_on_signals

            with stop_on_signals():  # SIGTERM (SLURM, Kubernetes, `timeout`) stops a command as Ctrl-C does
                try:
                    return fn(*[spec.build(values) for spec in specs], **values)
                except BaseException as e:
                    if (said := one_line(e)) is None:  # not an error atcache explains: a bug, its traceback shows
                        raise
                    typer.echo(said[0], err=True)
                    raise typer.Exit(said[1])

        params = own + [p for spec in specs for p in spec]
        run.__signature__ = inspect.Signature(params)  # what typer reads (inspect.signature and get_type_hints)
        run.__annotations__ = {p.name: p.annotation for p in params}
        COMMANDS[name] = (run, EXTRA_ARGS if extra_args else {})
        return fn

    return make


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
    from atcache.devices import check_devices, cuda_fallback

    chosen = cuda_fallback(device or "0")
    if device != AUTO_DEVICE and chosen != device:
        typer.echo(f"atcache: no CUDA device found, {doing} on the CPU", err=True)
    check_devices(chosen)
    return chosen


def ultralytics_overrides(extra: list[str], reserved=("model", "data", "epochs", "imgsz", "batch", "device", "project",
                                                     "name")) -> dict:
    """`key=value` words after the options -> ultralytics train arguments (checked against its defaults); `reserved`
    keys are atcache options of the command."""
    from atcache.yolo import DEFAULT_CFG_DICT, check_cfg, smart_value

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
    try:
        check_cfg(out)  # ultralytics' own type and range checks (it converts some values in place)
    except (TypeError, ValueError, SyntaxError) as e:
        raise AtcacheError(f"{first_line(e).rstrip('.')}; fix that key=value word") from None
    return out


def write_json(report: dict, path: Optional[Path]) -> None:
    """--json: the report, indented, into `path` (its folder made), and a line saying where."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        typer.echo(f"report: {path}")
