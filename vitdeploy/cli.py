"""The ``vitdeploy`` command line: thin click commands over the library.

Nothing heavy is imported at module level, so ``vitdeploy --help`` is instant.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from vitdeploy import __version__
from vitdeploy.errors import VitDeployError

# ValueError is not among them: a bug that raises one shows its traceback instead of passing as a user's mistake
_USER_ERRORS: tuple[type[BaseException], ...] = (VitDeployError, FileNotFoundError, FileExistsError)


class _Group(click.Group):
    """Turns a user mistake raised by the library into one line and exit 1 (traceback with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _USER_ERRORS as e:
            if os.environ.get("VITDEPLOY_DEBUG"):
                raise
            message = " ".join(str(e).split()) or type(e).__name__
            raise click.ClickException(message) from None


def _console() -> Any:
    import shutil

    from rich.console import Console

    console = Console(stderr=False, highlight=False)
    if not console.is_terminal:  # piped or captured: don't squeeze tables into 80 columns
        console = Console(stderr=False, highlight=False, width=max(shutil.get_terminal_size().columns, 160))
    return console


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vitdeploy")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def main(debug: bool) -> None:
    """Take a Vision Transformer from PyTorch to ONNX and TensorRT: export, build, verify, benchmark.

    Every exported artifact carries a golden set (images and torch FP32's logits). `verify` runs it on
    demand; `build` runs it on the engine where it can; predict, bench, eval and serve run it on first
    load on each machine (cached in <stem>.verified.json; --no-verify skips, --allow-drift overrides)."""
    if debug:
        os.environ["VITDEPLOY_DEBUG"] = "1"


# ---------------------------------------------------------------------------------------------
@main.command()
def info() -> None:
    """Versions of the libraries vitdeploy uses, GPUs, and which backends work here."""
    from vitdeploy.sysinfo import collect

    data = collect()
    con = _console()
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"vitdeploy {__version__}", show_header=True)
    table.add_column("component")
    table.add_column("status")
    for key, value in data["libraries"].items():
        table.add_row(key, value or "[dim]not installed[/dim]")
    table.add_row("cpu", f"{data['machine']['cpu']} ({data['machine']['cores']} cores)")
    gpus = data["machine"]["gpus"]
    table.add_row("cuda devices", ", ".join(gpus) if gpus else "none")
    from vitdeploy.sysinfo import TRT_FLAVOURS

    for g in data["gpu_flavours"]:
        runs = " or ".join(TRT_FLAVOURS[f] for f in g["trt_flavours"])
        note = f" [yellow]({escape(g['note'])})[/yellow]" if g["note"] else ""
        table.add_row(f"gpu {g['index']} engines", f"{escape(g['name'])} ({g['compute_capability']}): {runs}{note}")
    for name, ok in data["backends"].items():
        status = "[green]usable[/green]" if ok is True else f"[yellow]{escape(str(ok))}[/yellow]"
        table.add_row(f"backend {name}", status)
    con.print(table)


# ---------------------------------------------------------------------------------------------
def _model_options(f: Any) -> Any:
    f = click.option("--seed", type=int, default=None, help="Random-init seed for a preset.")(f)
    f = click.option("--config", "config", default=None,
                     help="config.json (or preset name) for bare timm/HF weight files.")(f)
    f = click.option("--preset", default=None, help="Architecture preset for bare weight files.")(f)
    return f


def _verify_options(f: Any) -> Any:
    f = click.option("--allow-drift", is_flag=True,
                     help="Run even when the artifact fails its golden set on this machine (for experts).")(f)
    f = click.option("--no-verify", is_flag=True,
                     help="Skip the first-load check of the artifact's golden set (run once per machine and "
                     "runtime, the verdict kept in <stem>.verified.json).")(f)
    return f


def _quiet_exporter_logs() -> None:
    """The library leaves logging and warnings alone; this process (the CLI) hides torch.onnx's notices
    ("torchvision is not installed"), the FP16 converter's per-weight clamping warnings and ONNX Runtime's
    quantizer advice ("consider pre-processing", for other graphs) unless --debug."""
    import contextlib
    import logging
    import warnings

    if not os.environ.get("VITDEPLOY_DEBUG"):
        # torch sets its loggers' levels when imported: set ours after that (without torch, the export
        # itself says what to install)
        with contextlib.suppress(ImportError):
            import torch  # noqa: F401
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module="onnxconverter_common")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        logging.getLogger().addFilter(_not_quantizer_advice)


def _not_quantizer_advice(record: Any) -> bool:
    return "pre-processing before quantization" not in record.getMessage()


def _config_arg(preset: str | None, config: str | None) -> str | None:
    if preset and config:
        raise click.UsageError("give --preset or --config, not both")
    return preset or config


