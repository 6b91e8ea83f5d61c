"""The batcher's guarantees under concurrency, the HTTP server over loopback, the Triton repository."""

import asyncio
import itertools
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from vitdeploy.engines import open_runtime
from vitdeploy.engines.base import Runtime
from vitdeploy.serving import BatcherClosed, DynamicBatcher, QueueFull, RequestTimeout

from .http_server import Server

SHAPE = (3, 64, 64)


@pytest.fixture(scope="module")
def small_onnx(serving_onnx):
    return serving_onnx


@pytest.fixture(scope="module")
def runtime(small_onnx):
    return open_runtime(small_onnx, threads=1)


class Gate(Runtime):
    """Wraps a real runtime: can hold inference until released, and fails batches holding a marker."""

    MARK = 1234.0

    def __init__(self, inner):
        self.inner, self.spec, self.metadata = inner, inner.spec, inner.metadata
        self.open = threading.Event()
        self.open.set()
        self.rows_run = 0

    def _run(self, batch):
        self.open.wait(10)
        if np.any(batch[:, 0, 0, 0] == self.MARK):
            raise ArithmeticError("injected failure")
        self.rows_run += batch.shape[0]
        return self.inner.infer(batch)


def _inputs(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *SHAPE), dtype=np.float32)


def test_thousands_of_requests_from_many_threads_get_their_own_rows(runtime):
    x = _inputs(2400)
    expected = runtime.infer(x)
    # requests: singles and small batches, 3000 rows in all over 16 threads
    spans, i, k = [], 0, 0
    while i < len(x):
        size = 1 if k % 3 else 1 + k % 4
        spans.append((i, min(len(x), i + size)))
        i, k = i + size, k + 1
    with DynamicBatcher(runtime, max_batch_size=16, max_delay_ms=2, max_queue=10_000) as batcher:
        def call(span):
            a, b = span
            return span, batcher.submit(x[a] if b - a == 1 else x[a:b]).result(30)

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(call, spans))
        stats = batcher.stats
    assert len(results) == len(spans) > 1000
    for (a, b), out in results:
        want = expected[a] if b - a == 1 else expected[a:b]
        assert out.shape == want.shape and np.abs(out - want).max() < 1e-4
    assert stats.rows == len(x) and stats.requests == len(spans)
    assert max(stats.batch_sizes) <= 16 and stats.mean_batch > 1.5  # batching happened


def test_adaptive_delay_waits_only_for_announced_requests(runtime):
    """adaptive=True: a lone request runs at once (not after the minute of max delay); a batch waits for a
    request announced with expect() and takes it; one withdrawn with arrived(), or refused, stops the wait."""
    x = _inputs(3, seed=5)
    expected = runtime.infer(x)
    with DynamicBatcher(runtime, max_batch_size=8, max_delay_ms=60_000, adaptive=True) as batcher:
        assert np.abs(batcher.submit(x[0]).result(30) - expected[0]).max() < 1e-4
        batcher.expect()
        batcher.expect()
        first = batcher.submit(x[1], expected=True)
        time.sleep(0.3)
        assert not first.done()  # one announced request is still on its way
        second = batcher.submit(x[2], expected=True)
        outs = [first.result(30), second.result(30)]
        assert np.abs(np.stack(outs) - expected[1:]).max() < 1e-4
        assert batcher.stats.batch_sizes == {1: 1, 2: 1}
        batcher.expect()
        batcher.expect()
        batcher.expect()
        third = batcher.submit(x[0], expected=True)
        with pytest.raises(ValueError):  # refused at once: no longer on its way
            batcher.submit(np.zeros((2, 2), np.float32), expected=True)
        time.sleep(0.3)
        assert not third.done()
        batcher.arrived()  # the last announced request failed before it was submitted
        assert np.abs(third.result(30) - expected[0]).max() < 1e-4
        assert batcher.stats.batch_sizes == {1: 2, 2: 1}


