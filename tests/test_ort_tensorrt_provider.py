"""ONNX Runtime's TensorRT execution provider: its options from the artifact, its caches, no quiet fallback.

The default suite's onnxruntime (CPU) has no TensorRT provider, so where a test needs one the provider
list is stubbed to offer it, and ONNX Runtime itself then shows what it does with a provider it cannot
start: it runs on the CPU. With onnxruntime-gpu installed (docs/engines.md: Installing on a GPU machine) the last test
runs against that real wheel. No torch here, so this file runs in a venv holding only onnxruntime-gpu,
onnx, numpy and pytest (PYTHONPATH=. python -m pytest tests/test_ort_tensorrt_provider.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vitdeploy.engines.onnxruntime_backend import (
    DYNAMIC_MAX_BATCH,
    OnnxRuntime,
    onnx_batch_range,
    tensorrt_cache_dir,
    tensorrt_provider_options,
)
from vitdeploy.errors import VitDeployError

ort = pytest.importorskip("onnxruntime")
TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
REAL_PROVIDERS = ort.get_available_providers()
pytestmark = pytest.mark.filterwarnings("ignore:Specified provider:UserWarning")  # the stubbed ones, on purpose


def _onnx(path: Path, batch: int | str = "N", scale: float = 1.0) -> Path:
    """pixel_values [batch, 3, 224, 224] -> logits [batch, 3]: the channel means times ``scale``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("GlobalAveragePool", ["pixel_values"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]), helper.make_node("Mul", ["flat", "s"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [batch, 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3])],
        [numpy_helper.from_array(np.array([scale], np.float32), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # what onnxruntime 1.2x-1.3x all read
    onnx.save(model, path)
    return path


def _expected(path: Path, cache: Path | None, lo: int, opt: int, hi: int) -> dict[str, str]:
    shapes = {"min": lo, "opt": opt, "max": hi}
    out = {f"trt_profile_{k}_shapes": f"pixel_values:{b}x3x224x224" for k, b in shapes.items()}
    if cache is not None:
        out.update({"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache),
                    "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache)})
    return out


def test_provider_options_cover_the_artifacts_batch_range(tmp_path):
    """One profile over the whole batch range: a batch size not seen before never rebuilds while serving."""
    dynamic, static = _onnx(tmp_path / "d.onnx"), _onnx(tmp_path / "s.onnx", batch=4)
    assert onnx_batch_range(dynamic) == ("pixel_values", (3, 224, 224), (1, 8, DYNAMIC_MAX_BATCH))
    assert onnx_batch_range(static) == ("pixel_values", (3, 224, 224), (4, 4, 4))
    cache = tmp_path / "cache"
    assert tensorrt_provider_options(*onnx_batch_range(dynamic), cache) == _expected(
        dynamic, cache, 1, 8, DYNAMIC_MAX_BATCH)
    assert tensorrt_provider_options(*onnx_batch_range(static), None) == _expected(static, None, 4, 4, 4)


def test_cache_folder_is_beside_the_artifact_and_follows_its_weights(tmp_path):
    """ONNX Runtime keys its engine cache by graph structure and names, not weights: a re-export under the
    same name must not load the old engine."""
    path = _onnx(tmp_path / "m.onnx", scale=1.0)
    first = tensorrt_cache_dir(path)
    assert first.parent == tmp_path / "m.ort-trt-cache" and len(first.name) == 16
    assert tensorrt_cache_dir(path) == first
    _onnx(path, scale=2.0)
    assert tensorrt_cache_dir(path) != first


@pytest.fixture
def offered(monkeypatch):
    """offered(*providers): what onnxruntime says it has; returns the providers each session was given."""
    sessions: list[list] = []
    real_session = ort.InferenceSession

    def session(source, so=None, providers=None, **kw):
        sessions.append(providers)
        return real_session(source, so, providers=providers, **kw)

    def offer(*providers: str) -> list[list]:
        monkeypatch.setattr(ort, "get_available_providers", lambda: [*providers, CPU])
        monkeypatch.setattr(ort, "InferenceSession", session)
        return sessions

    return offer


@pytest.mark.skipif(TRT in REAL_PROVIDERS, reason="this onnxruntime has a real TensorRT provider")
def test_tensorrt_provider_gets_the_profile_and_caches(tmp_path, offered):
    path = _onnx(tmp_path / "m.onnx")
    sessions = offered(TRT, CUDA)
    rt = OnnxRuntime(path)  # auto: TensorRT first
    cache = tmp_path / "m.ort-trt-cache" / tensorrt_cache_dir(path).name
    assert sessions[-1] == [(TRT, _expected(path, cache, 1, 8, DYNAMIC_MAX_BATCH)), CUDA, CPU]
    assert cache.is_dir()
    # this onnxruntime cannot start either GPU provider: with device auto that is fine, it runs on the CPU
    x = np.random.default_rng(0).standard_normal((3, 3, 224, 224)).astype(np.float32)
    assert rt.session.get_providers() == [CPU] and np.allclose(rt.infer(x), x.mean(axis=(2, 3)), atol=1e-5)


@pytest.mark.skipif(TRT in REAL_PROVIDERS, reason="this onnxruntime has a real TensorRT provider")
def test_device_tensorrt_never_runs_quietly_elsewhere(tmp_path, offered):
    path = _onnx(tmp_path / "m.onnx")
    offered(CUDA)  # onnxruntime-gpu built without TensorRT
    with pytest.raises(VitDeployError, match=r"--device tensorrt: this onnxruntime has no TensorRT execution "
                                             r"provider .*pip uninstall -y onnxruntime && pip install onnxruntime-gpu"):
        OnnxRuntime(path, device="tensorrt")
    offered(TRT, CUDA)  # listed, but ONNX Runtime cannot start it (no TensorRT libraries, no GPU) and falls back
    with pytest.raises(VitDeployError, match=r"--device tensorrt: ONNX Runtime could not start its "
                                             r"TensorrtExecutionProvider and fell back to CPUExecutionProvider"):
        OnnxRuntime(path, device="tensorrt")
    with pytest.raises(VitDeployError, match=r"--device cuda: ONNX Runtime could not start its CUDAExecutionProvider"):
        OnnxRuntime(path, device="cuda")


@pytest.mark.skipif(TRT in REAL_PROVIDERS, reason="this onnxruntime has a real TensorRT provider")
def test_cuda_n_is_passed_as_device_id_and_never_runs_on_the_cpu(tmp_path, offered):
    """`cuda:N` gives both GPU providers device_id N (ONNX Runtime's own option); this onnxruntime cannot start
    them, so the session is refused, not run on the CPU; with no GPU provider offered it is refused up front."""
    from vitdeploy.engines import open_runtime

    path = _onnx(tmp_path / "m.onnx")
    sessions = offered(TRT, CUDA)
    with pytest.raises(VitDeployError, match=r"--device cuda:1: ONNX Runtime could not start its CUDAExecutionProvider "
                                             r"and fell back to CPUExecutionProvider"):
        open_runtime(path, backend="onnxruntime", device="cuda:1")
    assert sessions[-1] == [(CUDA, {"device_id": "1"}), CPU]
    with pytest.raises(VitDeployError, match=r"--device tensorrt:2: ONNX Runtime could not start its Tensorrt"):
        OnnxRuntime(path, device="tensorrt:2")
    (trt_name, trt_options), cuda, cpu = sessions[-1]
    assert (trt_name, trt_options["device_id"], cuda, cpu) == (TRT, "2", (CUDA, {"device_id": "2"}), CPU)
    assert trt_options["trt_profile_max_shapes"] == f"pixel_values:{DYNAMIC_MAX_BATCH}x3x224x224"
    offered()  # the CPU package
    with pytest.raises(VitDeployError, match=r"--device cuda:1: this onnxruntime has no GPU providers"):
        OnnxRuntime(path, device="cuda:1")
    for bad in ("cuda:x", "cpu:1", "cuda1"):
        with pytest.raises(VitDeployError, match=r"ONNX Runtime runs on auto, cpu, cuda, cuda:N, tensorrt"):
            OnnxRuntime(path, device=bad)


@pytest.mark.skipif(TRT not in REAL_PROVIDERS,
                    reason="onnxruntime-gpu not installed (docs/engines.md: Installing on a GPU machine)")
def test_with_onnxruntime_gpu(tmp_path):
    """The real onnxruntime-gpu wheel: every option name we pass is one its TensorRT option parser knows
    (it throws "Invalid TensorRT EP option" on others), and the session is either the TensorRT provider
    with our profile and caches (a GPU with TensorRT's libraries) or refused for --device tensorrt."""
    capi = Path(ort.__file__).parent / "capi"
    parser = next(capi.glob("onnxruntime_pybind11_state*")).read_bytes()
    assert b"Invalid TensorRT EP option" in parser
    path = _onnx(tmp_path / "m.onnx")
    options = tensorrt_provider_options(*onnx_batch_range(path), tmp_path / "c")
    for key in options:
        assert key.encode() + b"\0" in parser, key
    x = np.random.default_rng(1).standard_normal((5, 3, 224, 224)).astype(np.float32)
    rt = OnnxRuntime(path)
    assert np.allclose(rt.infer(x), x.mean(axis=(2, 3)), atol=1e-4)
    if rt.session.get_providers()[0] == TRT:  # a GPU and TensorRT's libraries: what ONNX Runtime really holds
        held = rt.session.get_provider_options()[TRT]
        cache = tensorrt_cache_dir(path)
        assert held["trt_profile_max_shapes"] == f"pixel_values:{DYNAMIC_MAX_BATCH}x3x224x224"
        assert held["trt_engine_cache_enable"] == "1" and Path(held["trt_engine_cache_path"]) == cache
        assert any(cache.iterdir())  # the engine it built, for the next start
    else:
        with pytest.raises(VitDeployError, match="could not start its TensorrtExecutionProvider"):
            OnnxRuntime(path, device="tensorrt")
