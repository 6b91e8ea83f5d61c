"""Load test on loopback: N concurrent clients against `vitdeploy serve`, every answer checked
against the logits of its own input computed directly, bounded in time and count."""

from __future__ import annotations

import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def batch_histogram(metrics: str) -> tuple[float, float, dict[str, float]]:
    """Rows and batches from the server's vitdeploy_batch_size histogram, with its cumulative buckets."""
    total = float(re.search(r"^vitdeploy_batch_size_sum ([\d.e+-]+)$", metrics, re.M).group(1))
    count = float(re.search(r"^vitdeploy_batch_size_count ([\d.e+-]+)$", metrics, re.M).group(1))
    buckets = dict(re.findall(r'^vitdeploy_batch_size_bucket\{le="([^"]+)"\} ([\d.e+-]+)$', metrics, re.M))
    return total, count, {k: float(v) for k, v in buckets.items()}


def run_load(runtime: Any, clients: int = 16, requests_per_client: int = 50, max_batch: int = 32,
             max_delay_ms: float = 2.0, time_limit: float = 120.0) -> dict[str, Any]:
    import httpx
    import uvicorn

    from vitdeploy.serving.server import create_app

    n = clients * requests_per_client
    x = np.random.default_rng(0).standard_normal((n, *runtime.spec.shape), dtype=np.float32)
    expected = runtime.infer(x)

    # baseline: the runtime called one request at a time
    t0 = time.perf_counter()
    for i in range(min(n, 200)):
        runtime.infer(x[i:i + 1])
    direct_rps = min(n, 200) / (time.perf_counter() - t0)

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(runtime, max_batch, max_delay_ms, max_queue=4 * n),
                                           host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{port}"
    deadline = time.perf_counter() + time_limit
    latencies: list[float] = []
    mismatches = 0
    lock = threading.Lock()

    def client(c: int) -> None:
        nonlocal mismatches
        with httpx.Client(base_url=url, timeout=30) as http:
            for j in range(requests_per_client):
                if time.perf_counter() > deadline:
                    return
                i = c * requests_per_client + j
                t = time.perf_counter()
                r = http.post("/v1/logits", content=x[i].tobytes(), headers={
                    "content-type": "application/octet-stream", "x-shape": ",".join(map(str, x[i].shape)),
                    "accept": "application/octet-stream"})
                dt = time.perf_counter() - t
                out = np.frombuffer(r.content, np.float32) if r.status_code == 200 else None
                with lock:
                    latencies.append(dt)
                    if out is None or np.abs(out - expected[i]).max() > 1e-3:
                        mismatches += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    metrics = httpx.get(url + "/metrics").text
    server.should_exit = True
    thread.join(10)
    rows, batches, buckets = batch_histogram(metrics)
    lat = np.asarray(latencies) * 1e3
    return {
        "clients": clients, "requests": len(latencies), "mismatches": mismatches,
        "requests_per_s": len(latencies) / wall, "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)), "mean_batch": rows / batches if batches else 0.0,
        "batch_rows": rows, "batches": batches, "batch_buckets": buckets,
        "direct_one_at_a_time_rps": direct_rps,
    }
