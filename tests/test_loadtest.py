"""`vitdeploy bench --url`: the load test against a real `vitdeploy serve` process, a real tritonserver, and a
fake KServe v2 server that crosses answers between concurrent requests (which the check must catch)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from click.testing import CliRunner

from tests.http_server import ServeProcess
from tests.test_triton import local_triton  # noqa: F401 - the session fixture (skip, or fail under VITDEPLOY_REQUIRE)
from vitdeploy.cli import main
from vitdeploy.serving import loadtest

pytest.importorskip("tritonclient.http", reason="tritonclient not installed: pip install 'vitdeploy[triton]'")


def _bench(*args: str):
    return CliRunner().invoke(main, ["bench", *args], terminal_width=200)


def test_bench_url_against_vitdeploy_serve(serving_onnx, tmp_path):
    """A real `vitdeploy serve` at 1 and 4 clients: figures, every answer checked against the reference's
    logits computed here, and the server's batch histogram counting exactly the requests of each level."""
    with ServeProcess(serving_onnx, "--name", "small", "--max-batch", "8", "--max-delay-ms", "20") as srv:
        r = _bench("--url", srv.url, "--model", "small", "--concurrency", "1,4", "--requests", "24", "--rows", "6",
                   "--reference", str(serving_onnx), "--json", str(tmp_path / "load.json"),
                   "--plot", str(tmp_path / "load.png"))
    assert r.exit_code == 0, r.output
    assert "requests/s" in r.output and "client machine:" in r.output and "vitdeploy_batch_size" in r.output
    report = json.loads((tmp_path / "load.json").read_text())
    assert report["ok"] and report["model"]["datatype"] == "FP32" and report["model"]["shape"] == [3, 64, 64]
    one, four = report["levels"]
    for lv in (one, four):
        assert lv["sent"] == lv["answered"] == 24 and lv["bad"] == 0
        assert 0 < lv["p50_ms"] <= lv["p90_ms"] <= lv["p99_ms"] and lv["requests_per_s"] > 0
        assert lv["batches"]["rows"] == 24  # the server counted each level's rows, no more, no less
    assert one["batches"]["batches"] == 24 and one["batches"]["sizes"] == {"<=1.0": 24}
    assert four["batches"]["batches"] < 24 and four["batches"]["mean"] > 1  # 4 clients formed batches
    assert (tmp_path / "load.png").read_bytes()[:4] == b"\x89PNG"


# -- a fake KServe v2 server: binary tensors, answers = a function of the input, optionally swapped ---------
class FakeV2(ThreadingHTTPServer):
    """Model 'fake', FP32 [-1, 2, 3] -> FP32 [-1, 4]. With ``swap``, two requests in flight together get each
    other's answers (a request waits up to 0.1 s for a partner; alone, it gets its own answer)."""

    daemon_threads = True

    def __init__(self, swap: bool, delay: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), _FakeHandler)
        self.swap, self.delay = swap, delay
        self.lock = threading.Lock()
        self.waiting: dict | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @staticmethod
    def model(x: np.ndarray) -> np.ndarray:
        return np.stack([x.mean((1, 2)), x.std((1, 2)), x[:, 0, 0], x[:, 1, 2]], 1).astype(np.float32)

    def answer(self, out: np.ndarray) -> np.ndarray:
        time.sleep(self.delay)
        if not self.swap:
            return out
        with self.lock:
            partner, self.waiting = self.waiting, None
            if partner is None:
                mine = self.waiting = {"out": out, "got": None, "done": threading.Event()}
            else:
                partner["got"] = out
                partner["done"].set()
                return partner["out"]
        if mine["done"].wait(0.1):
            return mine["got"]
        with self.lock:
            if self.waiting is mine:
                self.waiting = None
                return out
        mine["done"].wait()  # a partner took it just now
        return mine["got"]


