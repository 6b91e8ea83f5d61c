"""Hostile and unlucky clients against `vitdeploy serve` (issue 18, items 8-14): memory per request inside a
budget, slow and idle clients dropped, CPU work off the event loop, 400 (never 500) for malformed numbers and
shapes, non-finite input refused on both serving paths, our own words to clients, a bearer key and TLS. A
hypothesis fuzz of the /v1 and /v2 routes ends the file."""

import gzip
import io
import json
import math
import socket
import subprocess
import sys
import threading
import time
import types
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from benchmarks.hostile_clients import palette_png, stalled_uploads
from vitdeploy.engines import open_runtime

from .http_server import ServeProcess, Server

SHAPE = (3, 64, 64)
BINARY = {"content-type": "application/octet-stream", "x-shape": "1,3,64,64"}


@pytest.fixture(scope="module")
def runtime(serving_onnx):
    with open_runtime(serving_onnx, threads=1) as rt:
        yield rt


def _inputs(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *SHAPE), dtype=np.float32)


def _strict_json(text):
    """json.loads that refuses NaN/Infinity, as every JSON parser but Python's does."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _v2(name, shape, **extra):
    return {"inputs": [{"name": name, "datatype": "FP32", "shape": shape, **extra}]}


# -- 8: memory per request -----------------------------------------------------------------------------------
def test_memory_per_request_is_bounded_by_default(serving_onnx):
    """Default flags: a 6300x6300 palette PNG (40 MP, under the old fixed limit) and a JSON body of 20 MB that
    would parse into ~420 MB of Python lists are refused from their headers and separators, before decoding or
    parsing; a full max-batch JSON request still runs; memory comes back after a burst."""
    import httpx

    bomb = palette_png(6300, 6300)
    dense = b'{"inputs": [' + b"[]," * (6_500_000 - 1) + b"[]]}"  # 19.5 MB: 6.5 M lists, ~420 MB parsed
    full = json.dumps({"inputs": _inputs(32).tolist()}).encode()  # a legal max-batch request, ~9 MB
    with ServeProcess(serving_onnx) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        assert c.post("/v1/logits", content=full, headers={"content-type": "application/json"}).status_code == 200
        base = srv.peak_rss_mb()
        r = c.post("/v1/classify", content=bomb)
        assert r.status_code == 413 and "--max-image-pixels" in r.json()["error"], r.text
        r = c.post("/v1/logits", content=dense, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "--memory-budget" in r.json()["error"], r.text
        peak = srv.peak_rss_mb()
        assert peak - base < 60, (base, peak)  # old code: +420 MB for the JSON, +160 MB for the PNG
        # a burst of large legal requests, then memory back near where it was
        rss_before = srv.rss_mb()
        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda _: c.post("/v1/logits", content=full, headers={
                "content-type": "application/json"}).status_code, range(12)))
        assert set(codes) <= {200, 503} and codes.count(200) >= 6, codes
        time.sleep(0.5)
        rss_after = srv.rss_mb()
        assert rss_after - rss_before < 40, (rss_before, srv.peak_rss_mb(), rss_after)
    print(f"\nmemory: PNG bomb {len(bomb) / 1e3:.1f} KB and dense JSON {len(dense) / 1e6:.0f} MB refused, peak RSS "
          f"{base:.0f} -> {peak:.0f} MB; a burst of 12 max-batch JSON requests: {codes.count(200)} answered, "
          f"RSS {rss_before:.0f} MB before, {rss_after:.0f} MB after")


def test_memory_budget_admits_by_bytes(runtime):
    """Two requests that each need ~60% of the budget never run at once: the second waits for the first
    (while it holds nothing), and one that needs more than the whole budget is refused at once with 413."""
    import httpx

    budget = 48 * 2**20
    x = _inputs(32)
    body = json.dumps({"inputs": x.tolist()}).encode()  # 8.3 MB: charged ~32 MB (text twice, 393 k values)
    with Server(runtime, memory_budget=budget) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        seen = []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                seen.append(srv.app.state.memory_budget.used)
                time.sleep(0.001)

        watcher = threading.Thread(target=watch)
        watcher.start()
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda _: c.post("/v1/logits", content=body, headers={
                "content-type": "application/json"}).status_code, range(4)))
        stop.set()
        watcher.join()
        assert codes == [200] * 4, codes
        assert max(seen) <= budget and srv.app.state.memory_budget.peak <= budget
        assert srv.app.state.memory_budget.used == 0
        too_big = b'{"inputs": [' + b"0," * 1_300_000 + b"0]}"
        assert len(too_big) * 2 < budget  # the text fits; its 1.3 M values parsed would not
        t0 = time.perf_counter()
        r = c.post("/v1/logits", content=too_big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "memory budget" in r.json()["error"] and time.perf_counter() - t0 < 1


def test_default_budget_fits_the_costliest_legal_request():
    """A full max-batch JSON request for a 224x224 model (what the body limit admits) fits the default memory
    budget, so the budget refuses only what the limits never meant to allow."""
    from vitdeploy.serving.limits import default_memory_budget, json_cost
    from vitdeploy.serving.server import DEFAULT_MAX_BODY

    item = 3 * 224 * 224 * 4
    one = json.dumps(np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32).tolist())
    row = one.encode()[1:-1]  # one image's text, as it sits in a batch
    body = b'{"inputs": [' + b", ".join([row] * 32) + b"]}"
    assert len(body) <= max(DEFAULT_MAX_BODY, 6 * 32 * item)  # legal
    assert len(body) + json_cost(body) <= default_memory_budget(item, 32)


# -- 9: slow and idle clients ----------------------------------------------------------------------------------
def _closed_within(sock, seconds):
    """True if the server closes ``sock`` (after any answer) within ``seconds``."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
        return True, data
    except TimeoutError:
        return False, data
    except ConnectionResetError:
        return True, data


