"""`vitdeploy eval`."""

from __future__ import annotations

from pathlib import Path

import click

from vitdeploy.cli.app import main
from vitdeploy.cli.common import config_arg, json_option, model_options, verify_options, write_json


@main.command("eval")
@click.option("--model", "-m", required=True, help="ONNX file, engine, or checkpoint (preset, folder, ...).")
@model_options
@click.option("--data", required=True, type=click.Path(path_type=Path), help="DIR/CLASS/image files.")
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--backend", default="auto", show_default=True)
@json_option
@verify_options
def evaluate(model: str, preset: str | None, config: str | None, seed: int | None, data: Path, batch: int,
             backend: str, json_out: str | None, no_verify: bool, allow_drift: bool) -> None:
    """Top-1 accuracy on an image folder with one sub-folder per class name."""
    from vitdeploy.evaluate import evaluate_folder
    from vitdeploy.verify import open_verified

    with open_verified(model, backend=backend, config=config_arg(preset, config), seed=seed, verify=not no_verify,
                       allow_drift=allow_drift) as rt:
        described = rt.describe()
        result = evaluate_folder(rt, data, batch_size=batch)
    write_json(json_out, {**result.to_dict(), "runtime": described})
    if json_out != "-":
        click.echo(f"top-1 accuracy {result.accuracy * 100:.2f}% ({result.correct}/{result.total}) "
                   f"on {data} with {described}")
