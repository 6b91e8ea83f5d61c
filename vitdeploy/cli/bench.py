"""`vitdeploy bench`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vitdeploy.cli.app import main, make_console
from vitdeploy.cli.common import (
    int_list,
    json_option,
    open_artifact,
    require_verified_option,
    split_list,
    verify_options,
    write_json,
)


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
@click.option("--processes", default="auto", show_default=True,
              help="--url: client processes a level's clients are split over (auto: one per 8 clients, at most "
                   "one per CPU; one Python process's clients saturate its GIL near 2,000 requests/s).")
@click.option("--reference", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="--url: check every answer against this artifact's logits, computed here.")
@click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="--url: a file holding the server's API key (its first line), sent as Authorization: Bearer; "
              "without it, $VITDEPLOY_API_KEY (what `vitdeploy serve` reads).")
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
@json_option
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--wide", is_flag=True, help="Every column, whatever the terminal's width.")
@verify_options
@require_verified_option
def bench(artifacts: tuple[str, ...], url: str | None, served_model: str | None, concurrency: str, requests: int,
          time_limit: float, uint8: bool, processes: str, reference: Path | None, api_key_file: Path | None,
          rows: int, tolerance: float,
          backends: str, dtypes: str | None, batch: str, warmup: int, iters: int,
          duration: float | None, threads: int | None, device: str, cuda_graph: bool, torch_compile: bool,
          qdq_activations: str, json_out: str | None,
          csv_path: Path | None, plot_path: Path | None, wide: bool, no_verify: bool, allow_drift: bool,
          require_verified: bool) -> None:
    """Latency and throughput of artifacts side by side (ONNX, engines, checkpoints via torch); with --url,
    a load test of a KServe v2 server at each --concurrency, every answer checked for its own rows."""
    if url or served_model:
        if artifacts or not (url and served_model):
            raise click.UsageError("--url takes --model NAME and no artifacts; artifacts take no --url")
        if require_verified:
            raise click.UsageError("--require-verified checks artifacts opened here; with --url, ask the server "
                                   "(its /readyz says \"verified\")")
        clients = int_list(concurrency, "--concurrency: client counts")
        return _bench_url(url, served_model, clients, requests, time_limit, uint8, reference, rows, tolerance,
                          json_out, plot_path, wide, _processes(processes), _api_key(api_key_file))
    if not artifacts:
        raise click.UsageError("give artifacts to benchmark, or --url and --model to load-test a server")
    from vitdeploy.bench import run_bench

    if require_verified:
        _require_golden(artifacts, no_verify)
    options = {"cuda_graph": cuda_graph, "compile": torch_compile, "qdq_activations": qdq_activations,
               "verify": not no_verify, "allow_drift": allow_drift, "require_verified": require_verified}
    runtimes = _bench_runtimes(artifacts, backends, dtypes, threads, device, options)
    report = run_bench(runtimes, int_list(batch), warmup, None if duration else iters, duration, progress=True)
    _print_bench(report, json_out, csv_path, plot_path, wide)


def _bench_runtimes(artifacts: tuple[str, ...], backends: str, dtypes: str | None, threads: int | None,
                    device: str, options: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, opener) for every artifact x backend (x dtype) asked for; each opens on first use."""
    from vitdeploy.engines import BACKENDS, artifact_kind
    from vitdeploy.sysinfo import usable_cpus

    wanted = split_list(backends) or ["auto"]
    for b in wanted:
        if b not in BACKENDS:
            raise click.BadParameter(f"unknown backend {b!r}: choose from {', '.join(BACKENDS)}")
    takes = {"onnx": ("onnxruntime", "openvino"), "engine": ("tensorrt",), "checkpoint": ("torch",)}
    runtimes = []
    for artifact in artifacts:
        kind = artifact_kind(artifact)
        chosen = [b for b in wanted if b == "auto" or b in takes[kind]] or ["auto"]
        for b in chosen:
            for d in (split_list(dtypes) or [None]) if b in ("torch", "openvino") or (
                    b == "auto" and kind == "checkpoint") else [None]:
                extra = {"cuda_graph": True} if kind == "engine" and options["cuda_graph"] else {}
                if kind == "checkpoint" and options["compile"]:
                    extra["compile"] = True
                if kind == "onnx" and b in ("auto", "onnxruntime") and options["qdq_activations"] != "auto":
                    extra["qdq_activations"] = options["qdq_activations"]
                extra.update(verify=options["verify"], allow_drift=options["allow_drift"],
                             require_verified=options["require_verified"])
                # torch keeps its own thread default otherwise: every CPU backend gets the same count
                t = threads or (usable_cpus() if kind == "checkpoint" else None)
                runtimes.append((Path(artifact).name,
                                 lambda a=artifact, b=b, t=t, d=d, e=extra: open_artifact(a, b, t, d, device, **e)))
    return runtimes