def test_stalled_upload_is_dropped_and_its_memory_freed(runtime):
    with Server(runtime, body_timeout=0.5, memory_budget=256 * 2**20) as srv:  # room for all four
        socks = stalled_uploads(srv.port, 4, b"Content-Type: application/json\r\nContent-Length: 10000000\r\n",
                                b"[" * 1_000_000)
        time.sleep(0.2)
        assert srv.app.state.memory_budget.used >= 4 * 10_000_000  # the declared bodies are held...
        t0 = time.perf_counter()
        answers = [_closed_within(s, 3) for s in socks]
        waited = time.perf_counter() - t0
        for s in socks:
            s.close()
        assert all(closed for closed, _ in answers), answers
        assert all(data.startswith(b"HTTP/1.1 408") and b"no data for 0.5 s" in data for _, data in answers)
        assert waited < 2 and srv.app.state.memory_budget.used == 0  # ...and given back when dropped


def test_dripping_upload_is_dropped_at_the_request_deadline(runtime):
    """A byte every 0.2 s never trips the 0.5 s idle timeout, but the body must be all in by the request's
    deadline: 408 then, and the memory it held is given back."""
    with Server(runtime, body_timeout=0.5, request_timeout=1.5) as srv:
        (sock,) = stalled_uploads(srv.port, 1, b"Content-Type: application/json\r\nContent-Length: 100000\r\n", b"[")
        t0, answer = time.perf_counter(), b""
        sock.settimeout(0.2)
        try:
            while time.perf_counter() - t0 < 5 and not answer:
                try:
                    sock.sendall(b"0,")
                    answer = sock.recv(65536)
                except TimeoutError:
                    pass
        except (BrokenPipeError, ConnectionResetError):
            pass
        waited = time.perf_counter() - t0
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408") and b"not all sent within the 1.5 s request timeout" in answer, answer
        assert 1.0 < waited < 3 and srv.app.state.memory_budget.used == 0


def test_idle_and_half_sent_heads_are_closed_and_connections_limited(runtime):
    import httpx

    with Server(runtime, uvicorn_options={"header_timeout": 0.5, "limit_concurrency": 12,
                                          "keep_alive": 30}) as srv:
        socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(10)]
        for i, s in enumerate(socks):
            if i % 2:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        # a kept-alive connection that starts its second request and stalls (uvicorn's keep-alive timer stops
        # at the first byte)
        kept = socket.create_connection(("127.0.0.1", srv.port))
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept.recv(4096).startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET /healthz HTT")
        with httpx.Client(base_url=srv.url, timeout=5) as c:
            r = c.get("/healthz")  # 12 connections open now: the limit answers 503 beyond it
            assert r.status_code == 503, r.status_code
        t0 = time.perf_counter()
        results = [_closed_within(s, 3)[0] for s in [*socks, kept]]
        assert all(results) and time.perf_counter() - t0 < 2, results
        for s in [*socks, kept]:
            s.close()
        time.sleep(0.1)
        assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200


# -- 10: CPU work off the event loop ------------------------------------------------------------------------------
def _probe_latencies(url, stop):
    import httpx

    latencies = []
    with httpx.Client(timeout=10) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            assert c.get(url + "/healthz").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.01)
    return latencies


def test_gzip_bombs_do_not_stall_healthz(serving_onnx):
    import httpx

    bomb = gzip.compress(b"\0" * 114_000_000, 9)  # ~111 KB that inflates to 114 MB
    with ServeProcess(serving_onnx, "--name", "m") as srv:
        stop = threading.Event()
        with ThreadPoolExecutor(21) as pool:
            probe = pool.submit(_probe_latencies, srv.url, stop)
            time.sleep(0.2)
            bombs = [pool.submit(httpx.post, srv.url + "/v2/models/m/infer", content=bomb, timeout=30,
                                 headers={"content-encoding": "gzip"}) for _ in range(20)]
            codes = [f.result(60).status_code for f in bombs]
            time.sleep(0.1)
            stop.set()
            latencies = probe.result(10)
        assert set(codes) <= {413, 503} and 413 in codes, codes
        assert 'vitdeploy_request_memory_bytes 0.0' in httpx.get(srv.url + "/metrics").text
    worst = max(latencies)
    print(f"\ngzip: 20 bombs of {len(bomb) / 1e3:.0f} KB -> {codes.count(413)} x 413, {codes.count(503)} x 503; "
          f"/healthz worst {worst * 1e3:.0f} ms over {len(latencies)} probes")
    # old code inflated on the loop: 2.2-2.4 s worst on this shared 2-core box under load; here the inflating
    # thread, the clients and other tests share the cores with the probe (0.15-0.46 s seen under load 5, so a
    # loose bound); test_inflating_runs_off_the_event_loop_thread is the exact check, the hostile-client
    # script measures against 100 ms
    assert worst < 1.0, sorted(latencies)[-5:]


