"""The `atcache` command line: a thin typer layer that parses options and calls the stage modules (commands in
cli/tools.py, cli/cache.py and cli/train.py; the options come from the config dataclasses through cli/options.py)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from atcache.cli import cache, tools, train  # noqa: F401  (their @command functions)
from atcache.cli.options import COMMANDS
from atcache.version import __version__

app = typer.Typer(name="atcache", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


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
    app.command(_name, context_settings=COMMANDS[_name][1])(COMMANDS[_name][0])


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="atcache")


if __name__ == "__main__":  # pragma: no cover
    main()
