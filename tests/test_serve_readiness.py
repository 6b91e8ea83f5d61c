"""`vitdeploy serve` turns ready only once warm and verified (issue 19, item 5): the warm-up and the golden
check run in the background after the server starts; a failed check keeps it up but not ready, with the
reason in the log and in the bodies of /readyz and /v2/health/ready."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vitdeploy.engines import open_runtime
from vitdeploy.serving.readiness import warm_and_verify, warm_sizes

from .http_server import ServeProcess, Server
from .test_verify import _tamper


class Started(ServeProcess):
    """A `vitdeploy serve` process, not waited for: the tests watch it become ready (or not)."""

    def __enter__(self):
        return self


def _settled(url: str, path: str = "/readyz", timeout: float = 90.0):
    """The readiness answer once the server listens and has finished preparing."""
    import httpx

    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        try:
            r = httpx.get(url + path, timeout=2)
            if r.status_code == 200 or r.json().get("status") != "preparing":
                return r
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{path} still preparing after {timeout} s")


def test_warm_sizes_cover_every_batch_up_to_the_bound_then_powers_of_two():
    assert warm_sizes(1) == [1]
    assert warm_sizes(5) == [1, 2, 3, 4, 5]
    assert warm_sizes(16) == list(range(1, 17))
    assert warm_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert warm_sizes(40) == [1, 2, 4, 8, 16, 32, 40]


def test_readiness_waits_for_prepare_and_reports_why_it_is_not_ready(serving_onnx):
    import httpx

    release, seen = threading.Event(), []

    def prepare(rt):
        seen.append(rt)
        assert release.wait(30)

    with open_runtime(serving_onnx, threads=1) as rt, Server(rt, prepare=prepare) as srv:
        ready, v2 = httpx.get(srv.url + "/readyz"), httpx.get(srv.url + "/v2/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "preparing", ready.text
        assert v2.status_code == 503 and v2.json()["status"] == "preparing", v2.text
        assert httpx.get(srv.url + "/healthz").status_code == 200 and seen == [rt]
        release.set()
        assert _settled(srv.url).status_code == 200
        assert httpx.get(srv.url + "/v2/health/ready").status_code == 200


def test_warm_and_verify_warms_every_size_the_batcher_forms(serving_onnx):
    from vitdeploy.engines.base import Runtime

    class Counting(Runtime):
        backend = "counting"

        def __init__(self, inner):
            self.inner, self.spec, self.metadata, self.sizes = inner, inner.spec, inner.metadata, []

        def _run(self, batch):
            self.sizes.append(len(batch))
            return self.inner._run(batch)

    with open_runtime(serving_onnx, threads=1) as inner:
        rt = Counting(inner)
        warm_and_verify(None, 6)(rt)
    assert rt.sizes == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("drift", [{"weight_scale": 1.5}, {"mean": 0.1}], ids=["weights", "preprocessing"])
def test_serve_with_a_drifting_artifact_stays_up_but_not_ready(serving_onnx, tmp_path, drift):
    import httpx

    bad = _tamper(serving_onnx, tmp_path / "bad.onnx", **drift)
    with Started(bad, "--max-batch", "4") as srv:
        ready = _settled(srv.url)
        assert ready.status_code == 503 and ready.json()["status"] == "failed", ready.text
        assert "fails its golden set" in ready.json()["reason"] and "--allow-drift" in ready.json()["reason"]
        v2 = httpx.get(srv.url + "/v2/health/ready", timeout=5)
        assert v2.status_code == 503 and v2.json()["reason"] == ready.json()["reason"]
        assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200  # up, not ready
        x = np.zeros((1, 3, 64, 64), np.float32)
        r = httpx.post(srv.url + "/v1/logits", json={"inputs": x.tolist()}, timeout=10)
        assert r.status_code == 503 and "not ready" in r.json()["error"], r.text
        assert srv.proc.poll() is None
        assert "fails its golden set" in srv.output()


@pytest.mark.parametrize("flag", ["--allow-drift", "--no-verify"])
def test_serve_with_a_drifting_artifact_turns_ready_when_told_to(serving_onnx, tmp_path, flag):
    bad = _tamper(serving_onnx, tmp_path / "bad.onnx", weight_scale=1.5)
    with Started(bad, flag) as srv:
        assert _settled(srv.url).status_code == 200


def test_serve_with_a_good_artifact_turns_ready(serving_onnx, tmp_path):
    good = shutil.copy(serving_onnx, tmp_path / "good.onnx")
    with Started(good, "--max-batch", "4") as srv:
        ready = _settled(srv.url)
        assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
        assert (tmp_path / "good.verified.json").exists()  # the check ran (and its verdict is kept)


# --- issue 29: verification keyed on the bytes loaded; an unverified model says so ----------------------------
def _strip_golden(src, dst):
    """A copy of ``src`` without its golden set (as an old export, or one stripped of it)."""
    import onnx

    model = onnx.load(str(src))
    keep = [p for p in model.metadata_props if p.key != "vitdeploy.golden"]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    onnx.save(model, str(dst))
    return dst


def test_a_file_swapped_after_loading_is_refused_and_never_blessed(serving_onnx, tmp_path):
    """serve stamps the file, opens it, then checks in the background: a file replaced in between (by one
    that fails the golden set) is refused, no verdict is cached for it, and the next load checks it."""
    from vitdeploy.errors import VitDeployError
    from vitdeploy.verify import DriftError, open_verified, verified_path

    path = shutil.copy(serving_onnx, tmp_path / "m.onnx")
    swapped = _tamper(serving_onnx, tmp_path / "swapped.onnx", weight_scale=1.5)
    prepare = warm_and_verify(path, 2)  # as serve does: before the runtime opens the file
    with open_runtime(path, threads=1) as rt:
        os.replace(swapped, path)
        with pytest.raises(VitDeployError, match="changed on disk after it was loaded"):
            prepare(rt)
    assert not verified_path(path).exists()
    with pytest.raises(DriftError, match="fails its golden set"):
        open_verified(path, backend="onnxruntime", threads=1)


def test_open_verified_refuses_a_file_replaced_while_it_opened(serving_onnx, tmp_path, monkeypatch):
    from vitdeploy import verify
    from vitdeploy.errors import VitDeployError

    path = shutil.copy(serving_onnx, tmp_path / "m.onnx")
    swapped = _tamper(serving_onnx, tmp_path / "swapped.onnx", weight_scale=1.5)
    real = verify.open_runtime

    def open_then_swap(*args, **kwargs):
        rt = real(*args, **kwargs)
        os.replace(swapped, path)
        return rt

    monkeypatch.setattr(verify, "open_runtime", open_then_swap)
    with pytest.raises(VitDeployError, match="changed on disk after it was loaded"):
        verify.open_verified(path, backend="onnxruntime", threads=1)
    assert not verify.verified_path(path).exists()


def test_serve_says_an_artifact_without_a_golden_set_is_not_verified(serving_onnx, tmp_path):
    import httpx

    bare = _strip_golden(serving_onnx, tmp_path / "bare.onnx")
    with Started(bare, "--max-batch", "2") as srv:
        ready = _settled(srv.url)
        assert ready.status_code == 200 and ready.json()["verified"] is False, ready.text
        assert "carries no golden set" in ready.json()["verification"]
        assert httpx.get(srv.url + "/readyz", timeout=5).json()["verified"] is False
        banner = next(line for line in srv.output().splitlines() if line.startswith("serving "))
        assert "NOT VERIFIED: bare.onnx carries no golden set" in banner and "golden set passes" not in banner


def test_serve_reports_a_verified_artifact(serving_onnx, tmp_path):
    good = shutil.copy(serving_onnx, tmp_path / "good.onnx")
    with Started(good, "--max-batch", "2") as srv:
        ready = _settled(srv.url)
        assert ready.status_code == 200 and ready.json()["verified"] is True, ready.text
        assert "NOT VERIFIED" not in srv.output()


def test_require_verified_refuses_an_artifact_without_a_golden_set(serving_onnx, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from vitdeploy.cli import main

    bare = _strip_golden(serving_onnx, tmp_path / "bare.onnx")
    image = tmp_path / "i.png"
    Image.new("RGB", (70, 70), (200, 10, 10)).save(image)
    for args in (["serve", "--model", str(bare)], ["predict", "--model", str(bare), str(image)],
                 ["bench", str(bare), "--batch", "1", "--iters", "2", "--warmup", "0"]):
        r = CliRunner().invoke(main, [*args, "--require-verified"])
        assert r.exit_code == 1, (args, r.output)
        assert r.output.strip().splitlines()[-1] == (
            "Error: bare.onnx carries no golden set: re-export it with `vitdeploy export` to add one; "
            "--require-verified refuses it"), r.output
    # without it: runs, and says so on stderr (a real process: pytest's log capture would take the warning)
    exe = Path(sys.executable).parent / "vitdeploy"
    p = subprocess.run([str(exe), "predict", "--model", str(bare), str(image)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "not verified: bare.onnx carries no golden set" in p.stderr, p.stderr
    good = shutil.copy(serving_onnx, tmp_path / "good.onnx")
    r = CliRunner().invoke(main, ["predict", "--model", str(good), str(image), "--require-verified"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["predict", "--model", str(good), str(image), "--require-verified", "--no-verify"])
    assert r.exit_code == 2 and "contradict" in r.output


def test_require_verified_holds_in_the_process_that_loads_the_model(serving_onnx, tmp_path, monkeypatch):
    """--require-verified is checked where the runtime loads the file, not only at start-up: a --workers worker
    (uvicorn restarts one that dies) that finds the file replaced by one without a golden set never turns ready,
    nor does serve's own background check. Old code: the flag reached neither; ready, serving it unverified."""
    import importlib
    import socket

    from click.testing import CliRunner
    from starlette.testclient import TestClient

    from vitdeploy.cli import main
    from vitdeploy.serving.server import app_from_env
    from vitdeploy.verify import UnverifiedError

    path = shutil.copy(serving_onnx, tmp_path / "m.onnx")
    bare = _strip_golden(serving_onnx, tmp_path / "bare.onnx")
    envs = []
    serve_module = importlib.import_module("vitdeploy.cli.serve")
    monkeypatch.setattr(serve_module, "_serve_workers", lambda env, *a: envs.append(env))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = CliRunner().invoke(main, ["serve", "--model", str(path), "--workers", "2", "--require-verified",
                                  "--port", str(port)])
    assert r.exit_code == 0 and len(envs) == 1, r.output
    os.replace(bare, path)  # after the start-up check, before a worker loads it
    for key, value in envs[0].items():
        monkeypatch.setenv(key, value)
    with TestClient(app_from_env()) as client:
        deadline = time.perf_counter() + 60
        while (ready := client.get("/readyz")).json().get("status") == "preparing" and time.perf_counter() < deadline:
            time.sleep(0.1)
        assert ready.status_code == 503 and "--require-verified refuses it" in ready.json()["reason"], ready.text
    with open_runtime(path, threads=1) as rt:
        assert warm_and_verify(path, 2)(rt)["verified"] is False
        with pytest.raises(UnverifiedError, match="--require-verified refuses it"):
            warm_and_verify(path, 2, require=True)(rt)