def test_inflating_runs_off_the_event_loop_thread(runtime, monkeypatch):
    import httpx

    from vitdeploy.serving import parsing

    threads = []

    class Recording:
        def __getattr__(self, name):
            return getattr(zlib, name)

        def decompressobj(self, *a):
            threads.append(threading.current_thread())
            return zlib.decompressobj(*a)

    monkeypatch.setattr(parsing, "zlib", Recording())
    x = _inputs(1)
    with Server(runtime) as srv:
        r = httpx.post(srv.url + "/v1/logits", content=gzip.compress(json.dumps({"inputs": x.tolist()}).encode()),
                       headers={"content-encoding": "gzip", "content-type": "application/json"}, timeout=10)
        assert r.status_code == 200 and np.abs(np.array(r.json()["logits"]) - runtime.infer(x)).max() < 1e-4
        assert threads and srv.thread not in threads  # srv.thread runs uvicorn's event loop


def test_multipart_parsing_runs_off_the_event_loop(runtime, monkeypatch):
    import httpx
    from PIL import Image

    from vitdeploy.serving import parsing

    real = parsing.multipart_file

    def slow(*a):
        time.sleep(1.0)
        return real(*a)

    monkeypatch.setattr(parsing, "multipart_file", slow)
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), (10, 200, 30)).save(buf, "PNG")
    with Server(runtime) as srv, httpx.Client(base_url=srv.url, timeout=10) as c, ThreadPoolExecutor(1) as pool:
        form = pool.submit(c.post, "/v1/classify", files={"file": ("x.png", buf.getvalue(), "image/png")})
        time.sleep(0.2)
        t0 = time.perf_counter()
        assert c.get("/healthz").status_code == 200 and time.perf_counter() - t0 < 0.5
        assert form.result(10).status_code == 200


# -- 11: malformed numbers are a 400 ----------------------------------------------------------------------------
def test_malformed_lengths_shapes_and_nesting_are_400(runtime):
    import httpx

    name = runtime.spec.name
    huge = [2**54, 3, 64, 64]  # np.prod wraps this to 0
    with Server(runtime) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        cases = [
            ("/v2/models/m/infer", b"{}", {"inference-header-content-length": "\u00b2".encode("latin-1")}),
            ("/v2/models/m/infer", b"{}", {"inference-header-content-length": "9" * 5000}),
            ("/v2/models/m/infer", json.dumps(_v2(name, huge, parameters={"binary_data_size": 0})).encode(), {}),
            ("/v2/models/m/infer", json.dumps(_v2(name, huge, data=[])).encode(), {}),
            ("/v2/models/m/infer", b"[" * 100_000, {}),
            ("/v2/models/m/infer", json.dumps(_v2(name, [1, 3, 64, 64], data=[[[[0.0] * 64] * 64] * 3],
                                                  parameters=[1])).encode(), {}),
            ("/v1/logits", b"", {**BINARY, "x-shape": f"{2**52},3,64,64"}),
            ("/v1/logits", b"", {**BINARY, "x-shape": "\u00b9,3,64,64".encode("latin-1")}),
            ("/v1/logits", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}),
            ("/v1/logits", b"[" * 100_000, {}),
        ]
        for path, body, headers in cases:
            r = c.post(path, content=body, headers=headers)
            assert r.status_code == 400, (path, body[:40], headers, r.status_code, r.text)
            assert "internal error" not in r.text
        assert c.get("/healthz").status_code == 200


# -- 12: NaN and infinity -----------------------------------------------------------------------------------------
def test_non_finite_input_is_refused_and_answers_are_strict_json(runtime):
    import httpx

    x = _inputs(1)
    bad = x.copy()
    bad[0, 0, 5, 5] = np.nan
    worse = x.copy()
    worse[0, 1, 2, 3] = np.inf
    name = runtime.spec.name
    with Server(runtime) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        requests = [
            ("/v1/logits", json.dumps({"inputs": bad.tolist()}).encode(), {"content-type": "application/json"}),
            ("/v1/logits", worse.tobytes(), BINARY),
            ("/v2/models/m/infer", json.dumps(_v2(name, [1, *SHAPE], data=bad.ravel().tolist())).encode(), {}),
        ]
        head = json.dumps(_v2(name, [1, *SHAPE], parameters={"binary_data_size": worse.nbytes})).encode()
        requests.append(("/v2/models/m/infer", head + worse.tobytes(),
                         {"inference-header-content-length": str(len(head))}))
        for path, body, headers in requests:
            r = c.post(path, content=body, headers=headers)
            assert r.status_code == 400 and "NaN or infinite" in _strict_json(r.text)["error"], (path, r.text)
        good = c.post("/v1/logits", json={"inputs": x.tolist()})
        assert good.status_code == 200 and np.isfinite(_strict_json(good.text)["logits"]).all()
        # finite but no normalized image (hypothesis found 5.9e20s overflowing the model into NaN: a 500)
        huge = np.full_like(x, 5.9e20)
        head = json.dumps(_v2(name, [1, *SHAPE], parameters={"binary_data_size": huge.nbytes})).encode()
        r = c.post("/v2/models/m/infer", content=head + huge.tobytes(),
                   headers={"inference-header-content-length": str(len(head))})
        assert r.status_code == 400 and "beyond +-1e+06" in _strict_json(r.text)["error"], r.text