class _FakeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in two writes

    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(code)
        for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v2/models/fake":
            meta = {"name": "fake", "versions": ["1"], "platform": "fake",
                    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2, 3]}],
                    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]}
            return self._send(200, json.dumps(meta).encode())
        self._send(404, b'{"error": "not found"}')

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        n = int(self.headers["Inference-Header-Content-Length"])
        head = json.loads(body[:n])
        inp = head["inputs"][0]
        assert inp["datatype"] == "FP32" and inp["parameters"]["binary_data_size"] == len(body) - n
        out = self.server.answer(FakeV2.model(np.frombuffer(body[n:], np.float32).reshape(inp["shape"])))
        reply = json.dumps({"model_name": "fake", "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 4],
                                                                "parameters": {"binary_data_size": 16}}]}).encode()
        self._send(200, reply + out.tobytes(), {"Content-Type": "application/octet-stream",
                                                "Inference-Header-Content-Length": str(len(reply))})


@pytest.fixture
def fake_server(request):
    server = FakeV2(*request.param) if isinstance(request.param, tuple) else FakeV2(swap=request.param)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("fake_server", [True, False], indirect=True, ids=["crossing", "honest"])
def test_a_server_that_crosses_answers_fails_the_run(fake_server):
    """The same fake fails the run only when it swaps answers between concurrent requests."""
    r = _bench("--url", fake_server.url, "--model", "fake", "--concurrency", "1,4", "--requests", "16",
               "--rows", "4")
    if not fake_server.swap:
        assert r.exit_code == 0, r.output
        assert "not reported by the server" in " ".join(r.output.split())  # no /metrics, no /v2/models/fake/stats
        return
    assert r.exit_code == 1, r.output
    message = r.output.strip().splitlines()[-1]
    assert message.startswith("Error: answers not checked out: concurrency 4:"), message
    assert "answer(s) carried another request's rows" in message and "got row" in message
    assert "concurrency 1:" not in message  # one client alone is never crossed


@pytest.mark.parametrize("fake_server", [True, False], indirect=True, ids=["crossing", "honest"])
def test_clients_split_over_processes_are_all_counted_and_checked(fake_server, tmp_path):
    """--processes 2: the level's 4 clients run in two processes started together; every request is
    answered and counted once, and answers crossed between requests of different processes are caught."""
    out = tmp_path / "load.json"
    r = _bench("--url", fake_server.url, "--model", "fake", "--concurrency", "4", "--requests", "24", "--rows", "4",
               "--processes", "2", "--json", str(out))
    level = json.loads(out.read_text())["levels"][0]
    assert level["processes"] == 2 and level["sent"] == 24, level
    if not fake_server.swap:
        assert r.exit_code == 0 and level["answered"] == 24 and level["bad"] == 0, r.output
        assert 0 < level["p50_ms"] <= level["p99_ms"] and level["requests_per_s"] > 0
        return
    assert r.exit_code == 1 and level["crossed"] > 0, r.output
    assert "answer(s) carried another request's rows" in r.output


@pytest.mark.parametrize("fake_server", [(False, 0.3)], indirect=True)
def test_uneven_client_split_keeps_every_client_busy(fake_server):
    """3 clients over 2 processes (2 + 1 clients): the level takes ceil(12 / 3) = 4 rounds of the server's
    0.3 s, as 3 clients in one process do, not the 6 rounds of the lone client given half of the requests
    (which understates requests/s by a third)."""
    info = loadtest.model_info(fake_server.url, "fake")
    x = loadtest.make_inputs(info, 4)
    checker = loadtest.expected_answers(fake_server.url, info, x, None, 1e-3, 10.0)
    level = loadtest.drive_level(fake_server.url, info, x, checker, 3, 12, 30.0, 10.0, 2)
    assert level.processes == 2 and level.answered == 12 and level.bad == 0
    assert level.seconds < 5 * 0.3, level  # 4 rounds (1.2 s) and slack; a static half split takes 6 (1.8 s)