@main.command()
@click.option("--model", "-m", required=True, help="Preset, HF folder, weights file, Hub id.")
@_model_options
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Static batch size.")
@click.option("--dynamic-batch", is_flag=True, help="Symbolic batch axis (all other dims static).")
@click.option("--opset", type=click.IntRange(17, 23), default=18, show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "fp8"]), default="fp32", show_default=True)
@click.option("--fp16-io", is_flag=True, help="FP16: make the input and output float16 too.")
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
@click.option("--engine", "engine", is_flag=True, help="Also build a TensorRT engine (see `vitdeploy build`).")
@click.option("--compute-capability", default=None, help="With --engine: TensorRT-RTX targets, e.g. sm89,sm120.")
def export(model: str, preset: str | None, config: str | None, seed: int | None, output: Path, batch: int,
           dynamic_batch: bool, opset: int, precision: str, fp16_io: bool, calib_dir: Path | None,
           calib_samples: int, calib_method: str, images: Path | None, no_verify: bool,
           golden_images: Path | None, uint8_input: bool, engine: bool, compute_capability: str | None) -> None:
    """Export a checkpoint to ONNX (fixed image size) in FP32, FP16, INT8 or FP8, verified against torch."""
    from vitdeploy.exporters import ExportOptions, export_onnx

    _quiet_exporter_logs()
    if engine and not compute_capability and not _has_gpu():
        raise click.UsageError("--engine on a machine without a GPU needs --compute-capability (e.g. sm89)")
    if engine:  # refuse a target no TensorRT can build for before the export's work
        from vitdeploy.engines.tensorrt_build import BuildOptions, check_build_targets

        check_build_targets(BuildOptions(compute_capabilities=_split(compute_capability)))
    opts = ExportOptions(
        batch=batch, dynamic_batch=dynamic_batch, opset=opset, precision=precision, fp16_io=fp16_io,
        calib_dir=calib_dir, calib_samples=calib_samples, calib_method=calib_method, verify_images=images,
        verify=not no_verify, seed=seed, uint8_input=uint8_input, golden_images=golden_images,
    )
    report = export_onnx(model, output, config=_config_arg(preset, config), options=opts, progress=True)
    click.echo(report.render())
    if engine:
        from vitdeploy.engines.tensorrt_build import BuildOptions, build_engine

        engine_path = output.with_suffix(".engine")
        bopts = BuildOptions(compute_capabilities=_split(compute_capability))
        breport = build_engine(output, engine_path, bopts, progress=True)
        click.echo(breport.render())
        _check_built(engine_path)


def _check_built(engine: Path) -> None:
    """The golden set on the engine just built, where it runs; the verdict goes into its sidecar."""
    from vitdeploy.verify import check_built_engine

    record = check_built_engine(engine)
    if record["verified"] and not record["passed"]:
        raise click.ClickException(f"{engine.name} drifts from its golden set on {record['gpu']}: {record['reason']}")
    click.echo(f"golden set: {record['summary'] if record['verified'] else record['reason']} (in the sidecar)")


def _has_gpu() -> bool:
    from vitdeploy.engines.tensorrt_build import current_gpu

    return current_gpu() is not None


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


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
@_model_options
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "fp8"]), default="fp16", show_default=True,
              help="When MODEL is a checkpoint: the precision to export first.")