def test_a_model_answering_nan_never_emits_invalid_json(runtime):
    import httpx

    from vitdeploy.engines.base import Runtime

    class NaNModel(Runtime):
        backend = "nan"

        def __init__(self, inner):
            self.spec, self.metadata, self.output_name = inner.spec, inner.metadata, inner.output_name

        def _run(self, x):
            return np.full((len(x), 7), np.nan, np.float32)

    with Server(NaNModel(runtime)) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        for path, body in (("/v1/logits", {"inputs": _inputs(1).tolist()}),
                           ("/v2/models/m/infer", _v2(runtime.spec.name, [1, *SHAPE],
                                                     data=_inputs(1).ravel().tolist()))):
            r = c.post(path, json=body)
            assert r.status_code == 500 and "NaN" in _strict_json(r.text)["error"], r.text


def _fake_triton_utils():
    utils = types.ModuleType("triton_python_backend_utils")

    class TritonError:
        INVALID_ARG, INTERNAL = 3, 13

        def __init__(self, message, code):
            self.message, self.code = message, code

    class Response:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error = output_tensors, error

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    logged = []
    utils.TritonError, utils.InferenceResponse, utils.Tensor = TritonError, Response, Tensor
    utils.Logger = types.SimpleNamespace(log_error=logged.append, log_info=logged.append)
    utils.get_input_tensor_by_name = lambda request, name: Tensor(name, request[name])
    utils.logged = logged
    return utils


def test_triton_model_applies_the_same_rules(runtime, monkeypatch):
    """The Triton Python model refuses non-finite input with the words `vitdeploy serve` uses, and never
    passes an exception's text to the client (it goes to Triton's log)."""
    utils = _fake_triton_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    monkeypatch.delitem(sys.modules, "vitdeploy.serving.triton_model", raising=False)
    from vitdeploy.serving.limits import non_finite_reason
    from vitdeploy.serving.triton_model import TritonPythonModel

    class Exploding:
        spec = runtime.spec

        def infer(self, x):
            if np.any(x == 99):
                raise RuntimeError("secret at 0x7f00deadbeef in /srv/internal/path")
            return runtime.infer(x)

    model = TritonPythonModel()
    model.rt, model.input_name, model.output_name = Exploding(), runtime.spec.name, "logits"
    x = _inputs(3)
    nan, boom = x[:1].copy(), x[1:2].copy()
    nan[0, 0, 0, 0] = np.nan
    boom[0, 0, 0, 0] = 99
    out = model.execute([{runtime.spec.name: nan}, {runtime.spec.name: boom}, {runtime.spec.name: x[2:3]}])
    assert out[0].error.message == non_finite_reason(nan, runtime.spec.name)
    assert out[0].error.code == utils.TritonError.INVALID_ARG
    assert "secret" not in out[1].error.message and "0x" not in out[1].error.message
    assert any("secret at 0x7f00deadbeef" in line for line in utils.logged)
    assert np.abs(out[2].output_tensors[0].array - runtime.infer(x[2:3])).max() < 1e-4


# -- 13: our own words --------------------------------------------------------------------------------------------
def test_library_text_never_reaches_clients(runtime, caplog):
    import logging

    import httpx

    caplog.set_level(logging.INFO, logger="vitdeploy.serve")
    with Server(runtime) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        answers = [
            c.post("/v1/classify", content=b"GIF89a" + b"\xff" * 200),
            c.post("/v1/classify", content=b"\x89PNG\r\n\x1a\n" + b"\0" * 64),
            c.post("/v1/classify", content=b"--x\r\nbroken", headers={
                "content-type": "multipart/form-data; boundary=x"}),
            c.post("/v1/classify?top_k=abc", content=b"garbage"),
        ]
    for r in answers:
        error = r.json()["error"]
        assert r.status_code == 400, r.text
        for leak in ("0x", "BytesIO", "PIL", "Error:", "int_parsing", "<"):
            assert leak not in error, error
    assert "cannot identify image file" in caplog.text or "UnidentifiedImageError" in caplog.text


# -- 14: key and TLS -------------------------------------------------------------------------------------------------
def test_api_key_guards_every_route_but_public_probes(runtime, monkeypatch):
    import hmac

    import httpx

    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    x = {"inputs": _inputs(1).tolist()}
    for public in (False, True):
        with Server(runtime, api_key="s3cret-key", public_probes=public) as srv, \
                httpx.Client(base_url=srv.url, timeout=10) as c:
            for auth in (None, "Bearer wrong", "Basic s3cret-key", "Bearer s3cret-keyX", "s3cret-key"):
                r = c.post("/v1/logits", json=x, headers={"authorization": auth} if auth else {})
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (auth, r.text)
            assert c.get("/v2/models/m").status_code == 401
            good = {"authorization": "Bearer s3cret-key"}
            assert c.post("/v1/logits", json=x, headers=good).status_code == 200
            assert c.get("/v2/models/m", headers=good).status_code == 200
            for probe in ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"):
                assert c.get(probe).status_code == (200 if public else 401), probe
                assert c.get(probe, headers=good).status_code == 200
    assert compared  # the key is compared in constant time


