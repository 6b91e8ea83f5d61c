"""`vitdeploy deploy`."""

from __future__ import annotations

from pathlib import Path

import click

from vitdeploy.cli.app import main, make_console
from vitdeploy.cli.common import config_arg, model_options, quiet_exporter_logs, split_list


@main.command("deploy")
@click.option("--model", "-m", required=True, help="Checkpoint: preset, HF folder, weights file, Hub id.")
@model_options
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The bundle's folder (made if missing; a rerun there redoes only what changed).")
@click.option("--precision", "precisions", default=None,
              help="Comma-separated fp32,fp16,int8,fp8 [default: fp32,fp16, and int8 with --calib-dir].")
@click.option("--calib-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="INT8/FP8: folder of calibration images.")
@click.option("--calib-samples", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="DIR/CLASS/image files: top-1 of every artifact (an embedding model: kNN top-1, leave-one-out), "
              "and each against FP32.")
@click.option("--task", type=click.Choice(["classification", "embedding"]), default=None,
              help="What the artifacts answer [default: what the checkpoint is].")
@click.option("--normalize", is_flag=True, help="Embeddings: L2-normalized in the graph.")
@click.option("--compute-capability", default=None, help="TensorRT-RTX engine targets, e.g. sm89,sm120.")
@click.option("--trt", "flavour", type=click.Choice(["auto", "tensorrt", "rtx"]), default="auto", show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="Largest batch of the engines' profile and of Triton's batching.")
@click.option("--bench-iters", type=click.IntRange(min=2), default=50, show_default=True)
@click.option("--bench-warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--tune-iters", type=click.IntRange(min=3), default=10, show_default=True)
@click.option("--tune-seconds", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Least time each tune candidate is timed per batch size.")
@click.option("--wide", is_flag=True, help="Every column of the summary, whatever the terminal's width.")
def deploy_command(model: str, preset: str | None, config: str | None, seed: int | None, out: Path,
                   precisions: str | None, calib_dir: Path | None, calib_samples: int, data: Path | None,
                   task: str | None, normalize: bool, compute_capability: str | None, flavour: str, max_batch: int,
                   bench_iters: int, bench_warmup: int, tune_iters: int, tune_seconds: float, wide: bool) -> None:
    """One checkpoint -> a verified deployment bundle: ONNX files and engines, each verified; accuracy on --data;
    the fastest CPU path (tune) and its benchmark per artifact; a Triton repository; report.json and report.html."""
    from vitdeploy.deploy import DeployOptions, deploy

    quiet_exporter_logs()
    chosen = split_list(precisions) or ["fp32", "fp16", *(["int8"] if calib_dir else [])]
    opts = DeployOptions(precisions=tuple(chosen), calib_dir=calib_dir, calib_samples=calib_samples, data=data,
                         compute_capabilities=tuple(split_list(compute_capability)), trt=flavour, max_batch=max_batch,
                         config=config_arg(preset, config), seed=seed, bench_iters=bench_iters,
                         bench_warmup=bench_warmup, tune_iters=tune_iters, tune_seconds=tune_seconds, task=task,
                         normalize=normalize)
    result = deploy(model, out, opts, log=click.echo, progress=True)
    console = make_console()
    console.print(result.summary_table(console.width, wide))
    for line in result.summary_lines():
        click.echo(line)
    if result.failed:
        raise click.ClickException(f"{len(result.failed)} unit(s) failed (see above and report.html); "
                                   "the rest of the bundle is written")
