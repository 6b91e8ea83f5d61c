"""What a serving box runs without torch, on every Python CI declares (3.10, 3.11, 3.13).

`.ci/run`'s py310/py313 stages install the README's torch-free serving set and point
VITDEPLOY_CI_ARTIFACTS at the folder where the 3.11 stage ran the README's main command, so the
INT8 ONNX and engine made there are evaluated, served and inspected here. In the 3.11 suite the
same checks run on the digits model exported by the conftest fixtures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vitdeploy.io import free_port

ARTIFACTS = os.environ.get("VITDEPLOY_CI_ARTIFACTS")
CLI = [sys.executable, "-c", "from vitdeploy.cli import main; main()"]


@pytest.fixture(scope="module")
def int8_artifacts(request) -> dict[str, Path]:
    """{"onnx", "test"} and "engine" where there is one: the main stage's, else made here with torch."""
    if ARTIFACTS:
        root = Path(ARTIFACTS)  # the README's quickstart: `vitdeploy deploy ... --out bundles/digits`
        bundle = root / "bundles" / "digits"
        found = {"onnx": bundle / "onnx" / "digits_vit-int8.onnx", "test": root / "work" / "digits" / "test",
                 "engine": bundle / "engines" / "digits_vit-int8-rtx.engine"}
        missing = [str(p) for p in found.values() if not p.exists()]
        assert not missing, f"VITDEPLOY_CI_ARTIFACTS is set but the main stage left no {', '.join(missing)}"
        return found
    try:
        import torch  # noqa: F401
    except ImportError:
        pytest.skip("no torch to export the digits model and no VITDEPLOY_CI_ARTIFACTS from the main stage")
    onnx_files = request.getfixturevalue("digits_onnx")
    return {"onnx": onnx_files["int8"], "test": request.getfixturevalue("digits")["test"]}


def _run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_fp8_calibration_works_with_the_installed_onnx_pair():
    """The helper ONNX Runtime's FP8 calibration calls (it imports from onnx.numpy_helper): on Python
    3.10, onnxruntime 1.23 with onnx >= 1.20 fails here; the project constrains onnx there."""
    import onnx
    from onnxruntime.quantization.quant_utils import compute_scale_zp_float8

    _zero, scale = compute_scale_zp_float8(onnx.TensorProto.FLOAT8E4M3FN, np.float32(1.0))
    assert float(np.asarray(scale)) > 0


def test_int8_onnx_keeps_its_accuracy_without_torch(int8_artifacts):
    out = _run_python(
        "import json, sys\n"
        "from vitdeploy.engines import open_runtime\n"
        "from vitdeploy.evaluate import evaluate_folder\n"
        f"with open_runtime({str(int8_artifacts['onnx'])!r}) as rt:\n"
        f"    acc = evaluate_folder(rt, {str(int8_artifacts['test'])!r}).accuracy\n"
        "print(json.dumps({'accuracy': acc, 'torch': 'torch' in sys.modules}))\n")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["torch"] is False
    assert result["accuracy"] >= 0.9  # the tiny ViT on held-out digits: 95% in FP32, INT8 within a point or two


def test_predict_cli_on_the_int8_onnx(int8_artifacts):
    image = next(p for p in sorted((int8_artifacts["test"] / "7").iterdir()))
    done = subprocess.run([*CLI, "predict", str(image), "--model", str(int8_artifacts["onnx"]), "--top-k", "3",
                           "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    top = json.loads(done.stdout)[0]["top_k"]
    assert len(top) == 3 and {t["label"] for t in top} <= {str(i) for i in range(10)}
    assert abs(sum(t["probability"] for t in top) - 1) < 1 and top[0]["probability"] >= top[1]["probability"]


def test_serve_answers_over_http(int8_artifacts, tmp_path):
    import httpx

    port = free_port()
    server = subprocess.Popen([*CLI, "serve", "--model",
                               str(int8_artifacts["onnx"]), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read() if server.stdout else "server exited"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not ready in 120 s"
            time.sleep(0.3)
        images = sorted((int8_artifacts["test"] / "3").iterdir())[:8]
        right = 0
        for path in images:
            r = httpx.post(f"{url}/v1/classify?top_k=2", content=path.read_bytes(), timeout=60)
            assert r.status_code == 200, r.text
            body = r.json()
            labels = [p["label"] for p in body["top_k"]]
            assert len(labels) == 2, body
            right += labels[0] == "3"
        assert right >= 6  # served answers are the model's: mostly right on held-out 3s
        bad = httpx.post(f"{url}/v1/classify", content=b"not an image", timeout=30)
        assert bad.status_code == 400
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_engine_sidecar_reads_without_torch_or_tensorrt(int8_artifacts):
    if "engine" not in int8_artifacts:
        pytest.skip("no engine here: the main stage's bundles/digits engine is checked on 3.10/3.13")
    out = _run_python(
        "import json, sys\n"
        "from vitdeploy.engines.tensorrt.sidecar import read_sidecar\n"
        f"s = read_sidecar({str(int8_artifacts['engine'])!r})\n"
        "print(json.dumps({'flavour': s.flavour, 'targets': s.targets, 'precision': s.precision,\n"
        "                  'labels': (s.model or {}).get('labels'), 'torch': 'torch' in sys.modules}))\n")
    side = json.loads(out.strip().splitlines()[-1])
    assert side == {"flavour": "tensorrt_rtx", "targets": ["sm89"], "precision": side["precision"],
                    "labels": [str(i) for i in range(10)], "torch": False}
    assert side["precision"] == "int8"
