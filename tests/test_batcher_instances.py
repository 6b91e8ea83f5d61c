"""`serve --instances N` (issue 17, "several contexts on one engine"): the batcher keeps N batches in flight
(N worker threads on one queue) over a runtime that runs N calls at once, and every caller still gets its
own rows. The fake enforces the contract a TensorRT runtime with N contexts has: never more than N calls at
once (it raises where a real one would have no free context), and the copies of one batch overlap the
compute of another while compute itself is serialized (one GPU)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from vitdeploy.serving import DynamicBatcher

SHAPE = (2, 4, 4)


class Contexts:
    """A runtime with ``instances`` contexts: copy in, compute (one at a time: one GPU), copy out."""

    def __init__(self, instances: int, copy_s: float = 0.01, compute_s: float = 0.02) -> None:
        self.instances, self.copy_s, self.compute_s = instances, copy_s, compute_s
        self.spec = SimpleNamespace(shape=SHAPE, dtype="float32", name="x", static=False, max_batch=64)
        self.lock, self.gpu = threading.Lock(), threading.Lock()
        self.in_flight = self.most = self.calls = 0

    def infer(self, x: np.ndarray) -> np.ndarray:
        with self.lock:
            self.in_flight += 1
            self.calls += 1
            self.most = max(self.most, self.in_flight)
            if self.in_flight > self.instances:
                raise RuntimeError(f"{self.in_flight} calls at once on {self.instances} contexts")
        try:
            time.sleep(self.copy_s)  # host -> device
            with self.gpu:
                out = x.reshape(len(x), -1)[:, :3] * 2.0  # each row's answer comes from its own input
                time.sleep(self.compute_s)
            time.sleep(self.copy_s)  # device -> host
            return out
        finally:
            with self.lock:
                self.in_flight -= 1


def _requests(n: int) -> list[np.ndarray]:
    return [np.full((1 + i % 3, *SHAPE), float(i), np.float32) for i in range(n)]


def _serve_all(batcher: DynamicBatcher, xs: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda x: batcher.infer(x, timeout=30), xs))
    return outs, time.perf_counter() - t0


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_n_workers_keep_at_most_n_batches_in_flight_and_answer_each_request_with_its_rows(workers):
    rt = Contexts(workers)
    xs = _requests(60)
    with DynamicBatcher(rt, max_batch_size=4, max_delay_ms=1, max_queue=1000, workers=workers) as batcher:
        assert batcher.workers == workers
        outs, _ = _serve_all(batcher, xs)
        stats = batcher.stats
    for x, out in zip(xs, outs, strict=True):
        assert out.shape == (len(x), 3) and (out == 2.0 * x[0, 0, 0, 0]).all()
    assert stats.failed == 0 and stats.rows == sum(len(x) for x in xs) and stats.batches == rt.calls
    assert rt.most == workers  # N in flight: reached, never passed (the fake raises past it)


def test_two_workers_overlap_copies_with_compute():
    """The fake-timed pipeline: 10 ms copy in, 20 ms compute (serialized), 10 ms copy out per batch."""
    walls = {}
    for workers in (1, 2):
        rt = Contexts(workers)
        with DynamicBatcher(rt, max_batch_size=4, max_delay_ms=0, max_queue=1000, workers=workers) as batcher:
            _, walls[workers] = _serve_all(batcher, [np.zeros((4, *SHAPE), np.float32)] * 24)
    print(f"24 batches: 1 worker {walls[1] * 1e3:.0f} ms, 2 workers {walls[2] * 1e3:.0f} ms")
    assert walls[2] < 0.8 * walls[1], walls  # ideal: 40 ms -> 20 ms a batch (compute-bound)


def test_shutdown_stops_every_worker():
    rt = Contexts(3)
    batcher = DynamicBatcher(rt, max_batch_size=4, max_delay_ms=0, workers=3)
    assert batcher.alive and batcher.shutdown(timeout=5) is True
    assert not batcher.alive and not any(w.is_alive() for w in batcher._workers)


def test_create_app_runs_as_many_batches_as_the_runtime_has_instances(serving_onnx):
    from vitdeploy.engines import open_runtime
    from vitdeploy.serving.server import create_app

    with open_runtime(serving_onnx, threads=1) as rt:
        rt.instances = 3  # as a TensorRT runtime opened with instances=3 says
        app = create_app(rt)
        try:
            assert app.state.batcher.workers == 3
        finally:
            app.state.batcher.shutdown()


def test_serve_instances_opens_an_engine_with_that_many_contexts(serving_onnx, tmp_path, monkeypatch):
    import vitdeploy.engines
    import vitdeploy.serving.server
    from vitdeploy.cli import main

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not read: open_runtime is replaced")
    opened, served = [], []
    real_open = vitdeploy.engines.open_runtime

    def fake_open(path, backend="auto", **options):
        opened.append(options)
        rt = real_open(serving_onnx, threads=1)
        rt.instances = options.get("instances", 1)
        return rt

    monkeypatch.setattr(vitdeploy.engines, "open_runtime", fake_open)
    monkeypatch.setattr(vitdeploy.serving.server, "run_server", lambda app, *a, **k: served.append(app))
    r = CliRunner().invoke(main, ["serve", "-m", str(engine), "--instances", "2", "--no-verify"])
    assert r.exit_code == 0, r.output
    assert opened == [{"shared_cores": True, "instances": 2}] and served[0].state.batcher.workers == 2
    served[0].state.batcher.shutdown()


def test_serve_instances_refuses_an_onnx(serving_onnx):
    from vitdeploy.cli import main

    r = CliRunner().invoke(main, ["serve", "-m", str(serving_onnx), "--instances", "2"])
    assert r.exit_code == 2 and "not a TensorRT engine" in r.output and "--workers" in r.output, r.output
