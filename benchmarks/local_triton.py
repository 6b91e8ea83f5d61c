"""A real tritonserver on this machine, for the tests and the serving benchmark (not part of vitdeploy).

NVIDIA's nvidia-pytriton wheel carries a tritonserver binary, its libraries, the Python backend and
Python-backend stubs for Python 3.8-3.13 (Triton's onnxruntime/tensorrt backends are not in it). It is
unpacked, never installed: it pins numpy<2. The Python-backend model runs in a serving venv of its own
with numpy<2 (numpy 2 makes the backend hand over empty tensors).

    from benchmarks.local_triton import prepare_local_triton, start_tritonserver   # tests (repo root)
    from local_triton import prepare_local_triton, start_tritonserver              # scripts beside it
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitdeploy.errors import VitDeployError
from vitdeploy.io import free_port

# --- a local tritonserver (tests, benchmarks, trying a repository on a CPU host) -------------------------
# NVIDIA's nvidia-pytriton wheel carries a tritonserver binary, its libraries, the Python backend and
# Python-backend stubs for Python 3.8-3.13 (Triton's onnxruntime/tensorrt backends are not in it). It is
# unpacked, never installed: it pins numpy<2. The Python-backend model runs in a serving venv of its own
# with numpy<2 (numpy 2 makes the backend hand over empty tensors).
PYTRITON_WHEEL = "nvidia-pytriton==0.7.0"
SERVING_REQUIREMENTS = ("numpy==1.26.4", "onnxruntime", "onnx", "Pillow", "click", "rich", "tqdm", "safetensors",
                        "packaging")


@dataclass
class LocalTriton:
    """An unpacked nvidia-pytriton wheel and a serving venv for the Python backend."""

    root: Path  # the unpacked wheel
    env: Path  # the serving venv (EXECUTION_ENV_PATH)
    backends: Path = Path()  # --backend-directory: the wheel's backends with the stub for env's Python

    @property
    def server_dir(self) -> Path:
        return self.root / "pytriton" / "tritonserver"

    @property
    def binary(self) -> Path:
        return self.server_dir / "bin" / "tritonserver"

    def environ(self) -> dict[str, str]:
        libs = [self.root / "nvidia_pytriton.libs", self.server_dir / "lib"]
        old = os.environ.get("LD_LIBRARY_PATH")
        return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join([*map(str, libs), *([old] if old else [])])}


def _run(cmd: list[str], what: str) -> None:
    import subprocess

    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise VitDeployError(f"{what} failed: {' | '.join(tail)}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_local_triton(cache: str | Path, python: str | None = None) -> LocalTriton:
    """Unpack the nvidia-pytriton wheel and build the serving venv under ``cache`` (once; reused after).

    VitDeployError with the reason where this host cannot have it (not Linux x86-64, no download, no
    Python-backend stub that runs here). ``python`` makes the serving venv (default: this interpreter
    if its version's stub runs here, else a system python3.1x whose stub does).
    """
    import platform
    import sys
    import zipfile

    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise VitDeployError(f"the nvidia-pytriton wheel's tritonserver runs on Linux x86-64, not "
                             f"{sys.platform} {platform.machine()}")
    cache = Path(cache).resolve()
    root = cache / "triton" / PYTRITON_WHEEL.replace("==", "-")
    with _locked(cache / "triton" / ".lock"):
        if not (root / ".complete").is_file():
            shutil.rmtree(root, ignore_errors=True)
            with tempfile.TemporaryDirectory(prefix=".wheel.", dir=root.parent) as tmp:
                _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PYTRITON_WHEEL, "-d", tmp],
                     f"pip download {PYTRITON_WHEEL}")
                wheel = next(Path(tmp).glob("*.whl"))
                unpack = Path(tmp) / "unpacked"
                with zipfile.ZipFile(wheel) as z:
                    z.extractall(unpack)
                    for info in z.infolist():  # zipfile drops the executable bits
                        mode = info.external_attr >> 16
                        if mode & 0o111:
                            os.chmod(unpack / info.filename, mode & 0o777)
                os.replace(unpack, root)
            (root / ".complete").write_text(PYTRITON_WHEEL + "\n")
        python, version, stub = _pick_python(LocalTriton(root, Path()), python)
        env = cache / "triton" / f"servenv-py{version}"
        # a backend folder per Python version, holding that version's stub
        local = LocalTriton(root, env, root / "pytriton" / "tritonserver" / f"backends-py{version}")
        if not (local.backends / ".complete").is_file():
            shutil.rmtree(local.backends, ignore_errors=True)
            shutil.copytree(local.server_dir / "backends", local.backends)
            shutil.copy2(stub, local.backends / "python" / "triton_python_backend_stub")
            (local.backends / ".complete").write_text(version + "\n")
        if not (env / ".complete").is_file():
            shutil.rmtree(env, ignore_errors=True)
            _run([python, "-m", "venv", str(env)], "creating the serving venv")
            _run([str(env / "bin" / "python"), "-m", "pip", "install", "-q", *SERVING_REQUIREMENTS],
                 "installing the serving venv's packages")
            (env / ".complete").write_text("\n".join(SERVING_REQUIREMENTS) + "\n")
        _link_vitdeploy(env)
    return local


def _link_vitdeploy(env: Path) -> None:
    """Make the serving venv import this vitdeploy (a .pth file to its source tree, or a copy of the
    package when it is installed): the venv then always serves the code that wrote the repository."""
    import vitdeploy
    from vitdeploy.io import atomic_write_bytes

    pkg = Path(vitdeploy.__file__).resolve().parent
    src = pkg.parent
    if not (src / "pyproject.toml").is_file():
        src = env / "vitdeploy-src"
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(pkg, src / "vitdeploy", ignore=shutil.ignore_patterns("__pycache__"))
    for site in (env / "lib").glob("python*/site-packages"):
        atomic_write_bytes(site / "vitdeploy-src.pth", f"{src}\n".encode())


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies, so a killed test run or
    benchmark never leaves a tritonserver holding its ports (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)


def _pick_python(local: LocalTriton, python: str | None) -> tuple[str, str, Path]:
    """An interpreter for the serving venv whose backend stub runs here (the stub links the shared
    libpython of its version): this one if it can, else a system python3.1x. -> (exe, 'X.Y', stub)."""
    import glob
    import subprocess
    import sys

    candidates = [python] if python else [sys.executable, *sorted(glob.glob("/usr/bin/python3.1[0-9]"), reverse=True)]
    reasons = []
    for exe in candidates:
        try:
            version = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                     capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            continue
        stub = local.server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            reasons.append(f"{PYTRITON_WHEEL} has no Python-backend stub for Python {version}")
            continue
        ldd = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, env=local.environ()).stdout
        missing = [line.split()[0] for line in ldd.splitlines() if "not found" in line]
        if missing:
            reasons.append(f"the Python {version} backend stub needs {', '.join(missing)} (apt-get install "
                           f"libpython{version})")
            continue
        return exe, version, stub
    raise VitDeployError("; ".join(dict.fromkeys(reasons)) or "no Python interpreter for the serving venv")


@dataclass
class TritonServer:
    """A running tritonserver on loopback ports chosen at start (see :func:`start_tritonserver`)."""

    process: Any
    http_port: int
    grpc_port: int
    metrics_port: int
    log: Path
    repo: Path

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log_tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        return "\n".join(line for line in text.splitlines() if not line.startswith(("|", "+")))[-4000:]

    def metrics(self) -> dict[str, float]:
        """Triton's Prometheus counters, ``'name{labels}' -> value``."""
        import urllib.request

        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def stop(self, timeout: float = 30.0) -> None:
        import subprocess

        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_tritonserver(local: LocalTriton, repo: str | Path, models: list[str] | None = None,
                       log_dir: str | Path | None = None, timeout: float = 120.0,
                       extra_args: list[str] | None = None) -> TritonServer:
    """Start the unpacked tritonserver on ``repo`` with explicit model control (``models`` loaded at start,
    default all), on free loopback ports; return once it is ready, or raise VitDeployError with its log."""
    import subprocess
    import time
    import urllib.request

    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="tritonserver-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):  # a port taken between choosing and binding: choose again
        ports = [free_port() for _ in range(3)]
        log = log_dir / f"tritonserver-{ports[0]}.log"
        cmd = [str(local.binary), "--model-repository", str(Path(repo).resolve()),
               "--backend-directory", str(local.backends), "--model-control-mode", "explicit",
               "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1", "--metrics-address", "127.0.0.1",
               "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
               "--exit-on-error", "true", "--exit-timeout-secs", "10", *(extra_args or [])]
        names = models if models is not None else sorted(
            p.name for p in Path(repo).iterdir() if p.is_dir() and not p.name.startswith("."))
        cmd += [f"--load-model={m}" for m in names]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=local.environ(),
                                    preexec_fn=_die_with_parent)
        server = TritonServer(proc, *ports, log, Path(repo).resolve())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return server
            except OSError:
                pass
            time.sleep(0.2)
        server.stop()
        tail = server.log_tail()
        if "address already in use" in tail.lower() and attempt < 2:
            continue
        raise VitDeployError(f"tritonserver did not become ready (log {log}):\n{tail}")
    raise AssertionError("unreachable")