def _self_signed(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.mark.skipif(subprocess.run(["which", "openssl"], capture_output=True).returncode != 0,
                    reason="needs the openssl CLI to make a certificate")
def test_tls(runtime, tmp_path):
    import httpx

    cert, key = _self_signed(tmp_path)
    options = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    with Server(runtime, uvicorn_options=options, api_key="k") as srv:
        assert srv.url.startswith("https://")
        with httpx.Client(base_url=srv.url, verify=str(cert), timeout=10) as c:
            r = c.post("/v1/logits", json={"inputs": _inputs(1).tolist()}, headers={"authorization": "Bearer k"})
            assert r.status_code == 200 and len(r.json()["logits"][0]) == 7
        with pytest.raises(httpx.TransportError):  # plain HTTP on the TLS port gets no answer
            httpx.get(srv.url.replace("https://", "http://") + "/healthz", timeout=5)


def test_serve_warns_when_exposed_and_reads_its_key_file(tmp_path):
    from click.testing import CliRunner

    from vitdeploy.cli import main
    from vitdeploy.serving.limits import exposure_warning

    assert exposure_warning("127.0.0.1", False, False) is None and exposure_warning("::1", False, False) is None
    assert exposure_warning("localhost", False, False) is None
    assert exposure_warning("10.1.2.3", True, True) is None
    assert "--api-key-file" in exposure_warning("0.0.0.0", False, True)
    assert "clear text" in exposure_warning("0.0.0.0", True, False)
    missing = str(tmp_path / "missing.onnx")
    out = CliRunner().invoke(main, ["serve", "--model", missing, "--host", "0.0.0.0"])
    assert "warning: serving on 0.0.0.0" in out.output and "--api-key-file" in out.output, out.output
    empty = tmp_path / "key"
    empty.write_text("\n")
    out = CliRunner().invoke(main, ["serve", "--model", missing, "--api-key-file", str(empty)])
    assert out.exit_code != 0 and "is empty" in out.output, out.output


def test_a_key_no_client_can_send_is_refused_at_start_up(runtime, tmp_path):
    """Issue 29, item 11: a key with non-ASCII characters never matched (the header is read as latin-1, the key
    encoded as UTF-8), so every request got 401. Refused at start-up, in the library and by `serve` (exit 2),
    with a one-line error that does not quote the key. Old code started the server."""
    import httpx
    from click.testing import CliRunner

    from vitdeploy.cli import main
    from vitdeploy.errors import VitDeployError
    from vitdeploy.serving.server import create_app

    for key in ("clé-secrète", "two words", "tab\tkey"):
        with pytest.raises(VitDeployError, match="not visible ASCII"):
            create_app(runtime, api_key=key)
    key_file = tmp_path / "key"
    key_file.write_text("clé-secrète\n", encoding="utf-8")
    for flags in (["--api-key-file", str(key_file)], ["--api-key", "mot-de-passe-é"]):
        out = CliRunner().invoke(main, ["serve", "--model", str(tmp_path / "missing.onnx"), *flags])
        assert out.exit_code == 2 and "character" in out.output and "not visible ASCII" in out.output, out.output
        assert "secr" not in out.output and "passe" not in out.output and "Traceback" not in out.output
    with Server(runtime, api_key="A-z0-9._~+/=") as srv:  # every visible ASCII character class still works
        r = httpx.post(srv.url + "/v1/logits", json={"inputs": _inputs(1).tolist()},
                       headers={"authorization": "Bearer A-z0-9._~+/="}, timeout=10)
        assert r.status_code == 200, r.text


# -- fuzz: arbitrary bytes, headers and JSON -------------------------------------------------------------------------
FUZZ_EXAMPLES = {"v1": 120, "v2": 120, "headers": 80}


def _fuzz_server(runtime):
    return Server(runtime, max_body_bytes=600_000, request_timeout=5, memory_budget=64 * 2**20)


def _json_values():
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
               | st.text(max_size=8))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.sampled_from(["inputs", "name", "datatype", "shape", "data",
                                                           "parameters", "binary_data_size", "outputs", "id",
                                                           "binary_data", "x"]), inner, max_size=5),
                        max_leaves=24)


def _assert_clean(r, seen):
    seen.append(r.status_code)
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.headers.get("content-type", "").startswith("application/json"):
        _strict_json(r.text)
    assert "Traceback" not in r.text


