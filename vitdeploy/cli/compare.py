"""`vitdeploy compare`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vitdeploy.cli.app import main
from vitdeploy.cli.common import json_option, write_json


@main.command()
@click.argument("a")
@click.argument("b")
@click.option("--backend-a", default="auto", show_default=True)
@click.option("--backend-b", default="auto", show_default=True)
@click.option("--inputs", type=click.IntRange(min=1), default=8, show_default=True, help="Random inputs.")
@click.option("--images", type=click.Path(path_type=Path), default=None, help="Folder of real images to add.")
@click.option("--atol", type=float, default=1e-3, show_default=True)
@click.option("--rtol", type=float, default=1e-3, show_default=True, help="Times the logits' scale.")
@json_option
def compare(a: str, b: str, backend_a: str, backend_b: str, inputs: int, images: Path | None, atol: float,
            rtol: float, json_out: str | None) -> None:
    """Run the same inputs through two artifacts or backends (Polygraphy-style); fail past --atol/--rtol.

    Logits are compared with their top-1 agreement; embeddings (an embedding model's artifact) with each
    input's cosine between A's vector and B's."""
    import numpy as np

    from vitdeploy.engines import open_runtime
    from vitdeploy.metrics import compare_logits

    with open_runtime(a, backend=backend_a) as ra, open_runtime(b, backend=backend_b) as rb:
        if ra.spec.shape != rb.spec.shape:
            raise click.ClickException(f"input shapes differ: {ra.spec.shape} vs {rb.spec.shape}")
        task = _same_task(ra, rb)
        x = np.random.default_rng(0).standard_normal((inputs, *ra.spec.shape), dtype=np.float32)
        if images is not None:
            from vitdeploy.preprocess import Preprocessing, find_images, load_images

            if ra.metadata is None:
                raise click.ClickException(f"{a} has no preprocessing metadata for --images")
            prep = Preprocessing.from_dict(ra.metadata.preprocessing)
            x = np.concatenate([x, load_images(find_images(images), prep)])
        x = np.concatenate([x, _golden_inputs(a, ra, x.dtype)])
        out_a, out_b = ra.infer(x), rb.infer(x)
        result = compare_logits(out_a, out_b)
    ok = result.max_abs <= atol + rtol * result.scale
    as_json = json_out == "-"
    extra, summary = _task_figures(task, result, out_a, out_b)
    write_json(json_out, {**result.to_dict(), **extra, "task": task, "a": ra.describe(), "b": rb.describe(),
                          "pass": ok})
    if not as_json:
        click.echo(f"A: {ra.describe()}\nB: {rb.describe()}\n{summary}")
    if not ok:
        raise click.ClickException(f"outputs differ beyond tolerance: max abs {result.max_abs:.3g} > "
                                   f"atol {atol:g} + rtol {rtol:g} x scale {result.scale:.3g}")
    if not as_json:
        click.echo("PASSED")


def _same_task(ra: Any, rb: Any) -> str:
    """The task both artifacts have (a plain ONNX without metadata counts as either); refused when they differ."""
    tasks = {rt.metadata.task for rt in (ra, rb) if rt.metadata is not None}
    if len(tasks) > 1:
        what = {"classification": "a classifier", "embedding": "an embedding model"}
        raise click.ClickException(f"A is {what[ra.metadata.task]} and B {what[rb.metadata.task]}: compare two "
                                   "exports of the same model")
    return tasks.pop() if tasks else "classification"


def _task_figures(task: str, result: Any, out_a: Any, out_b: Any) -> tuple[dict[str, Any], str]:
    """What fits the task beside the shared figures: embeddings have no top-1, but a cosine per input."""
    if task != "embedding":
        return {}, result.summary()
    from vitdeploy.evaluate import row_cosines

    cos = row_cosines(out_a, out_b)
    summary = (f"max abs {result.max_abs:.3g} (scale {result.scale:.3g}), mean abs {result.mean_abs:.3g}, "
               f"cosine per input: mean {cos.mean():.6f}, lowest {cos.min():.6f} over {result.samples} inputs")
    return {"cosine_mean": float(cos.mean()), "cosine_lowest": float(cos.min())}, summary


def _golden_inputs(artifact: str, rt: Any, dtype: Any) -> Any:
    """A's golden images, preprocessed as A takes them (the check `verify` runs), when A carries a set."""
    import numpy as np

    from vitdeploy.verify import artifact_golden, golden_batch

    golden = artifact_golden(artifact) if rt.metadata is not None and rt.spec.dtype != "uint8" else None
    if golden is None:
        return np.zeros((0, *rt.spec.shape), dtype)
    return golden_batch(rt.metadata, golden).astype(dtype)
