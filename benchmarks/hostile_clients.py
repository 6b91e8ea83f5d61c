"""Hostile clients against a live `vitdeploy serve` (issue 18, items 8-14), loopback only, bounded in count and time.

    python benchmarks/hostile_clients.py [MODEL.onnx] [--json out.json]

Starts `vitdeploy serve` with default flags on a tiny ViT (224x224 input, exported first when no model is
given), then runs the catalogue: memory (a dense 100 MB JSON body, 6300x6300 palette PNGs, a burst of max-
batch requests), slow and idle clients (stalled 100 MB uploads, 100 connections with partial or no request
head), 20 gzip bombs, malformed numbers and shapes, NaN and infinity, garbage images, a thin 24190x10 PNG
under crop_pct 0.9 (issue 29, item 2), a second server with an API key and TLS, and a third on a uint8
model (--uint8-input) where 6 good clients send KServe v2 UINT8 requests alone, then beside 2 clients
posting JSON floats to /v1/logits (issue 29, item 1: every good request must get its 200). A probe asks
/healthz every 20 ms throughout and samples the server's RSS. Per attack it prints the status codes, the
time, the server's peak RSS during the attack and its RSS after, and the slowest /healthz answer; it fails
(exit 1) if any /healthz took 100 ms or more, if any answer was a 500 or not JSON, or if peak RSS went
over the memory budget plus the footprint before the attack plus the connections' transport buffers (~128
KB each, outside the budget).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.serving.limits import MiB, default_memory_budget
from vitdeploy.sysinfo import cpu_model

HEALTHZ_LIMIT = 0.1
PROBE = """
import sys, time, httpx
url, out, verify = sys.argv[1], sys.argv[2], sys.argv[3]
verify = True if verify == "True" else verify
with httpx.Client(timeout=10, verify=verify) as c, open(out, "a", buffering=1) as f:
    while True:
        t0 = time.perf_counter()
        try:
            c.get(url + "/healthz")
            latency = time.perf_counter() - t0
        except httpx.TransportError:
            latency = float("inf")
        f.write(f"{time.time()} {latency}\\n")
        time.sleep(0.02)