def test_screen_refuses_only_its_own_request(runtime):
    """An input the screen refuses fails its own request (InputRefused, a 400 in the server); the others in
    its batch get their rows, and a screen that raises fails only that request too."""
    from vitdeploy.serving.batcher import InputRefused

    x = _inputs(4, seed=7)
    expected = runtime.infer(x)
    x[1, 0, 0, 0] = np.nan

    def screen(rows):
        if rows[0, 0, 0, 1] == x[3, 0, 0, 1]:
            raise RuntimeError("the screen broke")
        return None if np.isfinite(rows).all() else "holds NaN"

    with DynamicBatcher(runtime, max_batch_size=8, max_delay_ms=300, screen=screen) as batcher:
        futures = [batcher.submit(x[i]) for i in range(4)]
        with pytest.raises(InputRefused, match="holds NaN"):
            futures[1].result(30)
        with pytest.raises(RuntimeError, match="the screen broke"):
            futures[3].result(30)
        for i in (0, 2):
            assert np.abs(futures[i].result(30) - expected[i]).max() < 1e-4
        assert batcher.stats.batch_sizes == {2: 1} and batcher.stats.failed == 2


def _pieces(image, cuts):
    """``image``'s bytes as Pieces cut at byte offsets ``cuts`` (not on float boundaries): a body's chunks."""
    from vitdeploy.serving.batcher import Pieces

    raw = image.tobytes()
    edges = [0, *cuts, len(raw)]
    return Pieces([memoryview(raw[a:b]) for a, b in itertools.pairwise(edges)], image.dtype, image.shape)


