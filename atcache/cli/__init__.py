"""The `atcache` command line: a thin typer layer that parses options and calls the stage modules (commands in
cli/tools.py, cli/cache.py and cli/train.py; shared option types and helpers in cli/options.py)."""

from __future__ import annotations

import functools
import sys
from typing import Annotated, Optional

import typer

from atcache.cli import cache, tools, train  # noqa: F401  (their @command functions)
from atcache.cli.options import COMMANDS
from atcache.errors import AtcacheError
from atcache.version import __version__

app = typer.Typer(
    name="atcache",
    help="Attention-transfer distillation for YOLO with the teacher run once: cached attention maps in Zarr.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def friendly(fn):
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


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"atcache {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_print_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
):
    """Attention-transfer distillation for YOLO with the teacher run once: cached attention maps in Zarr."""


ORDER = ("make-demo-data", "prepare-voc", "build-cache", "train", "train-from-cache", "train-online", "demo", "study",
         "bench", "inspect", "visualize", "fidelity")  # as `atcache --help` lists them: the pipeline's order
assert set(ORDER) == set(COMMANDS), set(ORDER) ^ set(COMMANDS)
for _name in ORDER:
    app.command(_name, context_settings=COMMANDS[_name][1])(friendly(COMMANDS[_name][0]))


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="atcache")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