"""
# outside the budget: what uvicorn buffers per connection before the app reads it (up to ~128 KB each; no
# attack here opens more than ~110 connections at once)
CONNECTION_BUFFERS_MB = 110 * 0.125


def tiny_model(folder: Path, uint8_input: bool = False) -> Path:
    """A tiny ViT at 224x224 with timm's eval crop (crop_pct 0.9); ``uint8_input``: its preprocessing in the
    graph (UINT8 NHWC pixels in)."""
    from vitdeploy import save_model
    from vitdeploy.checkpoints import build_model
    from vitdeploy.config import ViTConfig
    from vitdeploy.exporters import ExportOptions, export_onnx

    cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    patch_size=32, num_labels=10, crop_pct=0.9)
    if not (folder / "tiny.safetensors").exists():
        save_model(build_model(cfg, seed=0), folder / "tiny.safetensors")
    name = "tiny-u8.onnx" if uint8_input else "tiny.onnx"
    return export_onnx(folder / "tiny.safetensors", folder / name,
                       options=ExportOptions(dynamic_batch=True, uint8_input=uint8_input)).path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    """`vitdeploy serve MODEL --name m` on a free loopback port, with a /healthz and RSS probe."""

    def __init__(self, model: Path, *flags: str, scheme: str = "http", verify: Any = True) -> None:
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.verify = verify
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - never a pipe that could fill
        exe = Path(sys.executable).parent / "vitdeploy"
        self.proc = subprocess.Popen([str(exe), "serve", "--model", str(model), "--port", str(self.port),
                                      "--name", "m", *flags], stdout=self.log, stderr=subprocess.STDOUT)
        self.rss_samples: list[tuple[float, float]] = []  # (time, RSS MB)
        self.extra: dict[str, Any] = {}  # what an attack reports beyond its answers
        self.probe_file = Path(tempfile.mkstemp(suffix=".probe")[1])
        self.probe: subprocess.Popen | None = None
        self._stop = threading.Event()

    def start(self) -> Serve:
        import httpx

        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"vitdeploy serve exited:\n{self.output()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2, verify=self.verify).status_code in (200, 401):
                    # the probe is its own process: in this one it would wait for the GIL behind the attackers
                    self.probe = subprocess.Popen([sys.executable, "-c", PROBE, self.url, str(self.probe_file),
                                                   str(self.verify)])
                    threading.Thread(target=self._sample_rss, daemon=True).start()
                    time.sleep(1.0)
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise SystemExit("vitdeploy serve did not start in 120 s")

    def _sample_rss(self) -> None:
        while not self._stop.is_set():
            self.rss_samples.append((time.time(), self.rss()))
            time.sleep(0.02)

    def samples(self, since: float) -> list[tuple[float, float, float]]:
        """(time, /healthz seconds, RSS MB near that time) since ``since``."""
        probes = [tuple(map(float, line.split())) for line in self.probe_file.read_text().splitlines()
                  if line.count(" ") == 1]
        rss = [r for r in self.rss_samples if r[0] >= since]
        return [(t, lat, max((m for u, m in rss if abs(u - t) < 0.05), default=float("nan")))
                for t, lat in probes if t >= since]

    def rss(self, key: str = "VmRSS") -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
        return float("nan")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        self._stop.set()
        if self.probe is not None:
            self.probe.kill()
            self.probe.wait(5)
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# -- the attacks: each returns the status codes it saw (and raises nothing) --------------------------------
def _post_all(url: str, bodies: list[tuple[str, bytes, dict[str, Any]]], workers: int = 8,
              verify: Any = True) -> list[Any]:
    import httpx

    def one(item: tuple[str, bytes, dict[str, Any]]) -> Any:
        path, body, headers = item
        try:
            r = httpx.post(url + path, content=body, headers=headers, timeout=60, verify=verify)
        except httpx.TransportError as e:
            return type(e).__name__
        try:
            if r.headers.get("content-type", "").startswith("application/json"):
                json.loads(r.text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
        except ValueError:
            return f"{r.status_code} (not JSON)"
        return r.status_code if r.status_code < 500 or "Traceback" not in r.text else f"{r.status_code} (traceback)"

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, bodies))


def palette_png(width: int, height: int) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    comp = zlib.compressobj(9)
    row = b"\0" * (1 + width)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0))
            + chunk(b"PLTE", b"\0\0\0\xff\xff\xff") + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def attack_dense_json(srv: Serve) -> list[Any]:
    body = b'{"inputs": [' + b"0.0," * 25_000_000 + b"0.0]}"  # 100 MB, 25 M values: ~1.4 GB parsed
    return _post_all(srv.url, [("/v1/logits", body, {"content-type": "application/json"})] * 2)


def attack_png_bombs(srv: Serve) -> list[Any]:
    return _post_all(srv.url, [("/v1/classify", palette_png(6300, 6300), {})] * 3)


def attack_burst(srv: Serve) -> list[Any]:
    x = np.random.default_rng(0).standard_normal((32, 3, 224, 224), dtype=np.float32)
    headers = {"content-type": "application/octet-stream", "x-shape": "32,3,224,224"}
    return _post_all(srv.url, [("/v1/logits", x.tobytes(), headers)] * 16, workers=16)


def stalled_uploads(port: int, count: int, head: bytes, sent: bytes) -> list[socket.socket]:
    """``count`` connections that each send a request head declaring more body than ``sent``, then stall."""
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/logits HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n" + sent)
        socks.append(s)
    return socks


def attack_stalled_uploads(srv: Serve) -> list[Any]:
    head = b"Content-Type: application/octet-stream\r\nX-Shape: 32,3,224,224\r\nContent-Length: 19267584\r\n"
    return [_answer_or_close(s, 20) for s in stalled_uploads(srv.port, 8, head, b"\0" * 4_000_000)]


def attack_idle_connections(srv: Serve) -> list[Any]:
    socks = []
    for i in range(100):
        s = socket.create_connection(("127.0.0.1", srv.port))
        if i % 2:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    with ThreadPoolExecutor(20) as pool:
        return list(pool.map(lambda s: _answer_or_close(s, 20), socks))


def _answer_or_close(sock: socket.socket, seconds: float) -> str:
    """What the server did with a stalled connection: its status line, or 'closed', or 'still open'."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return "still open"
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "closed"


def attack_gzip_bombs(srv: Serve) -> list[Any]:
    bomb = gzip.compress(b"\0" * 114_000_000, 9)
    return _post_all(srv.url, [("/v2/models/m/infer", bomb, {"content-encoding": "gzip"})] * 20, workers=20)