def test_client_processes_that_cannot_start_are_a_clear_error(monkeypatch):
    """The second client process fails to start (the open-files limit): one line naming the fix, and the
    first, already started, is ended."""
    import multiprocessing.process

    real, started = multiprocessing.process.BaseProcess.start, []

    def start(self):
        if started:
            raise OSError(24, "Too many open files")
        real(self)
        started.append(self)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", start)
    info = loadtest.ModelInfo("fake", "x", "FP32", [2, 3], "y")
    checker = loadtest.Checker(np.eye(4, dtype=np.float32), 1e-3)
    with pytest.raises(loadtest.VitDeployError, match=r"could not start 2 load-test client processes \(\[Errno 24\] "
                                                      r"Too many open files\): give fewer --processes"):
        loadtest.drive_level("http://127.0.0.1:1", info, np.zeros((4, 2, 3), np.float32), checker, 2, 4, 10.0, 5.0, 2)
    assert len(started) == 1 and started[0].exitcode is not None


def _spawned_children(pid: int) -> list[int]:
    from pathlib import Path

    out = []
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if d.name.isdigit() and int(stat[1]) == pid and b"spawn_main" in (d / "cmdline").read_bytes():
                out.append(int(d.name))
        except (OSError, ValueError, IndexError):
            pass
    return out


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("fake_server", [(False, 0.05)], indirect=True)
def test_client_processes_end_with_their_parent(fake_server):
    """`bench --url` killed (SIGKILL, no clean-up) mid-level: its client processes stop loading the server."""
    bench = subprocess.Popen([sys.executable, "-c", "from vitdeploy.cli import main; main()", "bench", "--url",
                              fake_server.url, "--model", "fake", "--concurrency", "4", "--requests", "100000",
                              "--rows", "3", "--processes", "2", "--time-limit", "60"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(children := _spawned_children(bench.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(children) == 2, "the level's two client processes did not start"
        time.sleep(1.0)
    finally:
        bench.kill()
        bench.wait()
    deadline = time.monotonic() + 10
    while any(_running(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_running(c) for c in children), "client processes outlived the killed load test"


def test_client_processes_auto_and_given():
    cpus = len(__import__("os").sched_getaffinity(0))
    assert [loadtest.client_processes(c) for c in (1, 4, 8, 9)] == [1, 1, 1, min(2, cpus)]
    assert loadtest.client_processes(64) == min(8, cpus)
    assert (loadtest.client_processes(64, 3), loadtest.client_processes(2, 5)) == (3, 2)


def test_a_failing_client_process_is_a_clear_error():
    """A client process that fails (here: every client's address is refused) stops the level with its reason."""
    info = loadtest.ModelInfo("fake", "x", "FP32", [2, 3], "y")
    checker = loadtest.Checker(np.eye(4, dtype=np.float32), 1e-3)
    with pytest.raises(loadtest.VitDeployError, match=r"^--url 'http://h/x' is not a server address"):
        loadtest.drive_level("http://h/x", info, np.zeros((4, 2, 3), np.float32), checker, 2, 4, 10.0, 5.0, 2)
    r = _bench("--url", "http://127.0.0.1:1", "--model", "fake", "--processes", "0")
    assert r.exit_code == 2 and "'0' is not a process count: give auto or a number >= 1" in r.output, r.output


@pytest.mark.parametrize("fake_server", [False], indirect=True)
def test_bench_url_user_errors(fake_server):
    for args, words in ((["--model", "other"], "has no model 'other'"),
                        (["--model", "fake", "--uint8"], "takes FP32, not UINT8"),
                        (["--model", "fake", "--rows", "2", "--concurrency", "4,0"],
                         "--concurrency: client counts must be positive integers")):
        r = _bench("--url", fake_server.url, *args, "--requests", "2")
        assert r.exit_code in (1, 2) and words in r.output and "Traceback" not in r.output, r.output
    r = _bench("--url", "http://127.0.0.1:1", "--model", "fake")
    assert r.exit_code == 1 and "no KServe v2 server answers at" in r.output, r.output
    r = _bench("--model", "fake")
    assert r.exit_code == 2 and "--url takes --model NAME" in r.output


@pytest.mark.parametrize("fake_server", [(False, 0.05)], indirect=True)
def test_bench_url_stops_at_the_time_limit(fake_server):
    """A slow server (50 ms a request): --time-limit ends the level; what was sent is measured, the rest noted."""
    t = time.perf_counter()
    r = _bench("--url", fake_server.url, "--model", "fake", "--concurrency", "2", "--requests", "1000",
               "--rows", "3", "--time-limit", "0.5")
    assert r.exit_code == 0, r.output
    assert time.perf_counter() - t < 5
    sent = int(r.output.split("note: ")[1].split()[0])
    assert 900 < sent < 1000 and "reached --time-limit 0.5 s" in r.output, r.output


def test_loadtest_is_a_client_not_the_server():
    code = ("import sys, vitdeploy.serving.loadtest; "
            "assert not {'vitdeploy.serving.server', 'fastapi', 'uvicorn'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the real tritonserver (as in tests/test_triton.py: skipped without it, failed under VITDEPLOY_REQUIRE) ---
@pytest.fixture(scope="module")
def triton_small(local_triton, serving_onnx, tmp_path_factory):  # noqa: F811 - the imported fixture
    from benchmarks import local_triton as harness

    repo = tmp_path_factory.mktemp("loadtest-triton") / "repo"
    r = CliRunner().invoke(main, ["triton", str(serving_onnx), "--repo", str(repo), "--name", "small", "--backend",
                                  "python", "--execution-env", str(local_triton.env), "--max-batch", "8",
                                  "--max-queue-delay-us", "20000", "--threads", "1"])
    assert r.exit_code == 0, r.output
    server = harness.start_tritonserver(local_triton, repo, log_dir=repo.parent)
    yield server
    server.stop()


def test_bench_url_against_tritonserver(triton_small, serving_onnx):
    report = loadtest.run(f"http://{triton_small.http_url}", "small", [1, 4], requests=24, rows=6,
                          reference=serving_onnx, time_limit=60)
    assert report.ok, report.problems
    for lv in report.levels:
        assert lv.sent == lv.answered == 24 and lv.bad == 0 and lv.requests_per_s > 0
        b = lv.batches
        assert b is not None and b.source.startswith("Triton statistics")
        assert b.rows == 24 and sum(b.sizes.values()) == b.batches  # Triton's per-size counts add up
        assert sum(int(k) * v for k, v in b.sizes.items()) == 24
    assert report.levels[0].batches.sizes == {"1": 24}
    assert report.levels[1].batches.mean > 1


@pytest.fixture(scope="module")
def uint8_onnx(hf_folders, tmp_path_factory):
    from vitdeploy.exporters import ExportOptions, export_onnx

    return export_onnx(hf_folders["p16-w48"], tmp_path_factory.mktemp("loadtest-u8") / "small-u8.onnx",
                       options=ExportOptions(dynamic_batch=True, uint8_input=True)).path


def test_bench_url_uint8_against_vitdeploy_serve(uint8_onnx):
    with ServeProcess(uint8_onnx, "--name", "u8", "--max-batch", "4") as srv:
        report = loadtest.run(srv.url, "u8", [3], requests=12, rows=4, uint8=True, reference=uint8_onnx)
    assert report.model.datatype == "UINT8" and report.model.shape == [64, 64, 3]
    assert report.ok and report.levels[0].answered == 12 and report.levels[0].batches.rows == 12


def test_serve_load_script_runs_rounds_and_keeps_each_servers_median(serving_onnx, tmp_path):
    """benchmarks/serve_load.py end to end on `vitdeploy serve` alone: two rounds a level, one row per level
    (the median round), the CPU named, every answer checked, the clients of 3 split over 2 processes."""
    out = tmp_path / "load.json"
    r = subprocess.run([sys.executable, "benchmarks/serve_load.py", str(serving_onnx), "--only", "vitdeploy",
                        "--concurrency", "1,3", "--requests", "12", "--rows", "4", "--rounds", "2",
                        "--client-processes", "2", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "machine: " in r.stdout and "median of 2 rounds" in r.stdout
    assert "client processes per level: 1 at 1, 2 at 3" in " ".join(r.stdout.split())
    report = json.loads(out.read_text())["servers"]["vitdeploy"]
    assert [lv["processes"] for lv in report["levels"]] == [1, 2]
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 3]
    assert all(lv["answered"] == 12 and lv["crossed"] == lv["wrong"] == lv["errors"] == 0 for lv in report["levels"])
    assert "adaptive" in report["server"]


# -- issue 29: a hostile server (threads on loopback; the client's limits made small) ----------------------------
SMALL = loadtest.Limits(metadata_bytes=8 << 10, metrics_bytes=64 << 10, answer_bytes=64 << 10, row_bytes=1 << 20,
                        input_bytes=4 << 20)
META = {"name": "fake", "versions": ["1"], "platform": "fake",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2, 3]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]}


class Hostile(FakeV2):
    """FakeV2 with one misbehaviour (``mode``), counting the bytes it managed to send and the requests it got."""

    def __init__(self, mode: str, key: str | None = None) -> None:
        ThreadingHTTPServer.__init__(self, ("127.0.0.1", 0), _HostileHandler)
        self.mode, self.key, self.sent, self.hits = mode, key, 0, 0
        self.swap, self.delay, self.lock, self.waiting = False, 0.0, threading.Lock(), None


class _HostileHandler(_FakeHandler):
    def _stream(self, total: int, length: bool = False) -> None:
        """``total`` bytes of 'x' (with a Content-Length, or none and Connection: close), until the client goes."""
        self.send_response(200)
        self.send_header("Content-Length" if length else "Connection", str(total) if length else "close")
        self.end_headers()
        chunk = b"x" * (64 << 10)
        try:
            for _ in range(total // len(chunk)):
                self.wfile.write(chunk)
                self.server.sent += len(chunk)
        except OSError:
            pass
        self.close_connection = True

    def _huge_head(self, body: bytes, headers: dict | None = None) -> None:
        """An 8 MiB header, sent as fast as the client reads (so a gevent deadline never fires)."""
        try:
            self._send(200, body, {"X-Big": "a" * (8 << 20), **(headers or {})})
        except OSError:  # the client hung up, as it should
            self.close_connection = True

    def _drip(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.5)
        except OSError:
            pass

    def _wrong_key(self) -> bool:
        return bool(self.server.key) and self.headers.get("Authorization") != f"Bearer {self.server.key}"

    def do_GET(self) -> None:
        self.server.hits += 1
        mode = self.server.mode
        if self._wrong_key():
            return self._send(401, b'{"error": "give the key"}')
        if self.path.rstrip("/") == "/v2/models/fake":
            if mode == "huge-metadata":
                return self._stream(150 << 20, length=True)
            if mode == "endless-metadata":
                return self._stream(150 << 20)
            if mode == "drip-metadata":
                return self._drip()
            if mode == "huge-head-metadata":
                return self._huge_head(json.dumps(META).encode())
            if mode == "bad-json-metadata":
                return self._send(200, b'{"inputs": [')
            if mode == "huge-shape":
                meta = {**META, "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 100000, 100000]}]}
                return self._send(200, json.dumps(meta).encode())
            if mode == "odd-shape":
                return self._send(200, json.dumps({**META, "inputs": [{"name": "x", "shape": "[-1]"}]}).encode())
            return self._send(200, json.dumps(META).encode())
        if self.path == "/metrics":
            if mode == "endless-metrics":
                return self._stream(600 << 20)
            if mode == "redirect-metrics":
                return self._send(302, b"", {"Location": f"{self.server.elsewhere}/metrics"})
        return self._send(404, b'{"error": "not found"}')

    def do_POST(self) -> None:
        mode = self.server.mode
        if mode not in ("huge-answer", "drip-answer", "bad-json-answer", "gzip-bomb-answer",
                        "deflate-bomb-answer", "huge-head-answer") and not self._wrong_key():
            return super().do_POST()
        self.rfile.read(int(self.headers["Content-Length"]))
        if self._wrong_key():
            return self._send(401, b'{"error": "give the key"}')
        if mode == "huge-answer":
            return self._stream(300 << 20, length=True)
        if mode == "huge-head-answer":
            return self._huge_head(b"{}", {"Inference-Header-Content-Length": "2"})
        if mode in ("gzip-bomb-answer", "deflate-bomb-answer"):  # 32 kB that inflate to 32 MiB
            bomb = zlib.compressobj(9, zlib.DEFLATED, 31 if mode.startswith("gzip") else 15)
            body = b"".join(bomb.compress(bytes(1 << 20)) for _ in range(32)) + bomb.flush()
            return self._send(200, body, {"Content-Encoding": mode.split("-")[0],
                                          "Inference-Header-Content-Length": "100"})
        if mode == "drip-answer":
            return self._drip()
        return self._send(200, b"{nope", {"Inference-Header-Content-Length": "5"})  # bad-json-answer


@pytest.fixture
def hostile(request, monkeypatch):
    """A Hostile server in the mode the test asks for (``request.param``: mode, or (mode, key))."""
    monkeypatch.setattr(loadtest, "LIMITS", SMALL)
    mode, key = request.param if isinstance(request.param, tuple) else (request.param, None)
    servers = [Hostile(mode, key), Hostile("honest")]
    servers[0].elsewhere = servers[1].url
    for s in servers:
        threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True).start()
    yield servers[0], servers[1]
    for s in servers:
        s.shutdown()
        s.server_close()


HOSTILE = {
    "huge-metadata": "over the 8192 this client reads",
    "endless-metadata": "is over the 8192 bytes this client reads",
    "drip-metadata": "no whole answer within 2 s",
    "bad-json-metadata": "with something that is not JSON",
    "huge-shape": "over the 1048576 this load test builds",
    "odd-shape": "metadata is malformed",
    "huge-answer": "over the 65536 this client reads",
    "drip-answer": "no whole answer within 2 s",
    "bad-json-answer": "is not a KServe v2 answer",
    "huge-head-metadata": "a response's headers are over the 65536 bytes this client reads",
    "huge-head-answer": "a response's headers are over the 65536 bytes this client reads",
    "gzip-bomb-answer": "over the 65536 bytes this client reads once decompressed (gzip)",
    "deflate-bomb-answer": "over the 65536 bytes this client reads once decompressed (deflate)",
    "endless-metrics": "is over the 65536 bytes this client reads",
    "redirect-metrics": "follows no redirect",
}


@pytest.mark.parametrize("hostile", list(HOSTILE), indirect=True)
def test_a_hostile_server_ends_the_load_test_in_one_line(hostile):
    """Each misbehaviour ends `bench --url` within the deadline, with one line (exit 1), having read no more
    than the limits allow, and nothing from another address."""
    server, elsewhere = hostile
    t = time.perf_counter()
    r = _bench("--url", server.url, "--model", "fake", "--concurrency", "1", "--requests", "4", "--rows", "2",
               "--time-limit", "2", "--processes", "1")
    took = time.perf_counter() - t
    assert r.exit_code == 1 and not isinstance(r.exception, (RecursionError, TypeError, KeyError)), r.output
    assert "Traceback" not in r.output and r.output.strip().splitlines()[-1].startswith("Error: "), r.output
    assert HOSTILE[server.mode] in r.output.strip().splitlines()[-1], r.output
    assert took < 10, took
    assert server.sent < (32 << 20)  # the client stopped reading: the rest never left the server's buffers
    assert elsewhere.hits == 0


@pytest.mark.parametrize("hostile", [("honest", "s3cret")], indirect=True)
def test_bench_url_sends_the_api_key_from_a_file_or_the_environment(hostile, tmp_path, monkeypatch):
    server, _ = hostile
    args = ["--url", server.url, "--model", "fake", "--concurrency", "1", "--requests", "4", "--rows", "2",
            "--processes", "1"]
    r = _bench(*args)
    assert r.exit_code == 1 and "asks for an API key (HTTP 401): give --api-key-file FILE" in r.output, r.output
    (tmp_path / "key").write_text("s3cret\n")
    r = _bench(*args, "--api-key-file", str(tmp_path / "key"))
    assert r.exit_code == 0 and "requests/s" in r.output, r.output
    (tmp_path / "wrong").write_text("other\n")
    r = _bench(*args, "--api-key-file", str(tmp_path / "wrong"))
    assert r.exit_code == 1 and "refused the API key (HTTP 401)" in r.output, r.output
    monkeypatch.setenv("VITDEPLOY_API_KEY", "s3cret")
    r = _bench(*args)
    assert r.exit_code == 0, r.output
