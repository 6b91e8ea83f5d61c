"""open_runtime validates options and devices against the backend registry before any constructor runs."""

from __future__ import annotations

import inspect

import pytest

from vitdeploy.engines import open_runtime, registry
from vitdeploy.errors import VitDeployError


@pytest.mark.parametrize("backend", sorted(registry.REGISTRY))
def test_each_backends_options_are_its_constructors_keywords(backend):
    params = inspect.signature(registry.runtime_class(backend).__init__).parameters
    accepted = set(params) - {"self", "path", "source", "device"}
    assert set(registry.option_names(backend)) == accepted


def test_an_unknown_option_lists_the_valid_ones(serving_onnx):
    with pytest.raises(VitDeployError, match=r"the onnxruntime backend takes no option 'thread': it takes threads, "
                                             r"optimization, engine_cache, qdq_activations"):
        open_runtime(serving_onnx, backend="onnxruntime", thread=2)
    with pytest.raises(VitDeployError, match="the openvino backend takes no option 'cuda_graph'"):
        open_runtime(serving_onnx, backend="openvino", cuda_graph=True)


def test_a_device_the_backend_cannot_run_on_is_refused(serving_onnx):
    with pytest.raises(VitDeployError, match="--device cuda: the openvino backend runs on cpu"):
        open_runtime(serving_onnx, backend="openvino", device="cuda")
    with open_runtime(serving_onnx, backend="openvino", device="cpu", threads=1) as rt:
        assert rt.where == "cpu"


def test_an_artifact_of_another_kind_is_refused(serving_onnx):
    with pytest.raises(VitDeployError, match="the TensorRT backend runs engines: build one with `vitdeploy build"):
        open_runtime(serving_onnx, backend="tensorrt")


def test_the_compute_format_is_each_backends_own_option():
    assert registry.dtype_options("openvino", "bf16") == {"precision_hint": "bf16"}
    assert registry.dtype_options("torch", "bf16") == {"dtype": "bf16"}
    assert registry.dtype_options("onnxruntime", "bf16") == {} and registry.dtype_options("openvino", None) == {}
    for backend, option in registry.DTYPE_OPTION.items():
        assert option in registry.option_names(backend)


def test_bench_dtype_reaches_openvino_as_its_precision_hint(serving_onnx):
    import json

    from click.testing import CliRunner

    from vitdeploy.cli import main

    r = CliRunner().invoke(main, ["bench", str(serving_onnx), "--backend", "openvino", "--dtype", "f16", "--batch", "1",
                                  "--warmup", "0", "--iters", "2", "--threads", "1", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["results"]
    assert len(rows) == 1 and rows[0]["backend"].startswith("openvino[CPU, f16")
