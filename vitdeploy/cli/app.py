"""The click group, its one-line errors for user mistakes, and the console tables print to."""

from __future__ import annotations

import os
from typing import Any

import click

from vitdeploy import __version__
from vitdeploy.errors import VitDeployError

# ValueError is not among them: a bug that raises one shows its traceback instead of passing as a user's mistake
_USER_ERRORS: tuple[type[BaseException], ...] = (VitDeployError, FileNotFoundError, FileExistsError)


class _Group(click.Group):
    """Turns a user mistake raised by the library into one line and exit 1 (traceback with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _USER_ERRORS as e:
            if os.environ.get("VITDEPLOY_DEBUG"):
                raise
            message = " ".join(str(e).split()) or type(e).__name__
            raise click.ClickException(message) from None


def make_console() -> Any:
    import shutil

    from rich.console import Console

    console = Console(stderr=False, highlight=False)
    if not console.is_terminal:  # piped or captured: don't squeeze tables into 80 columns
        console = Console(stderr=False, highlight=False, width=max(shutil.get_terminal_size().columns, 160))
    return console


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vitdeploy")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def main(debug: bool) -> None:
    """Take a Vision Transformer from PyTorch to ONNX and TensorRT: export, build, verify, benchmark.

    Every exported artifact carries a golden set (images and torch FP32's logits). `verify` runs it on
    demand; `build` runs it on the engine where it can; predict, bench, eval and serve run it on first
    load on each machine (cached in <stem>.verified.json; --no-verify skips, --allow-drift overrides)."""
    if debug:
        os.environ["VITDEPLOY_DEBUG"] = "1"
