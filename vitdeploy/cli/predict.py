"""`vitdeploy predict`."""

from __future__ import annotations

from pathlib import Path

import click

from vitdeploy.cli.app import main
from vitdeploy.cli.common import json_option, require_verified_option, verify_options, write_json


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "-m", required=True, help="ONNX, engine or checkpoint.")
@click.option("--backend", default="auto", show_default=True)
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@json_option
@verify_options
@require_verified_option
def predict(images: tuple[Path, ...], model: str, backend: str, top_k: int, json_out: str | None, no_verify: bool,
            allow_drift: bool, require_verified: bool) -> None:
    """Classify image files; preprocessing and labels come from the artifact's metadata."""
    from vitdeploy.verify import open_verified

    if require_verified and no_verify:
        raise click.UsageError("--require-verified and --no-verify contradict each other: drop one")
    with open_verified(model, backend=backend, verify=not no_verify, allow_drift=allow_drift,
                       require_verified=require_verified) as rt:
        click.echo(f"running {rt.describe()}", err=True)
        results = rt.predict_images(list(images), top_k=top_k)
    write_json(json_out, [{"image": str(p), "top_k": [{"label": lab, "probability": prob} for lab, prob in r]}
                          for p, r in zip(images, results, strict=True)])
    if json_out == "-":
        return
    for path, r in zip(images, results, strict=True):
        click.echo(f"{path}: " + ", ".join(f"{lab} {prob:.3f}" for lab, prob in r))