@click.option("--calib-dir", type=click.Path(path_type=Path), default=None)
def build(model: str, output: Path | None, flavour: str, batch: int | None, min_batch: int | None,
          opt_batch: int | None, max_batch: int | None, compute_capability: str | None, workspace: int | None,
          opt_level: int, timing_cache: Path | None, tf32: bool, hardware_compat: str | None,
          version_compatible: bool, profiling_verbosity: str, preset: str | None, config: str | None,
          seed: int | None, precision: str, calib_dir: Path | None) -> None:
    """Build a TensorRT engine from an ONNX (or from a checkpoint: export, then build)."""
    from vitdeploy.engines.tensorrt_build import BuildOptions, build_engine, check_build_targets

    opts = BuildOptions(
        flavour=flavour, batch=batch, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
        compute_capabilities=_split(compute_capability), workspace_mib=workspace, opt_level=opt_level,
        timing_cache=timing_cache, tf32=tf32, hardware_compat=hardware_compat, version_compatible=version_compatible,
        profiling_verbosity=profiling_verbosity,
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
        click.echo(export_onnx(model, onnx_path, config=_config_arg(preset, config), options=eopts,
                               progress=True).render())
        source = onnx_path
    report = build_engine(source, output or source.with_suffix(".engine"), opts, progress=True)
    click.echo(report.render())
    _check_built(report.engine)


@main.command()
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def inspect(artifact: Path, as_json: bool) -> None:
    """Show an ONNX's metadata, op histogram and Q/DQ coverage, or an engine's sidecar, I/O and layers."""
    from vitdeploy.inspection import inspect_artifact

    info = inspect_artifact(artifact)
    click.echo(json.dumps(info, indent=2) if as_json else _render_inspect(info))


def _render_inspect(info: dict[str, Any]) -> str:
    lines = [f"{info['path']} ({info['kind']}, {info['bytes'] / 1e6:.1f} MB)"]
    for key, value in info.items():
        if key in ("path", "kind", "bytes", "model"):
            continue
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        lines.append(f"  {key}: {value}")
    model = info.get("model") or {}
    if model:
        cfg = model.get("config", {})
        lines.append(f"  model: {cfg.get('hidden_size')}x{cfg.get('num_hidden_layers')} layers, "
                     f"{len(model.get('labels', []))} labels, precision {model.get('precision')}, "
                     f"from {model.get('source')} (vitdeploy {model.get('version')})")
    return "\n".join(lines)


def _open(artifact: str, backend: str, threads: int | None = None, dtype: str | None = None,
          device: str = "auto", **options: Any) -> Any:
    from vitdeploy.engines import artifact_kind
    from vitdeploy.verify import open_verified

    kind = artifact_kind(artifact)
    if threads and backend in ("onnxruntime", "openvino", "torch", "auto") and kind != "engine":
        options["threads"] = threads
    if dtype and (backend == "torch" or (backend == "auto" and kind == "checkpoint")):
        options["dtype"] = dtype
    if dtype and backend == "openvino":
        options["precision_hint"] = dtype
    return open_verified(artifact, backend=backend, device=device, **options)


def _ints(value: str, what: str = "batch sizes") -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"{what} must be positive integers")
    return out


@main.command()
@click.argument("artifacts", nargs=-1)
@click.option("--url", default=None, help="Load-test a KServe v2 server (vitdeploy serve, Triton, KServe) instead "
              "of artifacts: http://HOST:PORT, with --model and --concurrency.")
@click.option("--model", "served_model", default=None, help="--url: the served model's name.")
@click.option("--concurrency", default="1,4,16,64", show_default=True, help="--url: comma-separated client counts.")
@click.option("--requests", type=click.IntRange(min=1), default=200, show_default=True,
              help="--url: requests per concurrency level.")
@click.option("--time-limit", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="--url: seconds per concurrency level at most.")
@click.option("--uint8", is_flag=True, help="--url: the model takes uint8 pixels (an --uint8-input export).")
@click.option("--reference", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="--url: check every answer against this artifact's logits, computed here.")
@click.option("--rows", type=click.IntRange(min=2), default=32, show_default=True,
              help="--url: distinct inputs the requests cycle through.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=1e-3, show_default=True,
              help="--url: largest difference (relative to the largest logit, at least 1) of a matching answer.")
@click.option("--backend", "backends", default="auto", show_default=True,
              help="Comma-separated: auto, onnxruntime, openvino, torch, tensorrt (each runs every artifact it can).")
@click.option("--dtype", "dtypes", default=None, help="torch: fp32,bf16,fp16; openvino: f32,bf16 hints.")
@click.option("--batch", "batch", default="1,8", show_default=True, help="Comma-separated batch sizes.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--iters", type=click.IntRange(min=2), default=50, show_default=True)
@click.option("--duration", type=click.FloatRange(min=0.1), default=None, help="Seconds per run instead of --iters.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: all cores).")
@click.option("--device", default="auto", show_default=True)
@click.option("--cuda-graph", is_flag=True, help="TensorRT: capture one CUDA graph per batch size.")
@click.option("--torch-compile", is_flag=True, help="torch: run through torch.compile.")
@click.option("--qdq-activations", default="auto", show_default=True,
              type=click.Choice(["auto", "int8", "uint8"]),
              help="ONNX Runtime, INT8 files: run activation Q/DQ as written (int8) or as the equivalent "
                   "uint8 (auto: uint8 on x86 CPUs, where it is the fast integer path).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--wide", is_flag=True, help="Every column, whatever the terminal's width.")
