"""`vitdeploy serve`'s app on a loopback port in a background thread, for the HTTP tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``with Server(runtime, **create_app_options) as srv:`` serves on ``srv.url`` until the block ends;
    ``uvicorn_options`` go to ``uvicorn_config`` (the connection limit, timeouts and TLS `vitdeploy serve` uses)."""

    def __init__(self, runtime, uvicorn_options=None, **kw):
        import uvicorn

        from vitdeploy.serving.server import create_app, uvicorn_config

        options = {"log_level": "error", "graceful_timeout": 10, **(uvicorn_options or {})}
        self.port = free_port()
        scheme = "https" if options.get("ssl_certfile") else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.app = create_app(runtime, **{"model_name": "m", **kw})
        self.server = uvicorn.Server(uvicorn_config(self.app, "127.0.0.1", self.port, **options))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                break
            time.sleep(0.02)
        return self

    def stop(self):
        self.server.should_exit = True
        self.thread.join(15)

    def __exit__(self, *exc):
        self.stop()
        assert not self.thread.is_alive(), "the server thread did not stop"


class ServeProcess:
    """A real ``vitdeploy serve`` process on a free loopback port: ``with ServeProcess(model, *flags) as srv``."""

    def __init__(self, model, *args, headers=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = headers or {}
        exe = Path(sys.executable).parent / "vitdeploy"
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - a file, not a pipe: the log must never block
        self.proc = subprocess.Popen([str(exe), "serve", "--model", str(model), "--port", str(self.port), *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def __enter__(self):
        import httpx

        deadline = time.perf_counter() + 90
        while time.perf_counter() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(self.url + "/readyz", headers=self.headers, timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError("vitdeploy serve did not become ready in 90 s")

    def _status_mb(self, key):
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith(key))) / 1024

    def peak_rss_mb(self):
        return self._status_mb("VmHWM")

    def rss_mb(self):
        return self._status_mb("VmRSS")

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.log.close()