def _require_golden(artifacts: tuple[str, ...], no_verify: bool) -> None:
    """--require-verified: every artifact carries a golden set (checked before any is benchmarked)."""
    from vitdeploy.verify import artifact_golden, unverified_reason

    if no_verify:
        raise click.UsageError("--require-verified and --no-verify contradict each other: drop one")
    for artifact in artifacts:
        if not Path(artifact).is_file() or artifact_golden(artifact) is None:
            raise click.ClickException(f"{unverified_reason(artifact)}; --require-verified refuses it")


def _print_bench(report: Any, json_out: str | None, csv_path: Path | None, plot_path: Path | None,
                 wide: bool) -> None:
    if json_out:
        write_json(json_out, report.to_dict())
        if json_out == "-":
            return
    console = make_console()
    console.print(report.table(console.width, wide))
    m = report.machine
    click.echo(f"machine: {m['cpu']} ({m['cores']} cores; ISA {' '.join(m['cpu_flags']) or '-'})"
               f"{'; GPUs: ' + ', '.join(m['gpus']) if m['gpus'] else ''}")
    flagged = [r for r in report.results if r.batching != "native"]
    if flagged:
        click.echo(f"note: {len(flagged)} row(s) ran a static-batch artifact at another batch size (padded or "
                   "split, see the batch column): their figures are not that batch's")
    if csv_path:
        report.write_csv(csv_path)
    if plot_path:
        report.write_plot(plot_path)


def _processes(value: str) -> int | None:
    """--processes: 'auto' -> None, else a positive count."""
    if value.strip().lower() == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise click.BadParameter(f"{value!r} is not a process count: give auto or a number >= 1",
                                 param_hint="--processes")
    return n


def _api_key(api_key_file: Path | None) -> str | None:
    """--api-key-file's first line, else $VITDEPLOY_API_KEY (the variable `vitdeploy serve` reads), else None."""
    import os

    if api_key_file is None:
        return os.environ.get("VITDEPLOY_API_KEY") or None
    try:
        key = (api_key_file.read_text().splitlines() or [""])[0].strip()
    except (OSError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"cannot read {api_key_file} ({type(e).__name__})", param_hint="--api-key-file"
                                 ) from None
    if not key:
        raise click.BadParameter(f"{api_key_file} is empty: put the key on its first line", param_hint="--api-key-file")
    return key


def _bench_url(url: str, model: str, concurrency: list[int], requests: int, time_limit: float, uint8: bool,
               reference: Path | None, rows: int, tolerance: float, json_out: str | None, plot_path: Path | None,
               wide: bool, processes: int | None = None, api_key: str | None = None) -> None:
    from vitdeploy.serving import loadtest

    report = loadtest.run(url, model, concurrency, requests, uint8=uint8, time_limit=time_limit, rows=rows,
                          reference=reference, tolerance=tolerance, processes=processes, api_key=api_key)
    write_json(json_out, report.to_dict())
    if json_out == "-":
        if not report.ok:
            raise click.ClickException("answers not checked out: " + " | ".join(report.problems))
        return
    console = make_console()
    console.print(report.table(console.width, wide))
    m = report.machine
    click.echo(f"client machine: {m['cpu']} ({m['cores']} cores; ISA {' '.join(m['cpu_flags']) or '-'})")
    if report.unsent:
        click.echo(f"note: {report.unsent} request(s) not sent: a level reached --time-limit {time_limit:g} s")
    if plot_path:
        report.write_plot(plot_path)
    if not report.ok:
        raise click.ClickException("answers not checked out: " + " | ".join(report.problems))