def test_fuzz_routes_never_500(runtime):
    import httpx
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    name = runtime.spec.name
    seen: list[int] = []
    fuzz = settings(deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))
    header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=24)
    values = math.prod(SHAPE)  # a whole image's worth, so some cases reach the model (and NaN/inf patterns)
    full_data = st.floats(width=32).map(lambda v: [v] * values)
    full_binary = st.binary(min_size=4, max_size=8).map(lambda b: (b * values)[:4 * values])
    sized = {"parameters": {"binary_data_size": 4 * values}}
    with _fuzz_server(runtime) as srv, httpx.Client(base_url=srv.url, timeout=20) as c:
        @settings(fuzz, max_examples=FUZZ_EXAMPLES["v1"])
        @given(body=st.binary(max_size=300) | _json_values().map(lambda v: json.dumps(v).encode()),
               path=st.sampled_from(["/v1/logits", "/v1/classify", "/v1/classify?top_k=3"]),
               ctype=st.sampled_from(["application/json", "application/octet-stream", "image/png",
                                      "multipart/form-data; boundary=b", "text/plain"]),
               shape=header_values | st.sampled_from(["1,3,64,64", "3,64,64", "0,3,64,64", "1,1"]))
        def v1(body, path, ctype, shape):
            _assert_clean(c.post(path, content=body, headers={"content-type": ctype,
                                                                "x-shape": shape.encode("latin-1")}), seen)

        base = {"name": name, "datatype": "FP32", "shape": [1, *SHAPE]}
        random_input = st.fixed_dictionaries({"name": st.sampled_from([name, "x"]),
                                              "datatype": st.sampled_from(["FP32", "INT8", "fp32"]),
                                              "shape": st.just([2**54, *SHAPE])
                                              | st.lists(st.integers(-2, 2**63), max_size=5)},
                                             optional={"data": _json_values(), "parameters": _json_values()})

        @settings(fuzz, max_examples=FUZZ_EXAMPLES["v2"])
        @given(inp=random_input | full_data.map(lambda d: {**base, "data": d}) | st.just({**base, **sized}),
               extra=st.none() | _json_values(), tail=st.binary(max_size=64) | full_binary)
        def v2(inp, extra, tail):
            request = {"inputs": [inp]} if extra is None else {"inputs": [inp], "outputs": extra, "parameters": extra}
            head = json.dumps(request).encode()
            _assert_clean(c.post("/v2/models/m/infer", content=head), seen)
            _assert_clean(c.post("/v2/models/m/infer", content=head + tail,
                                 headers={"inference-header-content-length": str(len(head))}), seen)

        @settings(fuzz, max_examples=FUZZ_EXAMPLES["headers"])
        @given(headers=st.dictionaries(st.sampled_from(["inference-header-content-length", "content-encoding",
                                                        "content-type", "x-shape", "x-request-id", "accept"]),
                                       header_values, max_size=4),
               body=st.binary(max_size=200))
        def any_headers(headers, body):
            encoded = {k: v.encode("latin-1") for k, v in headers.items()}
            for path in ("/v2/models/m/infer", "/v1/logits"):
                _assert_clean(c.post(path, content=body, headers=encoded), seen)

        v1()
        v2()
        any_headers()
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        ok = c.post("/v1/logits", content=_inputs(1).tobytes(), headers=BINARY)
        assert ok.status_code == 200 and np.isfinite(_strict_json(ok.text)["logits"]).all()
        assert srv.app.state.memory_budget.used == 0
    print(f"\nfuzz: {len(seen)} requests ({sum(FUZZ_EXAMPLES.values())} examples), codes "
          f"{dict(sorted((k, seen.count(k)) for k in set(seen)))}")
    assert len(seen) >= math.floor(0.9 * (FUZZ_EXAMPLES['v1'] + 2 * FUZZ_EXAMPLES['v2'] + 2 * FUZZ_EXAMPLES['headers']))


# -- issue 29, item 1: a uint8 model; no request's type can fail another's ------------------------------------------
U8_SHAPE = (64, 64, 3)


@pytest.fixture(scope="module")
def u8_runtime(hf_folders, tmp_path_factory):
    """The small ViT exported with its preprocessing in the graph: UINT8 NHWC pixels in."""
    from vitdeploy.exporters import ExportOptions, export_onnx

    path = export_onnx(hf_folders["p16-w48"], tmp_path_factory.mktemp("u8") / "u8.onnx",
                       options=ExportOptions(dynamic_batch=True, uint8_input=True)).path
    with open_runtime(path, threads=1) as rt:
        assert rt.spec.dtype == "uint8" and rt.spec.shape == U8_SHAPE
        yield rt


def _pixels(rows, seed):
    return np.random.default_rng(seed).integers(0, 256, (rows, *U8_SHAPE), dtype=np.uint8)


def _u8_request(kind, rows, seed, name):
    """(path, body, headers, valid pixels or None) for one request of ``kind`` on the uint8 model."""
    px = _pixels(rows, seed)
    f32 = px.astype(np.float32)
    v1_json = {"content-type": "application/json"}
    v1_bin = {"content-type": "application/octet-stream", "x-shape": ",".join(map(str, px.shape))}
    v2 = {"name": name, "datatype": "UINT8", "shape": list(px.shape)}
    if kind == "v2_binary":
        head = json.dumps({"inputs": [{**v2, "parameters": {"binary_data_size": px.nbytes}}]}).encode()
        return "/v2/models/m/infer", head + px.tobytes(), {"inference-header-content-length": str(len(head))}, px
    if kind == "v2_json":
        return "/v2/models/m/infer", json.dumps({"inputs": [{**v2, "data": px.ravel().tolist()}]}).encode(), {}, px
    if kind == "v1_json":  # float numbers that are whole pixels: converted for this request alone
        return "/v1/logits", json.dumps({"inputs": f32.tolist()}).encode(), v1_json, px
    if kind == "v1_binary":
        return "/v1/logits", f32.tobytes(), v1_bin, px
    bad = f32.copy()
    bad.flat[seed % bad.size] = {"v1_fraction": 0.5, "v1_range": 256.0, "v1_negative": -1.0, "v1_nan": np.nan,
                                 "v1_binary_fraction": 17.25}.get(kind, 0.0)
    if kind == "v1_binary_fraction":
        return "/v1/logits", bad.tobytes(), v1_bin, None
    if kind.startswith("v1_"):
        return "/v1/logits", json.dumps({"inputs": bad.tolist()}).encode(), v1_json, None
    data = px.ravel().tolist()
    if kind == "v2_range":
        data[seed % len(data)] = 300
        return "/v2/models/m/infer", json.dumps({"inputs": [{**v2, "data": data}]}).encode(), {}, None
    if kind == "v2_fraction":
        data[seed % len(data)] = 2.5
        return "/v2/models/m/infer", json.dumps({"inputs": [{**v2, "data": data}]}).encode(), {}, None
    assert kind == "v2_fp32"
    body = {"inputs": [{**v2, "datatype": "FP32", "data": f32.ravel().tolist()}]}
    return "/v2/models/m/infer", json.dumps(body).encode(), {}, None


U8_VALID = ["v2_binary", "v2_json", "v1_json", "v1_binary"]
U8_INVALID = ["v1_fraction", "v1_range", "v1_negative", "v1_nan", "v1_binary_fraction", "v2_range", "v2_fraction",
              "v2_fp32"]


