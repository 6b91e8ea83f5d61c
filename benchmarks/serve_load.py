"""Load figures for `vitdeploy serve` and a real Triton server, same model, same client, one run.

    python benchmarks/serve_load.py [MODEL.onnx] [--clients 32] [--requests 50] [--max-batch 32]
                                    [--max-delay-ms 2] [--only vitdeploy|triton] [--json out.json]

Both servers run in their own process on loopback and get the same requests from the same client
code (tritonclient.http, KServe v2 protocol, binary tensors, one client per thread):
- `vitdeploy serve MODEL` (its in-process dynamic batcher);
- tritonserver from the nvidia-pytriton wheel, serving the repository `vitdeploy triton MODEL
  --backend python` writes (Triton's dynamic batcher in front of vitdeploy's Runtime in the Python
  backend; the wheel has no onnxruntime backend). The wheel and its numpy<2 serving venv are cached
  under --cache (default .cache/, as the tests do).
Each request carries its own input, and its answer is checked against the logits of that input
computed directly: "lost" counts requests without an answer, "crossed" answers that are not their
input's. Per server: requests/s, p50/p99 latency, mean batch size (vitdeploy: its batch-size
histogram; Triton: nv_inference_count / nv_inference_exec_count), and the machine's CPU.
Without a model it exports a tiny ViT (224x224, 2 layers) first.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import local_triton as harness  # beside this script
import numpy as np

from vitdeploy.engines import open_runtime
from vitdeploy.io import free_port
from vitdeploy.serving import triton as triton_mod
from vitdeploy.sysinfo import cpu_model

NAME = "model"


def tiny_model(folder: Path) -> Path:
    from vitdeploy import save_model
    from vitdeploy.checkpoints import build_model
    from vitdeploy.config import ViTConfig
    from vitdeploy.exporters import ExportOptions, export_onnx

    cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    patch_size=32, num_labels=10)
    save_model(build_model(cfg, seed=0), folder / "tiny.safetensors")
    return export_onnx(folder / "tiny.safetensors", folder / "tiny.onnx",
                       options=ExportOptions(dynamic_batch=True)).path


def drive(url: str, x: np.ndarray, expected: np.ndarray, clients: int, per_client: int,
          time_limit: float) -> dict[str, Any]:
    """``clients`` threads, each with its own tritonclient.http client, send rows of ``x`` one request each."""
    import tritonclient.http as th

    latencies: list[float] = []
    crossed = errors = 0
    lock = threading.Lock()
    deadline = time.perf_counter() + time_limit
    with th.InferenceServerClient(url) as c:
        meta = c.get_model_metadata(NAME)
    in_name, in_type = meta["inputs"][0]["name"], meta["inputs"][0]["datatype"]
    out_name = meta["outputs"][0]["name"]

    def client(k: int) -> None:
        nonlocal crossed, errors
        with th.InferenceServerClient(url, connection_timeout=60, network_timeout=60) as c:
            for j in range(per_client):
                if time.perf_counter() > deadline:
                    return
                i = k * per_client + j
                inp = th.InferInput(in_name, [1, *x.shape[1:]], in_type)
                inp.set_data_from_numpy(x[i:i + 1], binary_data=True)
                t = time.perf_counter()
                try:
                    out = c.infer(NAME, [inp], outputs=[th.InferRequestedOutput(out_name, binary_data=True)])
                    got = out.as_numpy(out_name)
                except Exception:
                    got = None
                dt = time.perf_counter() - t
                with lock:
                    if got is None:
                        errors += 1
                        continue
                    latencies.append(dt)
                    if got.shape != (1, expected.shape[1]) or np.abs(got[0] - expected[i]).max() > 1e-3:
                        crossed += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    sent = clients * per_client
    lat = np.asarray(latencies or [np.nan]) * 1e3
    return {"requests": sent, "answered": len(latencies), "lost": sent - len(latencies), "errors": errors,
            "crossed": crossed, "seconds": wall, "requests_per_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def _metrics(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def _batches_vitdeploy(text: str) -> tuple[float, float]:
    rows = float(re.search(r"^vitdeploy_batch_size_sum ([\d.e+-]+)$", text, re.M).group(1))
    batches = float(re.search(r"^vitdeploy_batch_size_count ([\d.e+-]+)$", text, re.M).group(1))
    return rows, batches


def _batches_triton(text: str) -> tuple[float, float]:
    def value(metric: str) -> float:
        m = re.search(rf'^{metric}{{model="{NAME}",version="1"}} ([\d.e+-]+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    return value("nv_inference_count"), value("nv_inference_exec_count")


def _warm(url: str, x: np.ndarray, expected: np.ndarray) -> None:
    drive(url, x[:8], expected[:8], 2, 4, 60)


def run_vitdeploy(model: Path, x: np.ndarray, expected: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    cmd = [sys.executable, "-c", "from vitdeploy.cli import main; main()", "serve", "--model", str(model),
           "--name", NAME, "--host", "127.0.0.1", "--port", str(port), "--max-batch", str(args.max_batch),
           "--max-delay-ms", str(args.max_delay_ms), "--max-queue", str(4 * len(x)), "--drain-grace", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"vitdeploy serve did not start: {proc.stderr.read().decode()[-2000:]}")
            try:
                if urllib.request.urlopen(base + "/v2/health/ready", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        url = f"127.0.0.1:{port}"
        _warm(url, x, expected)
        rows0, batches0 = _batches_vitdeploy(_metrics(base + "/metrics"))
        out = drive(url, x, expected, args.clients, args.requests, args.time_limit)
        rows1, batches1 = _batches_vitdeploy(_metrics(base + "/metrics"))
    finally:
        proc.terminate()
        proc.wait(60)
    out["mean_batch"] = (rows1 - rows0) / max(batches1 - batches0, 1)
    out["server"] = f"vitdeploy serve (max batch {args.max_batch}, max delay {args.max_delay_ms} ms)"
    return out


def run_triton(model: Path, x: np.ndarray, expected: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    local = harness.prepare_local_triton(args.cache)
    work = Path(tempfile.mkdtemp(prefix="serve_load-"))
    triton_mod.write_triton_repo(model, work / "repo", name=NAME, max_batch=args.max_batch,
                                 max_queue_delay_us=int(args.max_delay_ms * 1000), backend="python",
                                 execution_env=local.env, instances=args.triton_instances)
    server = harness.start_tritonserver(local, work / "repo", log_dir=work)
    try:
        _warm(server.http_url, x, expected)
        rows0, batches0 = _batches_triton(_metrics(server.metrics_url))
        out = drive(server.http_url, x, expected, args.clients, args.requests, args.time_limit)
        rows1, batches1 = _batches_triton(_metrics(server.metrics_url))
    finally:
        server.stop()
    out["mean_batch"] = (rows1 - rows0) / max(batches1 - batches0, 1)
    out["server"] = (f"tritonserver {harness.PYTRITON_WHEEL} python backend, {args.triton_instances} instance(s) "
                     f"(max batch {args.max_batch}, max queue delay {int(args.max_delay_ms * 1000)} us)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="a dynamic-batch ONNX (default: export a tiny ViT)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=50, help="requests per client")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-delay-ms", type=float, default=2.0)
    ap.add_argument("--triton-instances", type=int, default=1)
    ap.add_argument("--only", choices=["vitdeploy", "triton"])
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds per server")
    ap.add_argument("--cache", type=Path, default=Path(__file__).resolve().parent.parent / ".cache")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    model = Path(args.model) if args.model else tiny_model(Path(tempfile.mkdtemp()))

    n = args.clients * args.requests
    with open_runtime(model) as rt:
        shape, dtype = rt.spec.shape, rt.spec.dtype
        rng = np.random.default_rng(0)
        x = (rng.integers(0, 256, (n, *shape), dtype=np.uint8) if dtype == "uint8"
             else rng.standard_normal((n, *shape)).astype(dtype))
        expected = rt.infer(x)
    results: dict[str, Any] = {"model": str(model), "cpu": cpu_model(), "clients": args.clients,
                               "requests_per_client": args.requests, "servers": {}}
    for which, run in (("vitdeploy", run_vitdeploy), ("triton", run_triton)):
        if args.only in (None, which):
            results["servers"][which] = run(model, x, expected, args)

    print(f"{results['cpu']}: {args.clients} clients x {args.requests} requests, {model.name}")
    print(f"{'server':<10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>10} {'lost':>5} {'crossed':>7}")
    for which, r in results["servers"].items():
        print(f"{which:<10} {r['requests_per_s']:>8.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
              f"{r['mean_batch']:>10.2f} {r['lost']:>5} {r['crossed']:>7}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if any(r["lost"] or r["crossed"] for r in results["servers"].values()):
        raise SystemExit("requests were lost or crossed")


if __name__ == "__main__":
    main()
