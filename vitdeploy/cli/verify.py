"""`vitdeploy verify`."""

from __future__ import annotations

from pathlib import Path

import click

from vitdeploy.cli.app import main, make_console
from vitdeploy.cli.common import json_option, split_list, write_json


@main.command("verify")
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--backend", "backends", default="auto", show_default=True,
              help="Comma-separated: auto (the tune plan when one holds here), onnxruntime, openvino, tensorrt.")
@click.option("--device", default="auto", show_default=True)
@json_option
@click.option("--wide", is_flag=True, help="Every column, whatever the terminal's width.")
@click.option("--write-tensors", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write the golden set preprocessed (golden_input.bin, golden_logits.bin, "
              "golden_tensors.json) to this folder, for programs without an image decoder (the C++ example).")
def verify_command(artifact: Path, backends: str, device: str, json_out: str | None, wide: bool,
                   write_tensors: Path | None) -> None:
    """Run ARTIFACT's golden set (images and torch FP32's logits, stored at export) through decode, the
    artifact's preprocessing and the runtime; a row per image; exit 1 on drift.

    The same check runs after `build` (where the engine runs) and on first load by predict, bench, eval and
    serve (once per machine and runtime; --no-verify skips it, --allow-drift runs despite a failure)."""
    from vitdeploy.verify import verify_artifact, write_golden_tensors

    as_json = json_out == "-"

    if write_tensors is not None:
        click.echo(f"wrote {write_golden_tensors(artifact, write_tensors)}", err=as_json)
    reports = [verify_artifact(artifact, backend=b, device=device) for b in split_list(backends) or ["auto"]]
    write_json(json_out, [r.to_dict() for r in reports])
    console = make_console()
    for r in reports:
        if r.skipped:
            click.echo(f"{artifact.name}: not verified here: {r.skipped}", err=as_json)
        for table in [] if as_json else r.table(console.width, wide):
            console.print(table)
    failed = [r for r in reports if r.failed]
    if failed:
        raise click.ClickException(f"drift: {failed[0].reason()}")
    if not as_json and any(r.passed for r in reports):
        click.echo("PASSED")