def _logits_of(r, path):
    body = r.json()
    return np.array(body["logits"] if path == "/v1/logits" else body["outputs"][0]["data"]).reshape(-1, 7)


def test_uint8_model_takes_float_json_on_v1_logits_alone(u8_runtime):
    """/v1/logits JSON (and float32 bytes) on a uint8 model: whole numbers 0..255 are this request's pixels
    (old code: 500, the float32 batch failed the runtime's input check); anything else is a 400 naming the fix."""
    import httpx

    px = _pixels(2, 5)
    want = u8_runtime.infer(px)
    with Server(u8_runtime) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        for kind in ("v1_json", "v1_binary"):
            path, body, headers, _ = _u8_request(kind, 2, 5, u8_runtime.spec.name)
            r = c.post(path, content=body, headers=headers)
            assert r.status_code == 200, (kind, r.text)
            assert np.abs(_logits_of(r, path) - want).max() < 1e-4
        for kind in U8_INVALID:
            path, body, headers, _ = _u8_request(kind, 1, 3, u8_runtime.spec.name)
            r = c.post(path, content=body, headers=headers)
            assert r.status_code == 400 and ("0 to 255" in r.text or "takes UINT8" in r.text), (kind, r.text)


def test_uint8_mixed_clients_each_valid_request_gets_its_own_200(u8_runtime):
    """Property (issue 29, item 1): any mix of valid and invalid requests on a uint8 model, sent at once from any
    number of clients into shared batches (a fixed 15 ms batching delay), gives every valid request a 200 with
    its own logits and every invalid one a 400. Old code: a float request turned its whole batch float32, and
    every request in that batch failed with 500."""
    import httpx
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    name = u8_runtime.spec.name
    requests = st.lists(st.tuples(st.sampled_from(U8_VALID + U8_INVALID), st.integers(1, 3),
                                  st.integers(0, 10_000)), min_size=2, max_size=10)
    with Server(u8_runtime, max_delay_ms=15, adaptive_delay=False) as srv:
        clients = [httpx.Client(base_url=srv.url, timeout=20) for _ in range(6)]

        @settings(deadline=None, derandomize=True, database=None, max_examples=30,
                  suppress_health_check=list(HealthCheck))
        @given(reqs=requests, n_clients=st.integers(1, 6))
        def mixed(reqs, n_clients):
            made = [_u8_request(kind, rows, seed, name) for kind, rows, seed in reqs]
            want = [None if px is None else u8_runtime.infer(px) for *_, px in made]
            start = threading.Barrier(n_clients)

            def client(i):
                start.wait()
                return [(j, clients[i].post(made[j][0], content=made[j][1], headers=made[j][2]))
                        for j in range(i, len(made), n_clients)]

            with ThreadPoolExecutor(n_clients) as pool:
                answers = [a for part in pool.map(client, range(n_clients)) for a in part]
            for j, r in answers:
                if want[j] is None:
                    assert r.status_code == 400, (reqs[j], r.status_code, r.text[:200])
                else:
                    assert r.status_code == 200, (reqs[j], r.status_code, r.text[:200])
                    assert np.abs(_logits_of(r, made[j][0]) - want[j]).max() < 1e-3, reqs[j]

        try:
            mixed()
        finally:
            for c in clients:
                c.close()
        batches = srv.app.state.batcher.stats
        assert batches.batches < batches.requests  # requests did share batches
        assert srv.app.state.memory_budget.used == 0


def test_batcher_refuses_a_type_its_model_cannot_take_alone(u8_runtime):
    """The batcher's own guard, for callers that skip the parser: float pixels for a uint8 model are refused at
    submit (ValueError, a 400 in the server), and uint8 requests queued beside them all run. Old code queued
    them, and the float request turned the whole batch float32, failing every request in it."""
    from vitdeploy.serving import DynamicBatcher

    good = [_pixels(1, s) for s in range(4)]
    with DynamicBatcher(u8_runtime, max_batch_size=8, max_delay_ms=50) as batcher:
        futures = [batcher.submit(good[0]), batcher.submit(good[1])]
        with pytest.raises(ValueError, match="takes uint8 pixels"):
            batcher.submit(good[2].astype(np.float32))
        futures += [batcher.submit(good[2]), batcher.submit(good[3])]
        for px, f in zip(good, futures, strict=True):
            assert np.abs(f.result(10) - u8_runtime.infer(px)).max() < 1e-4


def test_a_value_beyond_a_float16_models_range_is_a_400_alone_or_batched(hf_folders, tmp_path):
    """A float16-input model (--fp16-io) and float32 pixels of 70000 (finite, beyond float16's 65504): the request
    is cast to the model's type as it is parsed, and refused with 400, alone or beside good ones that all get their
    200. Old code: alone in its batch it reached the runtime as float32, became infinity, and the NaN logits were a
    500 blaming the artifact."""
    import httpx

    from vitdeploy.exporters import ExportOptions, export_onnx

    path = export_onnx(hf_folders["p16-w48"], tmp_path / "f16.onnx", options=ExportOptions(
        dynamic_batch=True, precision="fp16", fp16_io=True)).path
    big = np.full((1, *SHAPE), 70000, np.float32)
    good = np.random.default_rng(0).standard_normal((1, *SHAPE)).astype(np.float32)
    with open_runtime(path, threads=1) as rt, Server(rt, max_delay_ms=15, adaptive_delay=False) as srv:
        assert rt.spec.dtype == "float16"
        for body, headers in (({"inputs": big.tolist()}, None), (big.tobytes(), BINARY)):
            kw = {"json": body} if headers is None else {"content": body, "headers": headers}
            r = httpx.post(srv.url + "/v1/logits", timeout=20, **kw)
            assert r.status_code == 400 and "beyond its range" in r.json()["error"], r.text
        with ThreadPoolExecutor(4) as pool:
            sent = [big, good, big, good]
            codes = list(pool.map(lambda x: httpx.post(srv.url + "/v1/logits", json={"inputs": x.tolist()},
                                                        timeout=20).status_code, sent))
        assert codes == [400, 200, 400, 200], codes