def attack_malformed(srv: Serve) -> list[Any]:
    v2 = {"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [2**54, 3, 224, 224],
                      "parameters": {"binary_data_size": 0}}]}
    return _post_all(srv.url, [
        ("/v2/models/m/infer", b"{}", {"inference-header-content-length": "\u00b2".encode("latin-1")}),
        ("/v2/models/m/infer", json.dumps(v2).encode(), {}),
        ("/v1/logits", b"", {"content-type": "application/octet-stream", "x-shape": f"{2**52},3,224,224"}),
        ("/v1/logits", b"[" * 100_000, {"content-type": "application/json"}),
        ("/v2/models/m/infer", b"[" * 100_000, {}),
    ])


def attack_non_finite(srv: Serve) -> list[Any]:
    x = np.zeros((1, 3, 224, 224), np.float32)
    x[0, 0, 0, 0] = np.nan
    v2 = {"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, 224, 224],
                      "data": x.ravel().tolist()}]}
    y = np.zeros((1, 3, 224, 224), np.float32)
    y[0, 1, 2, 3] = np.inf
    return _post_all(srv.url, [
        ("/v1/logits", json.dumps({"inputs": x.tolist()}).encode(), {"content-type": "application/json"}),
        ("/v2/models/m/infer", json.dumps(v2).encode(), {}),
        ("/v1/logits", y.tobytes(), {"content-type": "application/octet-stream", "x-shape": "1,3,224,224"}),
    ])


def attack_garbage_images(srv: Serve) -> list[Any]:
    import httpx

    leaks = []
    for body in (b"GIF89a" + b"\xff" * 200, b"\x89PNG\r\n\x1a\n" + b"\0" * 64, os.urandom(4096)):
        r = httpx.post(srv.url + "/v1/classify", content=body, timeout=30)
        leaks.append(r.status_code if "0x" not in r.text and "PIL" not in r.text else f"{r.status_code} (leak)")
    return leaks


def noise_png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def attack_thin_image(srv: Serve) -> list[Any]:
    """A 24190x10 PNG (727 kB, 242 k pixels): under crop_pct 0.9 its short side goes to 248 and its long side
    to ~600 k, a 150 M-pixel resize before the crop (issue 29, item 2)."""
    return _post_all(srv.url, [("/v1/classify", noise_png(24190, 10), {})] * 3, workers=3)


def _uint8_requests(shape: tuple[int, ...]) -> tuple[tuple[bytes, dict[str, str]], bytes, bytes]:
    """A KServe v2 binary UINT8 request (the good clients'), and two /v1/logits JSON bodies of the same
    shape: normalized floats (not pixels: 400) and whole numbers 0..255 as floats (pixels: 200)."""
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (1, *shape), dtype=np.uint8)
    head = json.dumps({"inputs": [{"name": "pixel_values", "datatype": "UINT8", "shape": list(px.shape),
                                   "parameters": {"binary_data_size": px.nbytes}}]}).encode()
    good = (head + px.tobytes(), {"inference-header-content-length": str(len(head))})
    floats = json.dumps({"inputs": ((px - 127.5) / 127.5).round(4).tolist()}).encode()
    whole = json.dumps({"inputs": px.astype(np.float32).tolist()}).encode()
    return good, floats, whole


def _clients(srv: Serve, seconds: float, good: tuple[bytes, dict[str, str]], attackers: list[bytes],
             n_good: int = 6) -> list[str]:
    """``n_good`` threads sending ``good`` and one thread per attacker body, for ``seconds``: each answer as
    'good <code>' or 'attacker <code>'."""
    import httpx

    end = time.perf_counter() + seconds

    def client(body: bytes | None) -> list[str]:
        seen = []
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            while time.perf_counter() < end:
                try:
                    if body is None:
                        code = c.post("/v2/models/m/infer", content=good[0], headers=good[1]).status_code
                    else:
                        code = c.post("/v1/logits", content=body,
                                      headers={"content-type": "application/json"}).status_code
                except httpx.TransportError as e:
                    code = type(e).__name__
                seen.append(f"{'good' if body is None else 'attacker'} {code}")
        return seen

    with ThreadPoolExecutor(n_good + len(attackers)) as pool:
        return [c for part in pool.map(client, [None] * n_good + attackers) for c in part]


