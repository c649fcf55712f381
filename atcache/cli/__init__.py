"""The `atcache` command line: a thin typer layer that parses options and calls the stage modules (commands in
cli/tools.py, cli/cache.py and cli/train.py; the options come from the config dataclasses through cli/options.py)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from atcache.cli import cache, tools, train  # noqa: F401  (their @command functions)
from atcache.cli.options import COMMANDS
from atcache.version import __version__


class _OneLineErrors(TyperGroup):
    """A command line that does not parse (an unknown option, `--batch abc`, a missing --data) is one line on stderr,
    `atcache: error: ...`, and exit code 2, like every other error."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as e:
            # click's UsageError, which typer may carry as its own copy of click: matched by name, not by import
            names = {c.__name__ for c in type(e).__mro__}
            if "UsageError" not in names or "NoArgsIsHelpError" in names:
                raise
            where = e.ctx.command_path if getattr(e, "ctx", None) is not None else "atcache"
            message = " ".join(e.format_message().split()).rstrip(".")
            typer.echo(f"atcache: error: {message}; see `{where} --help`", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(name="atcache", cls=_OneLineErrors, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)


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