def test_pieces_are_copied_into_their_own_rows(runtime):
    """Inputs still in a body's chunks (Pieces, cut mid-float) batch with arrays: each caller gets the rows of
    its own input, one of them alone in its batch, and the screen sees the assembled rows."""
    x = _inputs(5, seed=11)
    expected = runtime.infer(x)
    x[3, 0, 5, 5] = np.nan

    def screen(rows):
        return None if np.isfinite(rows).all() else "holds NaN"

    with DynamicBatcher(runtime, max_batch_size=8, max_delay_ms=300, screen=screen) as batcher:
        alone = batcher.submit(_pieces(x[0], [1, 4099, 20001]))
        assert np.abs(alone.result(30) - expected[0]).max() < 1e-4
        inputs = [_pieces(x[1], [7]), x[2], _pieces(x[3:4], [3, 5]), _pieces(x[4], [x[4].nbytes // 2 + 1])]
        futures = [batcher.submit(v) for v in inputs]
        assert np.abs(futures[0].result(30) - expected[1]).max() < 1e-4
        assert np.abs(futures[1].result(30) - expected[2]).max() < 1e-4
        assert np.abs(futures[3].result(30) - expected[4]).max() < 1e-4
        with pytest.raises(ValueError, match="holds NaN"):
            futures[2].result(30)
        assert batcher.stats.batch_sizes == {1: 1, 3: 1}
    with pytest.raises(ValueError, match="bytes in pieces"):
        type(inputs[0])([memoryview(b"abc")], np.float32, SHAPE)


def test_a_failure_while_dropping_refused_rows_fails_that_batch_only(runtime, monkeypatch):
    """The screen refuses one request; putting the others' rows together without it fails (no memory): they
    get the error, the worker lives on and serves the next batch."""
    from vitdeploy.serving import batcher as batcher_module
    from vitdeploy.serving.batcher import InputRefused

    x = _inputs(3, seed=5)
    expected = runtime.infer(x)
    bad = x.copy()
    bad[1, 0, 0, 0] = np.nan

    class NoMemory:
        def __getattr__(self, name):
            return getattr(np, name)

        def concatenate(self, *a, **kw):
            raise MemoryError("injected: no memory for the batch")

    def screen(rows):
        return None if np.isfinite(rows).all() else "holds NaN"

    with DynamicBatcher(runtime, max_batch_size=8, max_delay_ms=300, screen=screen) as batcher:
        monkeypatch.setattr(batcher_module, "np", NoMemory())
        futures = [batcher.submit(bad[i]) for i in range(3)]
        with pytest.raises(InputRefused):
            futures[1].result(10)
        for i in (0, 2):
            with pytest.raises(MemoryError):
                futures[i].result(10)  # old code: the worker died and these waited forever
        monkeypatch.undo()
        assert batcher.alive and batcher.stats.failed == 3
        assert np.abs(batcher.infer(x[0], timeout=10) - expected[0]).max() < 1e-4


def test_body_chunks_read_and_joined_as_one():
    """A body's chunks: any prefix and tail read as the joined bytes would; joining keeps one copy only."""
    import random

    from vitdeploy.serving.parsing import Body

    rng = random.Random(3)
    data = bytes(rng.randrange(256) for _ in range(5000))
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randrange(0, 6)))
        edges = [0, *cuts, len(data)]
        body = Body([data[a:b] for a, b in itertools.pairwise(edges)])
        start = rng.randrange(0, len(data) + 1)
        assert len(body) == len(data) and body.prefix(start) == data[:start]
        assert b"".join(bytes(v) for v in body.views(start)) == data[start:]
        assert all(len(v) for v in body.views(start))
        assert body.joined() == data and len(body.chunks) == 1  # the chunks are let go once joined


def test_asyncio_callers(runtime):
    x = _inputs(200, seed=1)
    expected = runtime.infer(x)

    async def main(batcher):
        return await asyncio.gather(*(batcher.submit_async(x[i]) for i in range(len(x))))

    with DynamicBatcher(runtime, max_batch_size=32, max_delay_ms=5) as batcher:
        outs = asyncio.run(main(batcher))
    assert np.abs(np.stack(outs) - expected).max() < 1e-4


def test_full_queue_rejects_at_once_and_timeouts_never_run(runtime):
    gate = Gate(runtime)
    gate.open.clear()
    batcher = DynamicBatcher(gate, max_batch_size=2, max_delay_ms=0, max_queue=4)
    first = batcher.submit(_inputs(1)[0])
    time.sleep(0.1)  # the worker holds the first batch at the gate
    waiting = [batcher.submit(_inputs(1, seed=s)[0], timeout=0.2 if s < 2 else None) for s in range(4)]
    t0 = time.perf_counter()
    with pytest.raises(QueueFull):
        batcher.submit(_inputs(1)[0])
    assert time.perf_counter() - t0 < 0.05 and batcher.stats.rejected == 1
    time.sleep(0.4)
    gate.open.set()
    assert first.result(10).shape == (7,)
    for f in waiting[:2]:
        with pytest.raises(RequestTimeout):
            f.result(10)
    assert all(f.result(10).shape == (7,) for f in waiting[2:])
    assert gate.rows_run == 3  # the two timed-out requests never ran
    batcher.shutdown()


def test_failure_fails_only_its_batch(runtime):
    gate = Gate(runtime)
    x = _inputs(600, seed=2)
    x[::50, 0, 0, 0] = Gate.MARK
    expected = runtime.infer(np.where(x == Gate.MARK, 0, x))
    with DynamicBatcher(gate, max_batch_size=8, max_delay_ms=1, max_queue=10_000) as batcher:
        with ThreadPoolExecutor(8) as pool:
            futures = list(pool.map(batcher.submit, x))
        failed = ok = 0
        for i, f in enumerate(futures):
            err = f.exception(30)
            if err is None:
                ok += 1
                assert x[i, 0, 0, 0] != Gate.MARK and np.abs(f.result() - expected[i]).max() < 1e-4
            else:
                failed += 1
                assert isinstance(err, ArithmeticError)
        assert batcher.alive and batcher.failure is None  # the failures did not take the worker down
        assert np.abs(batcher.infer(x[1], timeout=5) - expected[1]).max() < 1e-4
    assert failed >= 12 and ok > 400 and batcher.stats.failed == failed


def test_shutdown_reports_a_worker_that_keeps_running(runtime):
    """shutdown() says whether the worker stopped: one stuck in an inference is reported (False), and the
    request queued behind it is refused at once; once the inference returns, the worker stops."""
    gate = Gate(runtime)
    gate.open.clear()
    batcher = DynamicBatcher(gate, max_batch_size=1, max_delay_ms=0)
    running = batcher.submit(_inputs(1)[0])
    time.sleep(0.1)  # the worker holds the first request at the gate
    pending = batcher.submit(_inputs(1, seed=1)[0])
    t0 = time.perf_counter()
    assert batcher.shutdown(drain=False, timeout=0.3) is False
    assert 0.25 < time.perf_counter() - t0 < 2 and batcher._worker.is_alive()
    assert isinstance(pending.exception(0), BatcherClosed)
    gate.open.set()
    assert running.result(5).shape == (7,)  # the inference under way is still answered
    assert batcher.shutdown(timeout=5) is True and not batcher._worker.is_alive()


def test_shutdown_drains_or_fails_pending(runtime):
    for drain in (True, False):
        gate = Gate(runtime)
        gate.open.clear()
        batcher = DynamicBatcher(gate, max_batch_size=4, max_delay_ms=0, max_queue=100)
        futures = [batcher.submit(_inputs(1, seed=s)[0]) for s in range(10)]
        time.sleep(0.05)
        threading.Timer(0.1, gate.open.set).start()
        batcher.shutdown(drain=drain)
        done = [f.exception(5) is None for f in futures]
        if drain:
            assert all(done)
        else:
            assert done[0] and not all(done)
            assert all(isinstance(f.exception(), BatcherClosed) for f, d in zip(futures, done, strict=True) if not d)
        with pytest.raises(BatcherClosed):
            batcher.submit(_inputs(1)[0])


def test_bad_request_shapes(runtime):
    with DynamicBatcher(runtime, max_batch_size=4) as batcher:
        with pytest.raises(ValueError, match="does not match"):
            batcher.submit(np.zeros((3, 32, 32), np.float32))
        with pytest.raises(ValueError, match=r"1\.\.4 images"):
            batcher.submit(np.zeros((5, *SHAPE), np.float32))


# -- HTTP over loopback -------------------------------------------------------------------------------


def _png(size=(40, 30)):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_http_endpoints(runtime):
    import httpx

    with Server(runtime, max_body_bytes=2_000_000) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json()["status"] == "ready"
        r = c.post("/v1/classify?top_k=3", content=_png(), headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        top = r.json()["top_k"]
        assert len(top) == 3 and top[0]["label"].startswith("LABEL_") and top[0]["score"] >= top[1]["score"]
        r2 = c.post("/v1/classify?top_k=3", files={"file": ("x.png", _png(), "image/png")})
        assert r2.json() == r.json()
        bad = c.post("/v1/classify", content=b"definitely not an image")
        assert bad.status_code == 400 and "not a readable image" in bad.json()["error"]
        big = c.post("/v1/classify", content=b"\0" * 2_100_000)
        assert big.status_code == 413
        x = _inputs(3, seed=9)
        r = c.post("/v1/logits", json={"inputs": x.tolist()})
        assert np.abs(np.array(r.json()["logits"]) - runtime.infer(x)).max() < 1e-4
        binary = {"content-type": "application/octet-stream", "x-shape": "3,3,64,64",
                  "accept": "application/octet-stream"}
        r = c.post("/v1/logits", content=x.tobytes(), headers=binary)
        out = np.frombuffer(r.content, np.float32).reshape(3, 7)
        assert np.abs(out - runtime.infer(x)).max() < 1e-4
        assert c.post("/v1/logits", json={"inputs": [[1, 2]]}).status_code == 400
        negative = c.post("/v1/logits", content=b"\0" * 48, headers={**binary, "x-shape": "-1,-12"})
        assert negative.status_code == 400 and "positive sizes" in negative.json()["error"]
        metrics = c.get("/metrics").text
        assert 'vitdeploy_requests_total{code="200",endpoint="classify"} 2.0' in metrics
        assert "vitdeploy_batch_size_bucket" in metrics and "vitdeploy_queue_depth" in metrics
        assert 'vitdeploy_errors_total{endpoint="classify",reason="too_large"} 1.0' in metrics


def test_overload_is_503_and_ctrl_c_drains(runtime):
    import httpx

    gate = Gate(runtime)
    gate.open.clear()
    with Server(gate, max_batch=1, max_delay_ms=0, max_queue=1) as srv:
        x = _inputs(1)
        with ThreadPoolExecutor(4) as pool:
            def post():
                return httpx.post(srv.url + "/v1/logits", json={"inputs": x.tolist()}, timeout=20)

            first = pool.submit(post)  # held at the gate
            time.sleep(0.3)
            second = pool.submit(post)  # queued
            time.sleep(0.3)
            third = httpx.post(srv.url + "/v1/logits", json={"inputs": x.tolist()}, timeout=5)
            assert third.status_code == 503 and third.headers["retry-after"] == "1"
            stopper = threading.Thread(target=srv.stop)  # what Ctrl-C does: stop accepting, finish in-flight
            stopper.start()
            time.sleep(0.3)
            gate.open.set()
            assert first.result(15).status_code == 200 and second.result(15).status_code == 200
            stopper.join(15)
    assert not srv.thread.is_alive()


def test_serving_imports_no_torch(small_onnx):
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any torch import now fails
        "from fastapi.testclient import TestClient\n"
        "from vitdeploy.engines import open_runtime\n"
        "from vitdeploy.serving.server import create_app\n"
        f"app = create_app(open_runtime({str(small_onnx)!r}))\n"
        "with TestClient(app) as c:\n"
        "    r = c.post('/v1/logits', json={'inputs': [[[[0.0] * 64] * 64] * 3]})\n"
        "    assert r.status_code == 200, r.text\n"
        "print('ok', 'torch' in sys.modules and sys.modules['torch'] is not None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok False"


# -- Triton ----------------------------------------------------------------------------------------------
def _parse_pbtxt(path):
    pytest.importorskip("tritonclient.grpc", reason="tritonclient not installed: pip install 'vitdeploy[triton]'")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_triton_repo_for_onnx_and_engine(digits_onnx, tmp_path):
    from click.testing import CliRunner

    from vitdeploy.cli import main

    r = CliRunner().invoke(main, ["triton", str(digits_onnx["fp16"]), "--repo", str(tmp_path / "repo"),
                                  "--name", "digits", "--max-batch", "16", "--instances", "2"])
    assert r.exit_code == 0, r.output
    cfg = _parse_pbtxt(tmp_path / "repo" / "digits" / "config.pbtxt")
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    assert list(cfg.input[0].dims) == [3, 224, 224] and cfg.input[0].name == "pixel_values"
    assert list(cfg.output[0].dims) == [10] and cfg.output[0].label_filename == "labels.txt"
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert cfg.instance_group[0].count == 2
    assert (tmp_path / "repo" / "digits" / "1" / "model.onnx").is_file()
    assert (tmp_path / "repo" / "digits" / "labels.txt").read_text().split() == [str(i) for i in range(10)]

    static = __import__("vitdeploy.serving.triton", fromlist=["x"]).write_triton_repo(
        digits_onnx["fp32-b4"], tmp_path / "repo", name="static")
    cfg = _parse_pbtxt(static.config)
    assert cfg.max_batch_size == 0 and list(cfg.input[0].dims) == [4, 3, 224, 224]

    # engines (tensorrt_plan, and TensorRT-RTX engines through the Python backend): tests/test_triton.py


def test_load_test_small(runtime, small_onnx):
    _tritonclient()
    from vitdeploy.serving import loadtest

    with Server(runtime, model_name="small", max_batch=8, max_delay_ms=5) as srv:
        report = loadtest.run(srv.url, "small", [8], requests=120, rows=16, reference=small_onnx, time_limit=60)
    (level,) = report.levels
    # every answer equals its own input's logits (checked row by row against the reference computed here)
    assert report.ok and level.sent == level.answered == 120 and level.bad == 0
    # the metrics histogram counted every row exactly once, and concurrent clients really formed batches > 1
    b = level.batches
    assert b.rows == 120 and b.batches < 120 and b.sizes.get("<=1.0", 0) < b.batches
    assert b.mean == pytest.approx(120 / b.batches)


# -- KServe v2 / Triton protocol ---------------------------------------------------------------------------
def _tritonclient():
    return pytest.importorskip("tritonclient.http", reason="tritonclient[http] not installed: "
                               "pip install 'vitdeploy[triton]'")


def test_kserve_v2_with_tritonclient(runtime):
    """tritonclient.http, unchanged, against `vitdeploy serve`: JSON and binary tensors, both ways."""
    httpclient = _tritonclient()
    from tritonclient.utils import InferenceServerException

    x = _inputs(3, seed=5)
    want = runtime.infer(x)
    in_name, out_name = runtime.spec.name, runtime.output_name
    with Server(runtime, model_name="small", max_batch=8) as srv:
        client = httpclient.InferenceServerClient(srv.url.removeprefix("http://"))
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("small")
        assert not client.is_model_ready("other")
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
        meta = client.get_model_metadata("small")
        assert meta["inputs"] == [{"name": in_name, "datatype": "FP32", "shape": [-1, 3, 64, 64]}]
        assert meta["outputs"] == [{"name": out_name, "datatype": "FP32", "shape": [-1, 7]}]
        assert client.get_model_config("small")["max_batch_size"] == 8

        def request(rows, binary_in=True, binary_out=True, **kw):
            inp = httpclient.InferInput(in_name, list(rows.shape), "FP32")
            inp.set_data_from_numpy(rows, binary_data=binary_in)
            outs = [httpclient.InferRequestedOutput(out_name, binary_data=binary_out)]
            return client.infer("small", [inp], outputs=outs, **kw)

        for binary_in in (True, False):
            for binary_out in (True, False):
                res = request(x, binary_in, binary_out, request_id=f"r{binary_in:d}{binary_out:d}")
                assert res.get_response()["id"] == f"r{binary_in:d}{binary_out:d}"
                assert np.abs(res.as_numpy(out_name) - want).max() < 1e-4
                assert ("parameters" in res.get_output(out_name)) == binary_out
        inp = httpclient.InferInput(in_name, [1, 3, 64, 64], "FP32")
        inp.set_data_from_numpy(x[:1])
        for kw in ({}, {"model_version": "1"}, {"request_compression_algorithm": "gzip"},
                   {"request_compression_algorithm": "deflate"}):
            res = client.infer("small", [inp], **kw)  # no outputs named: all come back binary
            assert np.abs(res.as_numpy(out_name) - want[:1]).max() < 1e-4, kw

        half = httpclient.InferInput(in_name, [1, 3, 64, 64], "FP16")
        half.set_data_from_numpy(x[:1].astype(np.float16))
        with pytest.raises(InferenceServerException, match="this model takes FP32"):
            client.infer("small", [half])
        wrong = httpclient.InferInput(in_name, [1, 3, 32, 32], "FP32")
        wrong.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
        with pytest.raises(InferenceServerException, match=r"takes \[n, 3, 64, 64\]"):
            client.infer("small", [wrong])
        named = httpclient.InferInput("images", [1, 3, 64, 64], "FP32")
        named.set_data_from_numpy(x[:1])
        with pytest.raises(InferenceServerException, match=f"this model's input is '{in_name}'"):
            client.infer("small", [named])
        too_many = httpclient.InferInput(in_name, [9, 3, 64, 64], "FP32")
        too_many.set_data_from_numpy(np.repeat(x[:1], 9, axis=0))
        with pytest.raises(InferenceServerException, match=r"1\.\.8 images"):
            client.infer("small", [too_many])
        with pytest.raises(InferenceServerException, match="unknown model 'other'"):
            client.infer("other", [inp])
        client.close()


def test_kserve_v2_errors_over_raw_http(runtime):
    """The v2 JSON error form, for requests tritonclient would never send."""
    import httpx

    # a minute of batch delay: were a failed request's announcement (the adaptive delay) never withdrawn, the
    # good request at the end would wait for it and time out (504) after the 20 s request timeout
    with Server(runtime, model_name="small", max_delay_ms=60_000, request_timeout=20) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        name = runtime.spec.name
        cases = [
            (b"{not json", {}, "not valid JSON"),
            (b'{"inputs": []}', {}, "one tensor"),
            (json.dumps({"inputs": [{"name": name, "datatype": "FP32", "shape": [1, 3, 64, 64],
                                     "data": [0.0] * 5}]}).encode(), {}, "5 values for shape"),
            (json.dumps({"inputs": [{"name": name, "datatype": "FP32", "shape": [1, 3, 64, 64],
                                     "parameters": {"binary_data_size": 49152}}]}).encode() + b"\0" * 100,
             {"inference-header-content-length": "108"}, None),
            (b"{}", {"inference-header-content-length": "99"}, "not a length within"),
            (b"\x1f\x8bgarbage", {"content-encoding": "gzip"}, "not valid gzip"),
        ]
        for body, headers, match in cases:
            r = c.post("/v2/models/small/infer", content=body, headers=headers)
            assert r.status_code == 400, (body[:40], r.text)
            assert set(r.json()) == {"error"} and (match is None or match in r.json()["error"]), r.text
        assert c.get("/v2/models/nope").status_code == 404 and "error" in c.get("/v2/models/nope").json()
        assert c.get("/v2/models/small/versions/2/ready").status_code == 404
        # a deflate bomb: 1 KB that inflates past the body limit is refused, not inflated
        import zlib

        bomb = zlib.compress(b"\0" * 64_000_000, 9)
        r = c.post("/v2/models/small/infer", content=bomb, headers={"content-encoding": "deflate"})
        assert r.status_code == 413 and "decompressed" in r.json()["error"]
        # the inference routes answer outside FastAPI: another model is a 404, another method a 405
        r = c.post("/v2/models/other/infer", content=b"{}", headers={"x-request-id": "abc-1"})
        assert r.status_code == 404 and "unknown model 'other'" in r.json()["error"]
        assert r.headers["x-request-id"] == "abc-1"
        assert c.post("/v2/models/small/versions/3/infer", content=b"{}").status_code == 404
        r = c.get("/v2/models/small/infer")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        r = c.post("/v2/models/small/infer/", content=b"{}")  # FastAPI's redirect, as before the fast path
        assert r.status_code == 307 and r.headers["location"].endswith("/v2/models/small/infer")
        paths = c.get("/openapi.json").json()["paths"]  # still documented
        assert {"/v1/classify", "/v1/logits", "/v2/models/{name}/infer"} <= set(paths)
        assert "post" in paths["/v2/models/{name}/infer"]
        x = _inputs(1, seed=3)
        good = {"inputs": [{"name": name, "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
        r = c.post("/v2/models/small/versions/1/infer", json=good)
        assert r.status_code == 200, r.text
        assert np.abs(np.array(r.json()["outputs"][0]["data"]) - runtime.infer(x).ravel()).max() < 1e-4


def test_kserve_v2_uint8_pixels_and_classify_use_runtime_preprocess(hf_folders, small_onnx, tmp_path):
    """A model exported with its preprocessing in the graph takes UINT8 NHWC over v2, and /v1/classify feeds it
    runtime.preprocess(image): the same logits as the float32 model on the same image."""
    httpclient = _tritonclient()
    from PIL import Image

    from vitdeploy.exporters import ExportOptions, export_onnx
    from vitdeploy.preprocess import Preprocessing, open_image

    u8_path = export_onnx(hf_folders["p16-w48"], tmp_path / "u8.onnx",
                          options=ExportOptions(dynamic_batch=True, uint8_input=True)).path
    with open_runtime(u8_path, threads=1) as u8, open_runtime(small_onnx, threads=1) as f32:
        assert u8.spec.dtype == "uint8" and u8.spec.shape == (64, 64, 3)
        image = open_image(_png((50, 70)))
        pixels = u8.preprocess([image])
        reference = f32.infer(Preprocessing.from_dict(f32.metadata.preprocessing)(image)[None])
        with Server(u8, model_name="u8") as srv:
            client = httpclient.InferenceServerClient(srv.url.removeprefix("http://"))
            assert client.get_model_metadata("u8")["inputs"][0]["datatype"] == "UINT8"
            for binary in (True, False):
                inp = httpclient.InferInput(u8.spec.name, list(pixels.shape), "UINT8")
                inp.set_data_from_numpy(pixels, binary_data=binary)
                got = client.infer("u8", [inp]).as_numpy(u8.output_name)
                assert np.abs(got - reference).max() < 1e-3
            client.close()
            import httpx

            r = httpx.post(srv.url + "/v1/classify?top_k=1", content=_png((50, 70)), timeout=10)
            assert r.status_code == 200, r.text
            assert r.json()["top_k"][0]["index"] == int(reference[0].argmax())
    assert isinstance(image, Image.Image)
