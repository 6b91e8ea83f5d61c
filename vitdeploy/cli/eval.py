"""`vitdeploy eval`."""

from __future__ import annotations

from contextlib import ExitStack
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
@click.option("--reference", default=None, metavar="ARTIFACT",
              help="The FP32 export of the same model: the cosine to its embeddings (embedding models) or the "
              "top-1 agreement with it (classifiers), on the same images.")
@click.option("--reference-backend", default="auto", show_default=True)
@click.option("--k", "k", type=click.IntRange(min=1), default=1, show_default=True,
              help="Embedding models: neighbours that vote in kNN top-1.")
@json_option
@verify_options
def evaluate(model: str, preset: str | None, config: str | None, seed: int | None, data: Path, batch: int,
             backend: str, reference: str | None, reference_backend: str, k: int, json_out: str | None,
             no_verify: bool, allow_drift: bool) -> None:
    """Score a model on an image folder with one sub-folder per class, in its task's measure.

    A classifier: top-1 accuracy. An embedding model (its metadata says so): k-nearest-neighbour top-1
    under cosine similarity, leave-one-out (each image classified by the other images' classes)."""
    from vitdeploy.evaluate import EmbeddingEvalResult
    from vitdeploy.evaluate import evaluate as run_eval
    from vitdeploy.verify import open_verified

    with ExitStack() as stack:
        rt = stack.enter_context(open_verified(model, backend=backend, config=config_arg(preset, config), seed=seed,
                                               verify=not no_verify, allow_drift=allow_drift))
        ref = None if reference is None else stack.enter_context(
            open_verified(reference, backend=reference_backend, verify=not no_verify, allow_drift=allow_drift))
        described = rt.describe()
        result = run_eval(rt, data, batch_size=batch, reference=ref, k=k)
    write_json(json_out, {**result.to_dict(), "runtime": described})
    if json_out == "-":
        return
    if isinstance(result, EmbeddingEvalResult):
        click.echo(f"{result.summary()} on {data} with {described}")
    else:
        click.echo(f"top-1 accuracy {result.accuracy * 100:.2f}% ({result.correct}/{result.total}) "
                   f"on {data} with {described}")
    if result.reference is not None:
        click.echo(result.reference.summary())