@_verify_options
def bench(artifacts: tuple[str, ...], url: str | None, served_model: str | None, concurrency: str, requests: int,
          time_limit: float, uint8: bool, reference: Path | None, rows: int, tolerance: float,
          backends: str, dtypes: str | None, batch: str, warmup: int, iters: int,
          duration: float | None, threads: int | None, device: str, cuda_graph: bool, torch_compile: bool,
          qdq_activations: str, json_path: Path | None,
          csv_path: Path | None, plot_path: Path | None, wide: bool, no_verify: bool, allow_drift: bool) -> None:
    """Latency and throughput of artifacts side by side (ONNX, engines, checkpoints via torch); with --url,
    a load test of a KServe v2 server at each --concurrency, every answer checked for its own rows."""
    if url or served_model:
        if artifacts or not (url and served_model):
            raise click.UsageError("--url takes --model NAME and no artifacts; artifacts take no --url")
        clients = _ints(concurrency, "--concurrency: client counts")
        return _bench_url(url, served_model, clients, requests, time_limit, uint8, reference, rows, tolerance,
                          json_path, plot_path, wide)
    if not artifacts:
        raise click.UsageError("give artifacts to benchmark, or --url and --model to load-test a server")
    from vitdeploy.bench import run_bench
    from vitdeploy.engines import BACKENDS, artifact_kind

    batches = _ints(batch)
    wanted = _split(backends) or ["auto"]
    for b in wanted:
        if b not in BACKENDS:
            raise click.BadParameter(f"unknown backend {b!r}: choose from {', '.join(BACKENDS)}")
    from vitdeploy.sysinfo import usable_cpus

    takes = {"onnx": ("onnxruntime", "openvino"), "engine": ("tensorrt",), "checkpoint": ("torch",)}
    runtimes = []
    for artifact in artifacts:
        kind = artifact_kind(artifact)
        chosen = [b for b in wanted if b == "auto" or b in takes[kind]] or ["auto"]
        for b in chosen:
            for d in (_split(dtypes) or [None]) if b in ("torch", "openvino") or (
                    b == "auto" and kind == "checkpoint") else [None]:
                extra = {"cuda_graph": cuda_graph} if kind == "engine" and cuda_graph else {}
                if kind == "checkpoint" and torch_compile:
                    extra["compile"] = True
                if kind == "onnx" and b in ("auto", "onnxruntime") and qdq_activations != "auto":
                    extra["qdq_activations"] = qdq_activations
                extra.update(verify=not no_verify, allow_drift=allow_drift)
                # torch keeps its own thread default otherwise: every CPU backend gets the same count
                t = threads or (usable_cpus() if kind == "checkpoint" else None)
                runtimes.append((Path(artifact).name,
                                 lambda a=artifact, b=b, t=t, d=d, e=extra: _open(a, b, t, d, device, **e)))
    report = run_bench(runtimes, batches, warmup, None if duration else iters, duration, progress=True)
    console = _console()
    console.print(report.table(console.width, wide))
    m = report.machine
    click.echo(f"machine: {m['cpu']} ({m['cores']} cores; ISA {' '.join(m['cpu_flags']) or '-'})"
               f"{'; GPUs: ' + ', '.join(m['gpus']) if m['gpus'] else ''}")
    flagged = [r for r in report.results if r.batching != "native"]
    if flagged:
        click.echo(f"note: {len(flagged)} row(s) ran a static-batch artifact at another batch size (padded or "
                   "split, see the batch column): their figures are not that batch's")
    if json_path:
        report.write_json(json_path)
    if csv_path:
        report.write_csv(csv_path)
    if plot_path:
        report.write_plot(plot_path)


def _bench_url(url: str, model: str, concurrency: list[int], requests: int, time_limit: float, uint8: bool,
               reference: Path | None, rows: int, tolerance: float, json_path: Path | None, plot_path: Path | None,
               wide: bool) -> None:
    from vitdeploy.serving import loadtest

    report = loadtest.run(url, model, concurrency, requests, uint8=uint8, time_limit=time_limit, rows=rows,
                          reference=reference, tolerance=tolerance)
    console = _console()
    console.print(report.table(console.width, wide))
    m = report.machine
    click.echo(f"client machine: {m['cpu']} ({m['cores']} cores; ISA {' '.join(m['cpu_flags']) or '-'})")
    if report.unsent:
        click.echo(f"note: {report.unsent} request(s) not sent: a level reached --time-limit {time_limit:g} s")
    if json_path:
        report.write_json(json_path)
    if plot_path:
        report.write_plot(plot_path)
    if not report.ok:
        raise click.ClickException("answers not checked out: " + " | ".join(report.problems))


@main.command()
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--batch", type=click.IntRange(min=2), default=8, show_default=True,
              help="Throughput batch: the plan's second choice runs batches from this size up.")
@click.option("--threads", "threads", default=None,
              help="Comma-separated CPU thread counts to try (default: physical cores and all CPUs).")
@click.option("--images", type=click.Path(exists=True, path_type=Path), default=None,
              help="Folder of real images to add to the accuracy guard's inputs.")
