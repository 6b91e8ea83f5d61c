"""`vitdeploy export`."""

from __future__ import annotations

from pathlib import Path

import click

from vitdeploy.cli.app import main
from vitdeploy.cli.common import check_built, config_arg, has_gpu, model_options, quiet_exporter_logs, split_list


@main.command()
@click.option("--model", "-m", required=True, help="Preset, HF folder, weights file, Hub id.")
@model_options
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Static batch size.")
@click.option("--dynamic-batch", is_flag=True, help="Symbolic batch axis (all other dims static).")
@click.option("--opset", type=click.IntRange(17, 23), default=18, show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "fp8"]), default="fp32", show_default=True)
@click.option("--fp16-io", is_flag=True, help="FP16: make the input and output float16 too.")
@click.option("--attention", type=click.Choice(["auto", "float", "int8", "fp8"]), default="auto", show_default=True,
              help="INT8/FP8: Q/DQ on attention's products and Softmax in TensorRT's fused-attention layout; "
              "auto: quantized where the accuracy check passes, else float (the reason printed).")
@click.option("--calib-dir", type=click.Path(path_type=Path), default=None,
              help="INT8/FP8: folder of calibration images (searched recursively).")
@click.option("--calib-samples", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True)
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Folder of real images to add to the verification inputs.")
@click.option("--no-verify", is_flag=True, help="Skip the ONNX Runtime vs torch check.")
@click.option("--golden-images", type=click.Path(path_type=Path), default=None,
              help="Folder of images for the golden set the artifact carries (default: calibration images, "
              "else synthetic ones); `vitdeploy verify` checks it anywhere.")
@click.option("--uint8-input", is_flag=True,
              help="Put preprocessing in the graph: the model takes uint8 NHWC pixels (resized, not normalized).")
@click.option("--task", type=click.Choice(["classification", "embedding"]), default=None,
              help="classification (logits) or embedding (one vector per image: DINOv2's [CLS], CLIP's image_embeds, "
              "SigLIP's pooler_output); default: what the checkpoint is.")
@click.option("--normalize", is_flag=True, help="Embedding: L2-normalize the vectors in the graph.")
@click.option("--image-size", type=click.IntRange(14, 1024), default=None,
              help="Input side (DINOv2: its positions interpolated once, in float32, and baked into the graph).")
@click.option("--engine", "engine", is_flag=True, help="Also build a TensorRT engine (see `vitdeploy build`).")
@click.option("--compute-capability", default=None, help="With --engine: TensorRT-RTX targets, e.g. sm89,sm120.")
def export(model: str, preset: str | None, config: str | None, seed: int | None, output: Path, batch: int,
           dynamic_batch: bool, opset: int, precision: str, fp16_io: bool, attention: str, calib_dir: Path | None,
           calib_samples: int, calib_method: str, images: Path | None, no_verify: bool,
           golden_images: Path | None, uint8_input: bool, task: str | None, normalize: bool, image_size: int | None,
           engine: bool, compute_capability: str | None) -> None:
    """Export a checkpoint to ONNX (fixed image size) in FP32, FP16, INT8 or FP8, verified against torch."""
    from vitdeploy.exporters import ExportOptions, export_onnx

    quiet_exporter_logs()
    if engine and not compute_capability and not has_gpu():
        raise click.UsageError("--engine on a machine without a GPU needs --compute-capability (e.g. sm89)")
    if engine:  # refuse a target no TensorRT can build for before the export's work
        from vitdeploy.engines.tensorrt.build import BuildOptions, check_build_targets

        check_build_targets(BuildOptions(compute_capabilities=split_list(compute_capability)))
    opts = ExportOptions(
        batch=batch, dynamic_batch=dynamic_batch, opset=opset, precision=precision, fp16_io=fp16_io,
        attention=attention,
        calib_dir=calib_dir, calib_samples=calib_samples, calib_method=calib_method, verify_images=images,
        verify=not no_verify, seed=seed, uint8_input=uint8_input, golden_images=golden_images,
        task=task, normalize=normalize or None, image_size=image_size,
    )
    report = export_onnx(model, output, config=config_arg(preset, config), options=opts, progress=True)
    click.echo(report.render())
    if engine:
        from vitdeploy.engines.tensorrt.build import BuildOptions, build_engine

        engine_path = output.with_suffix(".engine")
        bopts = BuildOptions(compute_capabilities=split_list(compute_capability))
        breport = build_engine(output, engine_path, bopts, progress=True)
        click.echo(breport.render())
        check_built(engine_path)
