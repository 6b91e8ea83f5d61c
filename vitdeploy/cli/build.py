"""`vitdeploy build`."""

from __future__ import annotations

from pathlib import Path

import click

from vitdeploy.cli.app import main
from vitdeploy.cli.common import check_built, config_arg, model_options, split_list


@main.command()
@click.argument("model")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Engine file (default: MODEL with .engine). The JSON sidecar goes beside it.")
@click.option("--trt", "flavour", type=click.Choice(["auto", "tensorrt", "rtx"]), default="auto", show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Static profile (min=opt=max).")
@click.option("--min-batch", type=click.IntRange(min=1), default=None)
@click.option("--opt-batch", type=click.IntRange(min=1), default=None)
@click.option("--max-batch", type=click.IntRange(min=1), default=None)
@click.option("--compute-capability", default=None, help="TensorRT-RTX targets, e.g. sm89,sm120.")
@click.option("--workspace", type=click.IntRange(min=1), default=None, help="Workspace limit in MiB.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True)
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--tf32/--no-tf32", default=True, show_default=True)
@click.option("--hardware-compat", type=click.Choice(["ampere+", "same-cc"]), default=None)
@click.option("--version-compatible", is_flag=True,
              help="Full TensorRT only: the engine also runs on later TensorRT releases (10 -> 11).")
@click.option("--profiling-verbosity", type=click.Choice(["layer_names_only", "detailed", "none"]),
              default="layer_names_only", show_default=True,
              help="What the engine keeps for `inspect`; detailed slows every inference.")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Execution contexts the engine will run at once (`serve --instances`, open_runtime(instances=)): "
                   "a dynamic-batch engine gets one optimization profile each, as TensorRT requires.")
@model_options
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "fp8"]), default="fp16", show_default=True,
              help="When MODEL is a checkpoint: the precision to export first.")
@click.option("--calib-dir", type=click.Path(path_type=Path), default=None)
def build(model: str, output: Path | None, flavour: str, batch: int | None, min_batch: int | None,
          opt_batch: int | None, max_batch: int | None, compute_capability: str | None, workspace: int | None,
          opt_level: int, timing_cache: Path | None, tf32: bool, hardware_compat: str | None,
          version_compatible: bool, profiling_verbosity: str, instances: int, preset: str | None, config: str | None,
          seed: int | None, precision: str, calib_dir: Path | None) -> None:
    """Build a TensorRT engine from an ONNX (or from a checkpoint: export, then build)."""
    from vitdeploy.engines.tensorrt.build import BuildOptions, build_engine, check_build_targets

    opts = BuildOptions(
        flavour=flavour, batch=batch, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
        compute_capabilities=split_list(compute_capability), workspace_mib=workspace, opt_level=opt_level,
        timing_cache=timing_cache, tf32=tf32, hardware_compat=hardware_compat, version_compatible=version_compatible,
        profiling_verbosity=profiling_verbosity, instances=instances,
    )
    check_build_targets(opts)  # a flavour/target that cannot work is refused before any export or build
    source = Path(model)
    if source.suffix != ".onnx":
        from vitdeploy.exporters import ExportOptions, export_onnx

        if output is None:
            raise click.UsageError("building from a checkpoint needs --output model.engine")
        onnx_path = output.with_suffix(".onnx")
        eopts = ExportOptions(dynamic_batch=batch is None, batch=batch or 1, precision=precision,
                              calib_dir=calib_dir, seed=seed)
        click.echo(export_onnx(model, onnx_path, config=config_arg(preset, config), options=eopts,
                               progress=True).render())
        source = onnx_path
    from vitdeploy.inspection import attention_summary

    click.echo(attention_summary(source))  # the static fused-attention check, as `inspect` reports it
    report = build_engine(source, output or source.with_suffix(".engine"), opts, progress=True)
    click.echo(report.render())
    check_built(report.engine)
