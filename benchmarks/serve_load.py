"""`vitdeploy serve` and a real Triton server side by side under the same load, one run.

    python benchmarks/serve_load.py [MODEL.onnx] [--concurrency 1,4,16,64] [--requests 200] [--uint8]
                                    [--max-batch 32] [--max-delay-ms 2] [--fixed-delay] [--rounds 3]
                                    [--only vitdeploy|triton]
                                    [--json out.json] [--plot out.png]

A thin script over `vitdeploy bench --url` (vitdeploy.serving.loadtest): each server runs in its own
process on loopback, both at once, and gets the same load at each concurrency level, one server after the
other, the order turning at each level so that a machine's drift weighs on both (closed-loop tritonclient.http
clients, binary tensors, one-row requests cycling through --rows distinct inputs), every answer checked
against its own input's logits computed here (ONNX Runtime on MODEL):
- `vitdeploy serve MODEL` (its in-process dynamic batcher; batch sizes from its /metrics histogram);
- tritonserver from the nvidia-pytriton wheel, serving the repository `vitdeploy triton MODEL --backend
  python` writes (Triton's dynamic batcher in front of vitdeploy's Runtime in the Python backend; the wheel
  has no onnxruntime backend; batch sizes from /v2/models/NAME/stats). See benchmarks/local_triton.py.
Prints requests/s and p50/p99 of both at each concurrency, the ratios vitdeploy/Triton, the mean server
batch, and the CPU. Without a model it exports a tiny ViT (224x224, 2 layers; --uint8: uint8 NHWC input).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import local_triton as harness  # beside this script

from vitdeploy.io import free_port
from vitdeploy.serving import loadtest
from vitdeploy.serving import triton as triton_mod
from vitdeploy.sysinfo import cpu_flags, cpu_model, usable_cpus

NAME = "model"


def tiny_model(folder: Path, uint8: bool) -> Path:
    from vitdeploy import save_model
    from vitdeploy.checkpoints import build_model
    from vitdeploy.config import ViTConfig
    from vitdeploy.exporters import ExportOptions, export_onnx

    cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    patch_size=32, num_labels=10)
    save_model(build_model(cfg, seed=0), folder / "tiny.safetensors")
    return export_onnx(folder / "tiny.safetensors", folder / f"tiny{'-u8' if uint8 else ''}.onnx",
                       options=ExportOptions(dynamic_batch=True, uint8_input=uint8)).path


def _load(url: str, model: Path, args: argparse.Namespace, concurrency: int) -> loadtest.LoadReport:
    return loadtest.run(url, NAME, [concurrency], args.requests, uint8=args.uint8, time_limit=args.time_limit,
                        rows=args.rows, reference=model, processes=args.client_processes)


@contextlib.contextmanager
def vitdeploy_server(model: Path, args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """`vitdeploy serve MODEL` on a free port: (its URL, what it is)."""
    port = free_port()
    cmd = [sys.executable, "-c", "from vitdeploy.cli import main; main()", "serve", "--model", str(model),
           "--name", NAME, "--host", "127.0.0.1", "--port", str(port), "--max-batch", str(args.max_batch),
           "--max-delay-ms", str(args.max_delay_ms), "--max-queue", str(4 * max(args.concurrency)),
           "--drain-grace", "0", *(["--fixed-delay"] if args.fixed_delay else [])]
    log = tempfile.TemporaryFile()  # noqa: SIM115 - a file, not a pipe: the log must never block the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise SystemExit(f"vitdeploy serve did not start: {log.read().decode()[-2000:]}")
            try:
                if urllib.request.urlopen(url + "/v2/health/ready", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        delay = "fixed" if args.fixed_delay else "adaptive"
        yield url, f"vitdeploy serve (max batch {args.max_batch}, max delay {args.max_delay_ms} ms, {delay})"
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


@contextlib.contextmanager
def triton_server(model: Path, args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """tritonserver over the Python-backend repository `vitdeploy triton` writes: (its URL, what it is)."""
    local = harness.prepare_local_triton(args.cache)
    work = Path(tempfile.mkdtemp(prefix="serve_load-"))
    triton_mod.write_triton_repo(model, work / "repo", name=NAME, max_batch=args.max_batch,
                                 max_queue_delay_us=int(args.max_delay_ms * 1000), triton_backend="python",
                                 execution_env=local.env, instances=args.triton_instances)
    server = harness.start_tritonserver(local, work / "repo", log_dir=work)
    try:
        yield (f"http://{server.http_url}", f"tritonserver {harness.PYTRITON_WHEEL} python backend, "
               f"{args.triton_instances} instance(s) (max batch {args.max_batch}, max queue delay "
               f"{int(args.max_delay_ms * 1000)} us)")
    finally:
        server.stop()


def drive(urls: dict[str, str], model: Path, args: argparse.Namespace) -> tuple[dict[str, loadtest.LoadReport],
                                                                                list[str]]:
    """Each concurrency level ``--rounds`` times on every server, one server after the other, the order turning
    at each round (ABBA...): a machine that slows down or speeds up during the run weighs on both alike. Each
    server's row is its median round by requests/s; the problems are those of every round."""
    reports: dict[str, loadtest.LoadReport] = {}
    problems: list[str] = []
    for i, c in enumerate(args.concurrency):
        rounds: dict[str, list[loadtest.LoadReport]] = {w: [] for w in urls}
        for r in range(args.rounds):
            for which in (list(urls) if (i + r) % 2 == 0 else list(reversed(urls))):
                report = _load(urls[which], model, args, c)
                rounds[which].append(report)
                problems += [f"{which}: {p}" for p in report.problems]
        for which, runs in rounds.items():
            median = sorted(runs, key=lambda rep: rep.levels[0].requests_per_s)[len(runs) // 2]
            if which in reports:
                reports[which].levels += median.levels
                reports[which].unsent += median.unsent
            else:
                reports[which] = median
    return {w: reports[w] for w in urls}, problems


def side_by_side(reports: dict[str, loadtest.LoadReport]) -> Any:
    """One row per concurrency: both servers' requests/s, p50, p99 and mean batch, and the ratios."""
    from vitdeploy.tables import Column, fit_table

    names = list(reports)
    by_level = {n: {lv.concurrency: lv for lv in r.levels} for n, r in reports.items()}
    columns = [Column("clients", 0)]
    for n in names:
        columns += [Column(f"{n}\nreq/s", 0), Column(f"{n}\np50 ms", 1), Column(f"{n}\np99 ms", 0),
                    Column(f"{n}\nbatch", 2), Column(f"{n}\nbad", 0)]
    if len(names) == 2:
        columns += [Column("req/s\nratio", 0), Column("p99\nratio", 0)]
    rows = []
    for c in sorted({c for levels in by_level.values() for c in levels}):
        row, got = [str(c)], [by_level[n].get(c) for n in names]
        for lv in got:
            row += ([f"{lv.requests_per_s:.1f}", f"{lv.p50_ms:.1f}", f"{lv.p99_ms:.1f}",
                     f"{lv.batches.mean:.1f}" if lv.batches else "-", str(lv.bad)] if lv else ["-"] * 5)
        if len(names) == 2:
            a, b = got
            row += [f"{a.requests_per_s / b.requests_per_s:.2f}x" if a and b and b.requests_per_s else "-",
                    f"{a.p99_ms / b.p99_ms:.2f}x" if a and b and b.p99_ms else "-"]
        rows.append(row)
    caption = ("ratios: vitdeploy / Triton (req/s above 1x and p99 below 1x favour vitdeploy)"
               if len(names) == 2 else None)
    return fit_table("requests/s and latency per concurrent clients", columns, rows, wide=True, caption=caption)


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a count >= 1")
    return int(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="a dynamic-batch ONNX (default: export a tiny ViT)")
    ap.add_argument("--concurrency", default="1,4,16,64", help="comma-separated concurrent clients")
    ap.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    ap.add_argument("--rounds", type=int, default=3, help="times each level runs on each server, alternating; "
                    "each row is the server's median round")
    ap.add_argument("--rows", type=int, default=32, help="distinct inputs the requests cycle through")
    ap.add_argument("--uint8", action="store_true", help="the model takes uint8 pixels (the tiny one is exported so)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-delay-ms", type=float, default=2.0)
    ap.add_argument("--fixed-delay", action="store_true", help="vitdeploy serve --fixed-delay: every batch waits "
                    "the whole max delay, as Triton's does")
    ap.add_argument("--triton-instances", type=int, default=1)
    ap.add_argument("--only", choices=["vitdeploy", "triton"])
    ap.add_argument("--client-processes", type=_positive, default=None, help="processes the clients are split over "
                    "(default: vitdeploy bench --url's auto, one per 8 clients, at most one per CPU)")
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per server and concurrency level")
    ap.add_argument("--cache", type=Path, default=Path(__file__).resolve().parent.parent / ".cache")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    model = Path(args.model) if args.model else tiny_model(Path(tempfile.mkdtemp()), args.uint8)

    servers: dict[str, str] = {}
    urls: dict[str, str] = {}
    with contextlib.ExitStack() as stack:  # both servers up at once; only one is loaded at a time
        for which, server in (("vitdeploy", vitdeploy_server), ("triton", triton_server)):
            if args.only in (None, which):
                urls[which], servers[which] = stack.enter_context(server(model, args))
        reports, problems = drive(urls, model, args)

    from rich.console import Console

    r0 = next(iter(reports.values()))
    Console(width=200).print(side_by_side(reports))
    print(f"machine: {cpu_model()} ({usable_cpus()} cores; ISA {' '.join(cpu_flags()) or '-'}); "
          f"{model.name} ({r0.model.datatype} {r0.model.shape}), {args.requests} requests per level, "
          f"{args.rows} distinct inputs, every answer checked against ONNX Runtime here; each row the median of "
          f"{args.rounds} rounds, the servers alternating; client processes per level: "
          f"{', '.join(f'{lv.processes} at {lv.concurrency}' for lv in r0.levels)}")
    for which, desc in servers.items():
        print(f"  {which}: {desc}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(model), "cpu": cpu_model(), "cpu_flags": cpu_flags(),
                                         "cores": usable_cpus(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                                         "servers": {w: {"server": servers[w], **r.to_dict()}
                                                     for w, r in reports.items()}}, indent=2))
    if args.plot:
        loadtest.plot(reports, args.plot)
    if problems:
        raise SystemExit("answers not checked out:\n" + "\n".join(problems))


if __name__ == "__main__":
    main()