@click.option("--iters", type=click.IntRange(min=3), default=10, show_default=True, help="Timed runs at batch 1.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write every candidate's figures here too.")
@click.option("--wide", is_flag=True, help="Every column, whatever the terminal's width.")
def tune(artifact: Path, batch: int, threads: str | None, images: Path | None, iters: int,
         json_path: Path | None, wide: bool) -> None:
    """Measure every CPU path for an ONNX here; write the fastest that passes the accuracy guard to ARTIFACT's
    .tune.json, which bench/predict/eval/serve then use on this machine (--backend overrides it)."""
    from vitdeploy.tune import tune as run_tune

    report = run_tune(artifact, batch=batch, threads=_ints(threads) if threads else None, images=images,
                      iters=iters, progress=True)
    console = _console()
    console.print(report.table(console.width, wide))
    click.echo(report.summary())
    if json_path:
        from vitdeploy.io import atomic_write_bytes

        atomic_write_bytes(json_path, json.dumps(report.to_dict(), indent=2).encode())


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "-m", required=True, help="ONNX, engine or checkpoint.")
@click.option("--backend", default="auto", show_default=True)
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@_verify_options
def predict(images: tuple[Path, ...], model: str, backend: str, top_k: int, as_json: bool, no_verify: bool,
            allow_drift: bool) -> None:
    """Classify image files; preprocessing and labels come from the artifact's metadata."""
    from vitdeploy.verify import open_verified

    with open_verified(model, backend=backend, verify=not no_verify, allow_drift=allow_drift) as rt:
        click.echo(f"running {rt.describe()}", err=True)
        results = rt.predict_images(list(images), top_k=top_k)
    if as_json:
        payload = [{"image": str(p), "top_k": [{"label": lab, "probability": prob} for lab, prob in r]}
                   for p, r in zip(images, results, strict=True)]
        click.echo(json.dumps(payload, indent=2))
        return
    for path, r in zip(images, results, strict=True):
        click.echo(f"{path}: " + ", ".join(f"{lab} {prob:.3f}" for lab, prob in r))


@main.command()
@click.argument("a")
@click.argument("b")
@click.option("--backend-a", default="auto", show_default=True)
@click.option("--backend-b", default="auto", show_default=True)
@click.option("--inputs", type=click.IntRange(min=1), default=8, show_default=True, help="Random inputs.")
@click.option("--images", type=click.Path(path_type=Path), default=None, help="Folder of real images to add.")
@click.option("--atol", type=float, default=1e-3, show_default=True)
@click.option("--rtol", type=float, default=1e-3, show_default=True, help="Times the logits' scale.")
@click.option("--json", "as_json", is_flag=True)
def compare(a: str, b: str, backend_a: str, backend_b: str, inputs: int, images: Path | None, atol: float,
            rtol: float, as_json: bool) -> None:
    """Run the same inputs through two artifacts or backends (Polygraphy-style); fail past --atol/--rtol."""
    import numpy as np

    from vitdeploy.engines import open_runtime
    from vitdeploy.metrics import compare_logits

    with open_runtime(a, backend=backend_a) as ra, open_runtime(b, backend=backend_b) as rb:
        if ra.spec.shape != rb.spec.shape:
            raise click.ClickException(f"input shapes differ: {ra.spec.shape} vs {rb.spec.shape}")
        x = np.random.default_rng(0).standard_normal((inputs, *ra.spec.shape), dtype=np.float32)
        if images is not None:
            from vitdeploy.preprocess import Preprocessing, find_images, load_images

            if ra.metadata is None:
                raise click.ClickException(f"{a} has no preprocessing metadata for --images")
            prep = Preprocessing.from_dict(ra.metadata.preprocessing)
            x = np.concatenate([x, load_images(find_images(images), prep)])
        result = compare_logits(ra.infer(x), rb.infer(x))
    ok = result.max_abs <= atol + rtol * result.scale
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "a": ra.describe(), "b": rb.describe(), "pass": ok}, indent=2))
    else:
        click.echo(f"A: {ra.describe()}\nB: {rb.describe()}\n{result.summary()}")
    if not ok:
        raise click.ClickException(f"outputs differ beyond tolerance: max abs {result.max_abs:.3g} > "
                                   f"atol {atol:g} + rtol {rtol:g} x scale {result.scale:.3g}")
    if not as_json:
        click.echo("PASSED")