def attack_uint8_mixed(srv: Serve, shape: tuple[int, ...], seconds: float = 4.0) -> list[Any]:
    """A uint8 model: 6 clients send valid v2 binary UINT8 requests for ``seconds`` alone, then again while 2
    more post JSON to /v1/logits, one normalized floats, one whole-number floats (issue 29, item 1: each
    float request made its whole batch float32, failing the good ones' requests with 500)."""
    good, floats, whole = _uint8_requests(shape)
    alone = _clients(srv, seconds, good, [])
    mixed = _clients(srv, seconds, good, [floats, whole])
    srv.extra = {"good_alone": dict(collections.Counter(alone)),
                 "good_with_attackers": dict(collections.Counter(c for c in mixed if c.startswith("good"))),
                 "attackers": dict(collections.Counter(c for c in mixed if c.startswith("attacker")))}
    print(f"    uint8, {seconds:g} s each: good clients alone {srv.extra['good_alone']}; with 2 JSON clients "
          f"{srv.extra['good_with_attackers']}, the JSON clients {srv.extra['attackers']}", flush=True)
    return alone + mixed


def tls_server(model: Path, folder: Path) -> Serve:
    """A second server with an API key file (probes public) and a self-signed certificate."""
    cert, key, keyfile = folder / "cert.pem", folder / "key.pem", folder / "api.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    keyfile.write_text("hostile-test-key\n")
    return Serve(model, "--api-key-file", str(keyfile), "--public-probes", "--ssl-certfile", str(cert),
                 "--ssl-keyfile", str(key), scheme="https", verify=str(cert))


def attack_auth_and_tls(srv: Serve, folder: Path) -> list[Any]:
    import httpx

    x = np.zeros((1, 3, 224, 224), np.float32).tobytes()
    binary = {"content-type": "application/octet-stream", "x-shape": "1,3,224,224"}
    codes = _post_all(srv.url, [("/v1/logits", x, binary), ("/v1/logits", x, {**binary, "authorization": "Bearer no"}),
                                ("/v1/logits", x, {**binary, "authorization": "Bearer hostile-test-key"})],
                      verify=srv.verify)
    try:
        httpx.get(srv.url.replace("https", "http") + "/healthz", timeout=5)
        codes.append("plain HTTP answered")
    except httpx.TransportError:
        codes.append("plain HTTP refused")
    warn = subprocess.run([str(Path(sys.executable).parent / "vitdeploy"), "serve", "--model",
                           str(folder / "missing.onnx"), "--host", "0.0.0.0"], capture_output=True, text=True)
    codes.append("0.0.0.0 warned" if "warning: serving on 0.0.0.0" in warn.stderr else "0.0.0.0 not warned")
    return codes


ATTACKS: list[tuple[str, str, Callable[[Serve], list[Any]], set[Any]]] = [
    ("8", "2 x 100 MB dense JSON (wrong shape)", attack_dense_json, {413}),
    ("8", "3 x 6300x6300 palette PNG (4.9 KB)", attack_png_bombs, {413}),
    ("8", "16 x max-batch binary (19 MB each) at once", attack_burst, {200, 503}),
    ("9", "8 stalled 19 MB uploads (4 MB sent)", attack_stalled_uploads, {"408"}),
    ("9", "100 connections, half a head or none", attack_idle_connections, {"closed"}),
    ("10", "20 gzip bombs (111 KB -> 114 MB)", attack_gzip_bombs, {400, 413, 503}),
    ("11", "superscript length, 2**54 shapes, 100k '['", attack_malformed, {400}),
    ("12", "NaN / Inf in JSON and binary", attack_non_finite, {400}),
    ("13", "garbage images", attack_garbage_images, {400}),
    ("29.2", "3 x 24190x10 PNG (727 kB) under crop_pct", attack_thin_image, {400}),
]