# -- issue 29, item 2: crop_pct and thin images ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def crop_onnx(serving_onnx, tmp_path_factory):
    """The small ViT as a timm-style artifact: crop_pct 0.9 in its preprocessing metadata."""
    import dataclasses

    import onnx

    from vitdeploy.artifacts.metadata import read_onnx_metadata, set_metadata

    meta = read_onnx_metadata(serving_onnx)
    model = onnx.load(str(serving_onnx))
    set_metadata(model, dataclasses.replace(meta, preprocessing={**meta.preprocessing, "crop_pct": 0.9}))
    path = tmp_path_factory.mktemp("crop") / "crop.onnx"
    onnx.save(model, str(path))
    return path


def _noise_png(width, height):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_thin_image_under_crop_pct_is_refused_before_its_resize(crop_onnx):
    """A 24190x10 PNG (242 k pixels, 6% of the pixel limit) under crop_pct 0.9 asks for a resize to 172k x 71
    (12 M pixels) before its centre crop: refused with 400 from the header, and the server's peak RSS stays
    where it was. Old code resized it (answered 200, RSS up by the resize: ~100 MB here, 584 MB at 224x224)."""
    import httpx

    thin = _noise_png(24190, 10)
    with ServeProcess(crop_onnx, "--no-verify") as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        assert c.post("/v1/classify", content=_noise_png(80, 60)).status_code == 200
        base = srv.peak_rss_mb()
        r = c.post("/v1/classify", content=thin)
        assert r.status_code == 400 and "crop_pct" in r.json()["error"], r.text
        assert "--max-image-pixels" in r.json()["error"]
        peak = srv.peak_rss_mb()
        assert peak - base < 25, (base, peak)
        assert c.post("/v1/classify", content=_noise_png(80, 60)).status_code == 200
    print(f"\nthin image: {len(thin) / 1e3:.0f} kB PNG of 24190x10 refused; peak RSS {base:.0f} -> {peak:.0f} MB")


def test_resize_before_the_crop_is_charged_to_the_memory_budget(crop_onnx):
    """A 2000x10 image under crop_pct 0.9 (a ~14200x71 resize, within the pixel limit) is answered, and the
    resize is charged to the memory budget before it runs: the budget's peak covers it. With a budget too
    small for that resize, the same image is refused with 413 before it is decoded. Old code charged only
    the decoded pixels (16 bytes each: 320 kB)."""
    import httpx

    thin = _noise_png(2000, 10)
    nw, nh = 14000, 71  # the short side 10 -> 64 / 0.9 = 71 (x 7.1), so the long side 2000 -> over 14000
    with open_runtime(crop_onnx, threads=1) as rt:
        with Server(rt) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
            r = c.post("/v1/classify?top_k=1", content=thin)
            assert r.status_code == 200, r.text
            assert srv.app.state.memory_budget.peak >= 4 * nw * nh  # at least the resized image, 4 bytes a pixel
            assert srv.app.state.memory_budget.used == 0
        with Server(rt, memory_budget=4 * 2**20) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
            r = c.post("/v1/classify", content=thin)
            assert r.status_code == 413 and "--memory-budget" in r.json()["error"], r.text


def test_fuzz_image_shapes_under_crop_pct(crop_onnx):
    """Fuzz (issue 29, item 2): images of any shape, thin ones most, on a crop_pct 0.9 artifact with a 1 MP
    pixel limit: 200 exactly when the resize before the crop fits the limit, otherwise 400 or 413 (never 500),
    and the memory budget's peak stays within its capacity."""
    import httpx
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from vitdeploy.preprocess import Preprocessing

    limit = 1_000_000
    sides = st.integers(1, 20) | st.integers(1, 3000) | st.integers(3000, 60_000)
    with open_runtime(crop_onnx, threads=1) as rt:
        prep = Preprocessing.from_dict(rt.metadata.preprocessing)
        with Server(rt, max_image_pixels=limit, memory_budget=64 * 2**20) as srv, \
                httpx.Client(base_url=srv.url, timeout=30) as c:
            @settings(deadline=None, derandomize=True, database=None, max_examples=40,
                      suppress_health_check=list(HealthCheck))
            @given(width=sides, height=sides)
            def shapes(width, height):
                if width * height > 4 * limit:  # not worth encoding: refused from the header (413)
                    width = max(1, 4 * limit // height)
                r = c.post("/v1/classify", content=_noise_png(width, height))
                nw, nh = prep.resized_size(width, height)
                if width * height > limit:
                    assert r.status_code == 413, (width, height, r.text)
                elif nw * nh > limit:
                    assert r.status_code == 400 and "crop_pct" in r.text, (width, height, r.text)
                else:
                    assert r.status_code == 200, (width, height, r.text)

            shapes()
            budget = srv.app.state.memory_budget
            assert budget.peak <= budget.capacity and budget.used == 0