def _serve_limit_options(f: Any) -> Any:
    """`serve`'s options for clients it does not know: memory, connections, timeouts, a key and TLS."""
    options = [
        click.option("--memory-budget", type=click.IntRange(min=1), default=None,
                     help="MiB of request work at once (bodies, parsed JSON, decoded images); requests wait for "
                     "room or get 503, one that can never fit gets 413 [default: room for one max-batch JSON "
                     "request, at least 256]."),
        click.option("--limit-concurrency", type=click.IntRange(min=1), default=512, show_default=True,
                     help="Connections and requests at once; beyond it uvicorn answers 503."),
        click.option("--keep-alive-timeout", type=click.IntRange(min=1), default=5, show_default=True,
                     help="Seconds an idle kept-alive connection stays open."),
        click.option("--header-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
                     show_default=True, help="Seconds a client has to send a request head, then it is closed."),
        click.option("--body-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
                     show_default=True, help="Seconds without a byte of the body before the request is dropped "
                     "(408); --request-timeout bounds the whole upload."),
        click.option("--api-key", envvar="VITDEPLOY_API_KEY", default=None,
                     help="Every request must send Authorization: Bearer KEY (also from $VITDEPLOY_API_KEY; a "
                     "command line is visible to other users: prefer --api-key-file)."),
        click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                     help="File holding the API key (its first line)."),
        click.option("--public-probes", is_flag=True,
                     help="With a key: /healthz, /readyz, /metrics and /v2/health/* answer without it."),
        click.option("--ssl-certfile", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Serve HTTPS with this certificate (PEM; with --ssl-keyfile)."),
        click.option("--ssl-keyfile", type=click.Path(exists=True, dir_okay=False), default=None),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _serve_limits(host: str, memory_budget: int | None, limit_concurrency: int, keep_alive_timeout: int,
                  header_timeout: float, body_timeout: float, api_key: str | None, api_key_file: Path | None,
                  public_probes: bool, ssl_certfile: str | None,
                  ssl_keyfile: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The options above -> create_app's and run_server's keyword arguments; warns when the server is
    reachable from other machines without a key or TLS."""
    from vitdeploy.serving.limits import exposure_warning

    if api_key_file is not None:
        api_key = (api_key_file.read_text().splitlines() or [""])[0].strip()
        if not api_key:
            raise click.BadParameter(f"{api_key_file} is empty: put the key on its first line",
                                     param_hint="--api-key-file")
    if bool(ssl_certfile) != bool(ssl_keyfile):
        raise click.UsageError("--ssl-certfile and --ssl-keyfile go together")
    if (warning := exposure_warning(host, bool(api_key), bool(ssl_certfile))) is not None:
        click.echo(f"warning: {warning}", err=True)
    app = {"memory_budget": memory_budget * 2**20 if memory_budget else None, "body_timeout": body_timeout,
           "api_key": api_key or None, "public_probes": public_probes}
    server = {"limit_concurrency": limit_concurrency, "keep_alive": keep_alive_timeout,
              "header_timeout": header_timeout, "ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile}
    return app, server


def _serve_limits_env(app: dict[str, Any], server: dict[str, Any]) -> dict[str, str]:
    """The same settings for --workers processes (app_from_env and the h11 protocol read them)."""
    return {"VITDEPLOY_SERVE_MEMORY_BUDGET": str(app["memory_budget"] or ""),
            "VITDEPLOY_SERVE_BODY_TIMEOUT": str(app["body_timeout"]),
            "VITDEPLOY_SERVE_API_KEY": app["api_key"] or "",
            "VITDEPLOY_SERVE_PUBLIC_PROBES": "1" if app["public_probes"] else "",
            "VITDEPLOY_SERVE_HEADER_TIMEOUT": str(server["header_timeout"])}


@main.command()
@click.option("--model", "-m", required=True, help="ONNX file or TensorRT engine.")
@click.option("--backend", default="auto", show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback by default.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--max-delay-ms", type=click.FloatRange(min=0), default=2.0, show_default=True)
@click.option("--max-queue", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--name", default=None, help="Model name on the KServe v2 routes (/v2/models/NAME); default the "
              "file's stem.")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="Seconds a request may take, queue and inference together (then 504).")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=None,
              help="/v1/classify refuses larger images (413), checked from the header before decoding "
              "[default: 256x the model's input area, within 4-40 MP].")
@click.option("--drain-grace", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="On Ctrl-C/SIGTERM, seconds that readiness reports draining (requests still served) "
              "before the server stops accepting.")
@_serve_limit_options
@_verify_options
def serve(model: str, backend: str, host: str, port: int, max_batch: int, max_delay_ms: float, max_queue: int,
          workers: int, name: str | None, request_timeout: float, max_image_pixels: int | None, drain_grace: float,
          no_verify: bool, allow_drift: bool, **limits: Any) -> None:
    """Serve an ONNX or engine over HTTP with dynamic batching: /v1/classify, /v1/logits, /metrics, and the
    KServe v2 / Triton protocol (/v2/models/NAME/infer) that tritonclient speaks."""
    try:
        import uvicorn
    except ImportError:
        raise click.ClickException("serving needs the serve extra: pip install 'vitdeploy[serve]'") from None
    app_limits, server_limits = _serve_limits(host, **limits)
    from vitdeploy.engines import artifact_kind

    if artifact_kind(model) == "checkpoint":
        raise click.ClickException(f"serve takes an ONNX file or an engine, not a checkpoint: "
                                   f"vitdeploy export --model {model} --output model.onnx")
    name = name or Path(model).stem
    from vitdeploy.verify import open_verified, warm_up

    if workers > 1:
        if not no_verify:  # checked once here (the verdict is cached for this machine), not in every worker
            open_verified(model, backend=backend, allow_drift=allow_drift).close()
        os.environ.update({"VITDEPLOY_SERVE_MODEL": model, "VITDEPLOY_SERVE_BACKEND": backend,
                           "VITDEPLOY_SERVE_MAX_BATCH": str(max_batch),
                           "VITDEPLOY_SERVE_MAX_DELAY_MS": str(max_delay_ms),
                           "VITDEPLOY_SERVE_MAX_QUEUE": str(max_queue), "VITDEPLOY_SERVE_NAME": name,
                           "VITDEPLOY_SERVE_REQUEST_TIMEOUT": str(request_timeout),
                           "VITDEPLOY_SERVE_MAX_IMAGE_PIXELS": str(max_image_pixels or ""),
                           **_serve_limits_env(app_limits, server_limits)})
        if drain_grace > 0:
            click.echo("note: with --workers > 1 uvicorn's supervisor stops the workers on Ctrl-C without the "
                       "--drain-grace period; run one worker per container to drain behind a load balancer", err=True)
        uvicorn.run("vitdeploy.serving.server:app_from_env", factory=True, host=host, port=port, workers=workers,
                    http="vitdeploy.serving.http11:GuardedH11Protocol",
                    limit_concurrency=server_limits["limit_concurrency"],
                    timeout_keep_alive=server_limits["keep_alive"], ssl_certfile=server_limits["ssl_certfile"],
                    ssl_keyfile=server_limits["ssl_keyfile"])
        return
    from vitdeploy.serving.server import create_app, run_server

    with open_verified(model, backend=backend, verify=not no_verify, allow_drift=allow_drift) as rt:
        warm_up(rt, (1, max_batch))  # the smallest and largest batch the batcher forms, before it listens
        scheme = "https" if server_limits["ssl_certfile"] else "http"
        click.echo(f"serving {rt.describe()} as {name!r} on {scheme}://{host}:{port}")
        app = create_app(rt, max_batch, max_delay_ms, max_queue, request_timeout=request_timeout,
                         max_image_pixels=max_image_pixels, model_name=name, **app_limits)
        run_server(app, host, port, drain_grace=drain_grace, **server_limits)



@main.command()
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--repo", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default=None)
@click.option("--backend", "triton_backend", type=click.Choice(["native", "python"]), default="native",
              show_default=True, help="native: Triton's onnxruntime_onnx / tensorrt_plan backend runs the file; "
              "python: Triton's Python backend runs vitdeploy's Runtime (any artifact, TensorRT-RTX engines too).")
@click.option("--runtime", type=click.Choice(["auto", "onnxruntime", "openvino", "tensorrt"]), default="auto",
              show_default=True, help="With --backend python: the vitdeploy backend that runs the artifact.")
@click.option("--execution-env", type=click.Path(exists=True, path_type=Path), default=None,
              help="With --backend python: the serving venv (numpy<2, vitdeploy) Triton runs model.py in.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="With --backend python and an ONNX: CPU threads per instance (instances x threads <= cores).")
@click.option("--max-batch", type=click.IntRange(min=1), default=None)
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--kind", type=click.Choice(["gpu", "cpu"]), default=None,
              help="Instance group [default: gpu; cpu for an ONNX on --backend python].")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=100, show_default=True)
def triton(artifact: Path, repo: Path, name: str | None, triton_backend: str, runtime: str,
           execution_env: Path | None, threads: int | None, max_batch: int | None, instances: int,
           kind: str | None, max_queue_delay_us: int) -> None:
    """Write a Triton Inference Server model repository for an engine or an ONNX.

    Native (default): Triton's onnxruntime_onnx or tensorrt_plan backend runs the file. --backend python:
    Triton's Python backend runs vitdeploy's Runtime on it (TensorRT-RTX engines, OpenVINO, tune plans)."""
    from vitdeploy.serving.triton import write_triton_repo

    out = write_triton_repo(artifact, repo, name, max_batch, instances, kind, max_queue_delay_us,
                            backend=triton_backend, runtime=runtime, execution_env=execution_env,
                            runtime_options={"threads": threads} if threads else None)
    click.echo(f"wrote {out.config} and {out.model_file}; serve with: "
               f"tritonserver --model-repository {repo.resolve()}")
    if triton_backend == "python" and execution_env is None:
        click.echo("note: model.py runs in Triton's own Python unless --execution-env names a venv with "
                   "vitdeploy and numpy<2 (see README, Scale-out)")


@main.command("verify")
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--backend", "backends", default="auto", show_default=True,
              help="Comma-separated: auto (the tune plan when one holds here), onnxruntime, openvino, tensorrt.")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--write-tensors", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write the golden set preprocessed (golden_input.bin, golden_logits.bin, "
              "golden_tensors.json) to this folder, for programs without an image decoder (the C++ example).")
def verify_command(artifact: Path, backends: str, device: str, as_json: bool, write_tensors: Path | None) -> None:
    """Run ARTIFACT's golden set (images and torch FP32's logits, stored at export) through decode, the
    artifact's preprocessing and the runtime; a row per image; exit 1 on drift.

    The same check runs after `build` (where the engine runs) and on first load by predict, bench, eval and
    serve (once per machine and runtime; --no-verify skips it, --allow-drift runs despite a failure)."""
    from vitdeploy.verify import verify_artifact, write_golden_tensors

    if write_tensors is not None:
        click.echo(f"wrote {write_golden_tensors(artifact, write_tensors)}", err=as_json)
    reports = [verify_artifact(artifact, backend=b, device=device) for b in _split(backends) or ["auto"]]
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in reports], indent=2))
    for r in reports:
        if r.skipped:
            click.echo(f"{artifact.name}: not verified here: {r.skipped}", err=as_json)
        for table in [] if as_json else r.table():
            _console().print(table)
    failed = [r for r in reports if r.failed]
    if failed:
        raise click.ClickException(f"drift: {failed[0].reason()}")
    if not as_json and any(r.passed for r in reports):
        click.echo("PASSED")


@main.command("eval")
@click.option("--model", "-m", required=True, help="ONNX file, engine, or checkpoint (preset, folder, ...).")
@_model_options
@click.option("--data", required=True, type=click.Path(path_type=Path), help="DIR/CLASS/image files.")
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--backend", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@_verify_options
def evaluate(model: str, preset: str | None, config: str | None, seed: int | None, data: Path, batch: int,
             backend: str, as_json: bool, no_verify: bool, allow_drift: bool) -> None:
    """Top-1 accuracy on an image folder with one sub-folder per class name."""
    from vitdeploy.evaluate import evaluate_folder
    from vitdeploy.verify import open_verified

    with open_verified(model, backend=backend, config=_config_arg(preset, config), seed=seed, verify=not no_verify,
                       allow_drift=allow_drift) as rt:
        described = rt.describe()
        result = evaluate_folder(rt, data, batch_size=batch)
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "runtime": described}, indent=2))
    else:
        click.echo(f"top-1 accuracy {result.accuracy * 100:.2f}% ({result.correct}/{result.total}) "
                   f"on {data} with {described}")


@main.command("deploy")
@click.option("--model", "-m", required=True, help="Checkpoint: preset, HF folder, weights file, Hub id.")
@_model_options
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The bundle's folder (made if missing; a rerun there redoes only what changed).")
@click.option("--precision", "precisions", default=None,
              help="Comma-separated fp32,fp16,int8,fp8 [default: fp32,fp16, and int8 with --calib-dir].")
@click.option("--calib-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="INT8/FP8: folder of calibration images.")
@click.option("--calib-samples", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="DIR/CLASS/image files: top-1 accuracy of every artifact.")
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
                   compute_capability: str | None, flavour: str, max_batch: int, bench_iters: int,
                   bench_warmup: int, tune_iters: int, tune_seconds: float, wide: bool) -> None:
    """One checkpoint -> a verified deployment bundle: ONNX files and engines, each verified; accuracy on --data;
    the fastest CPU path (tune) and its benchmark per artifact; a Triton repository; report.json and report.html."""
    from vitdeploy.deploy import DeployOptions, deploy

    _quiet_exporter_logs()
    chosen = _split(precisions) or ["fp32", "fp16", *(["int8"] if calib_dir else [])]
    opts = DeployOptions(precisions=tuple(chosen), calib_dir=calib_dir, calib_samples=calib_samples, data=data,
                         compute_capabilities=tuple(_split(compute_capability)), trt=flavour, max_batch=max_batch,
                         config=_config_arg(preset, config), seed=seed, bench_iters=bench_iters,
                         bench_warmup=bench_warmup, tune_iters=tune_iters, tune_seconds=tune_seconds)
    result = deploy(model, out, opts, log=click.echo, progress=True)
    console = _console()
    console.print(result.summary_table(console.width, wide))
    for line in result.summary_lines():
        click.echo(line)
    if result.failed:
        raise click.ClickException(f"{len(result.failed)} unit(s) failed (see above and report.html); "
                                   "the rest of the bundle is written")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