def run_attack(srv: Serve, item: str, name: str, attack: Callable[[], list[Any]], allowed: set[Any],
               budget_mb: float, base_mb: float) -> dict[str, Any]:
    before = srv.rss()  # the model's own memory (ONNX Runtime's arena grows with the batch) is not request work
    t0 = time.time()
    codes = attack()
    seconds = time.time() - t0
    time.sleep(0.3)
    window = srv.samples(t0)
    worst = max((s[1] for s in window), default=float("nan"))
    peak = max((m for t, m in srv.rss_samples if t >= t0), default=float("nan"))
    ok = (set(codes) <= allowed and worst < HEALTHZ_LIMIT
          and peak <= max(base_mb, before) + budget_mb + CONNECTION_BUFFERS_MB)
    row = {"item": item, "attack": name, "codes": dict(collections.Counter(map(str, codes))),
           "seconds": round(seconds, 2), "peak_rss_mb": round(peak), "rss_after_mb": round(srv.rss()),
           "healthz_worst_ms": round(worst * 1e3, 1), "probes": len(window), "ok": ok, **srv.extra}
    print(f"{item:>3} {name:<44} {row['codes']!s:<28} {seconds:6.2f} s  peak {peak:5.0f} MB  "
          f"after {row['rss_after_mb']:5.0f} MB  /healthz worst {worst * 1e3:6.1f} ms ({len(window)})  "
          f"{'ok' if ok else 'FAIL'}", flush=True)
    return row


def crop_pct_of(model: Path) -> float | None:
    from vitdeploy.artifacts.metadata import read_onnx_metadata

    return read_onnx_metadata(model).preprocessing.get("crop_pct")


def uint8_round(model: Path) -> dict[str, Any]:
    """A third server, on a uint8 model: the mixed-client attack; every good request must get its 200."""
    from vitdeploy.engines import open_runtime

    with open_runtime(model) as rt:
        shape, item_bytes = rt.spec.shape, int(np.prod(rt.spec.shape))
    budget_mb = default_memory_budget(item_bytes, 32) / MiB
    third = Serve(model).start()
    try:
        allowed = {"good 200", "attacker 400", "attacker 200"}
        return run_attack(third, "29.1", "uint8 model: 6 v2 UINT8 clients, + 2 JSON", lambda: attack_uint8_mixed(
            third, shape), allowed, budget_mb, third.rss())
    finally:
        third.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="a dynamic-batch ONNX of 224x224 input (default: export a tiny ViT)")
    ap.add_argument("--uint8-model", type=Path, default=None, help="a dynamic-batch ONNX exported with --uint8-input "
                    "(224x224) for the mixed-client attack (default: export the tiny ViT so)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--only-uint8", action="store_true", help="run only the uint8 mixed-client attack (29.1)")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp())
    if args.only_uint8:
        row = uint8_round(args.uint8_model or tiny_model(folder, uint8_input=True))
        print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs)")
        return 0 if row["ok"] else 1
    model = Path(args.model) if args.model else tiny_model(folder)
    if not crop_pct_of(model):  # without a crop, a thin image is resized straight to the input: answered
        ATTACKS[-1] = (*ATTACKS[-1][:3], {200})
    budget_mb = default_memory_budget(3 * 224 * 224 * 4, 32) / MiB
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); model {model.name}; default flags "
          f"(max batch 32, memory budget {budget_mb:.0f} MiB)")
    srv = Serve(model).start()
    rows = []
    try:
        base = srv.rss()
        t0 = time.time()
        time.sleep(3)
        idle = max(s[1] for s in srv.samples(t0))
        print(f"server idle RSS {base:.0f} MB; /healthz worst {idle * 1e3:.1f} ms over 3 s idle (this machine's "
              f"noise floor)\n{'':>3} {'attack':<44} {'answers':<28} {'time':>8}")
        for item, name, attack, allowed in ATTACKS:
            rows.append(run_attack(srv, item, name, lambda a=attack: a(srv), allowed, budget_mb, base))
        rows[-1]["server_peak_rss_mb"] = round(srv.rss("VmHWM"))
        print(f"server peak RSS over all attacks (VmHWM): {srv.rss('VmHWM'):.0f} MB, budget {budget_mb:.0f} MiB "
              f"+ idle {base:.0f} MB")
    finally:
        srv.stop()
    second = tls_server(model, folder).start()
    try:
        rows.append(run_attack(second, "14", "API key + TLS (none, wrong, right key)",
                               lambda: attack_auth_and_tls(second, folder),
                               {401, 200, "plain HTTP refused", "0.0.0.0 warned"}, budget_mb, second.rss()))
    finally:
        second.stop()
    rows.append(uint8_round(args.uint8_model or tiny_model(folder, uint8_input=True)))
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "rows": rows}, indent=1))
    failed = [r["attack"] for r in rows if not r["ok"]]
    print("all attacks handled" if not failed else f"FAILED: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
