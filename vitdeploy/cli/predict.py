"""`vitdeploy predict`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vitdeploy.cli.app import main
from vitdeploy.cli.common import json_option, require_verified_option, verify_options, write_json


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "-m", required=True, help="ONNX, engine or checkpoint.")
@click.option("--backend", default="auto", show_default=True)
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A .npy file for the model's output rows, one per image in order: an embedding model's vectors "
              "(a classifier's logits).")
@json_option
@verify_options
@require_verified_option
def predict(images: tuple[Path, ...], model: str, backend: str, top_k: int, output: Path | None, json_out: str | None,
            no_verify: bool, allow_drift: bool, require_verified: bool) -> None:
    """Classify image files, or embed them (an embedding model: the vectors to --output x.npy, their norms
    printed); preprocessing, labels and the task come from the artifact's metadata."""
    from vitdeploy.verify import open_verified

    if require_verified and no_verify:
        raise click.UsageError("--require-verified and --no-verify contradict each other: drop one")
    if output is not None and output.suffix != ".npy":
        raise click.BadParameter(f"{output} does not end in .npy: name the file x.npy", param_hint="--output")
    with open_verified(model, backend=backend, verify=not no_verify, allow_drift=allow_drift,
                       require_verified=require_verified) as rt:
        click.echo(f"running {rt.describe()}", err=True)
        if rt.metadata is not None and rt.metadata.is_embedding:
            _embed(rt, images, output, json_out)
            return
        if output is None:
            results = rt.predict_images(list(images), top_k=top_k)
        else:
            logits = rt.infer(rt.preprocess(_open(images)))
            _save_rows(output, logits)
            results = _top_k(logits, rt.labels, top_k)
    write_json(json_out, [{"image": str(p), "top_k": [{"label": lab, "probability": prob} for lab, prob in r]}
                          for p, r in zip(images, results, strict=True)])
    if json_out == "-":
        return
    for path, r in zip(images, results, strict=True):
        click.echo(f"{path}: " + ", ".join(f"{lab} {prob:.3f}" for lab, prob in r))


def _open(images: tuple[Path, ...]) -> list[Any]:
    from vitdeploy.preprocess import open_image

    return [open_image(p) for p in images]


def _top_k(logits: Any, labels: list[str], k: int) -> list[list[tuple[str, float]]]:
    """What ``Runtime.predict_images`` gives, from logits already computed."""
    import numpy as np

    from vitdeploy.engines.base import softmax

    probs = softmax(logits)
    return [[(labels[i] if i < len(labels) else str(i), float(row[i])) for i in np.argsort(-row)[:k]] for row in probs]


def _save_rows(output: Path, rows: Any) -> None:
    """``rows`` as a float32 .npy, written atomically."""
    import io

    import numpy as np

    from vitdeploy.io import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(rows, dtype=np.float32))
    atomic_write_bytes(output, buf.getvalue())


def _embed(rt: Any, images: tuple[Path, ...], output: Path | None, json_out: str | None) -> None:
    """An embedding model's vectors to ``output`` (.npy), and each one's L2 norm printed."""
    import numpy as np

    vectors = rt.infer(rt.preprocess(_open(images)))
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    if output is not None:
        _save_rows(output, vectors)
    write_json(json_out, {"output": str(output) if output else None, "size": int(vectors.shape[1]),
                          "normalized": rt.metadata.normalized,
                          "images": [{"image": str(p), "norm": float(n)} for p, n in zip(images, norms, strict=True)]})
    if json_out == "-":
        return
    for path, n in zip(images, norms, strict=True):
        click.echo(f"{path}: embedding of {vectors.shape[1]}, norm {n:.4f}")
    click.echo(f"wrote {len(images)} x {vectors.shape[1]} float32 to {output}" if output else
               "note: the vectors are not kept: add --output x.npy", err=output is None)
