"""`vitdeploy triton`."""

from __future__ import annotations

from pathlib import Path

import click

from vitdeploy.cli.app import main


def _old_spellings(backend: str, triton_backend: str | None, runtime: str | None) -> tuple[str, str]:
    """--backend native|python and --runtime X are the previous release's spellings: still taken, with a note."""
    if backend in ("native", "python"):
        click.echo(f"note: --backend {backend} is now --triton-backend {backend} (--backend names the vitdeploy "
                   "backend, as in every other command)", err=True)
        backend, triton_backend = "auto", triton_backend or backend
    if runtime is not None:
        click.echo(f"note: --runtime is now --backend: --backend {runtime}", err=True)
        backend = runtime
    return backend, triton_backend or "native"


@main.command()
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--repo", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default=None)
@click.option("--triton-backend", type=click.Choice(["native", "python"]), default=None,
              help="native (default): Triton's onnxruntime_onnx / tensorrt_plan backend runs the file; python: "
              "Triton's Python backend runs vitdeploy's Runtime (any artifact, TensorRT-RTX engines too).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "openvino", "tensorrt", "native", "python"]),
              default="auto", show_default=True,
              help="With --triton-backend python: the vitdeploy backend that runs the artifact.")
@click.option("--runtime", type=click.Choice(["auto", "onnxruntime", "openvino", "tensorrt"]), default=None,
              hidden=True)
@click.option("--execution-env", type=click.Path(exists=True, path_type=Path), default=None,
              help="With --triton-backend python: the serving venv (numpy<2, vitdeploy) Triton runs model.py in.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="With --triton-backend python and an ONNX: CPU threads per instance (instances x threads <= cores).")
@click.option("--max-batch", type=click.IntRange(min=1), default=None)
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--kind", type=click.Choice(["gpu", "cpu"]), default=None,
              help="Instance group [default: gpu; cpu for an ONNX on --triton-backend python].")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=100, show_default=True)
def triton(artifact: Path, repo: Path, name: str | None, triton_backend: str | None, backend: str,
           runtime: str | None, execution_env: Path | None, threads: int | None, max_batch: int | None,
           instances: int, kind: str | None, max_queue_delay_us: int) -> None:
    """Write a Triton Inference Server model repository for an engine or an ONNX.

    Native (default): Triton's onnxruntime_onnx or tensorrt_plan backend runs the file. --triton-backend
    python: Triton's Python backend runs vitdeploy's Runtime on it (TensorRT-RTX engines, OpenVINO, tune
    plans), with --backend choosing which, as in every other command."""
    from vitdeploy.serving.triton import write_triton_repo

    backend, triton_backend = _old_spellings(backend, triton_backend, runtime)
    out = write_triton_repo(artifact, repo, name, max_batch, instances, kind, max_queue_delay_us,
                            backend=backend, triton_backend=triton_backend, execution_env=execution_env,
                            runtime_options={"threads": threads} if threads else None)
    click.echo(f"wrote {out.config} and {out.model_file}; serve with: "
               f"tritonserver --model-repository {repo.resolve()}")
    if triton_backend == "python" and execution_env is None:
        click.echo("note: model.py runs in Triton's own Python unless --execution-env names a venv with "
                   "vitdeploy and numpy<2 (see docs/scale-out.md)")
