"""`vitdeploy tune`."""

from __future__ import annotations

from pathlib import Path

import click

from vitdeploy.cli.app import main, make_console
from vitdeploy.cli.common import int_list, json_option, write_json


@main.command()
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--batch", type=click.IntRange(min=2), default=8, show_default=True,
              help="Throughput batch: the plan's second choice runs batches from this size up.")
@click.option("--threads", "threads", default=None,
              help="Comma-separated CPU thread counts to try (default: physical cores and all CPUs).")
@click.option("--images", type=click.Path(exists=True, path_type=Path), default=None,
              help="Folder of real images to add to the accuracy guard's inputs.")
@click.option("--iters", type=click.IntRange(min=3), default=10, show_default=True, help="Timed runs at batch 1.")
@json_option
@click.option("--wide", is_flag=True, help="Every column, whatever the terminal's width.")
def tune(artifact: Path, batch: int, threads: str | None, images: Path | None, iters: int,
         json_out: str | None, wide: bool) -> None:
    """Measure every CPU path for an ONNX here; write the fastest that passes the accuracy guard to ARTIFACT's
    .tune.json, which bench/predict/eval/serve then use on this machine (--backend overrides it)."""
    from vitdeploy.tune import tune as run_tune

    report = run_tune(artifact, batch=batch, threads=int_list(threads) if threads else None, images=images,
                      iters=iters, progress=True)
    write_json(json_out, report.to_dict())
    if json_out != "-":
        console = make_console()
        console.print(report.table(console.width, wide))
        click.echo(report.summary())
