"""The Runtime interface on ONNX Runtime, OpenVINO and torch; TensorRT's checks; predict/compare/bench."""

import importlib.util
import json
import platform

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from vitdeploy.cli import main
from vitdeploy.engines import InputError, open_runtime
from vitdeploy.errors import VitDeployError


def _x(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 224, 224), dtype=np.float32)


def test_auto_backend_and_spec(digits, digits_onnx):
    rt = open_runtime(digits_onnx["fp32"])
    assert rt.backend == "onnxruntime" and rt.spec.shape == (3, 224, 224) and rt.spec.dtype == "float32"
    assert rt.metadata.labels == [str(i) for i in range(10)]
    assert open_runtime(digits["checkpoint"]).backend == "torch"


def test_shared_cores_stops_onnx_runtime_spinning(digits_onnx):
    """A server's runtime (shared_cores=True) sleeps between calls; a benchmark's spins, ONNX Runtime's default.
    The setting reaches the session, and answers do not change; OpenVINO takes the hint without an option."""
    quiet, default = open_runtime(digits_onnx["fp32"], shared_cores=True), open_runtime(digits_onnx["fp32"])
    assert (quiet.spinning, default.spinning) == (False, True)
    key = "session.intra_op.allow_spinning"
    assert quiet.session.get_session_options().get_session_config_entry(key) == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # ONNX Runtime's default: spin
        default.session.get_session_options().get_session_config_entry(key)
    assert np.abs(quiet.infer(_x(2)) - default.infer(_x(2))).max() < 1e-5
    if importlib.util.find_spec("openvino") is not None:
        assert open_runtime(digits_onnx["fp32"], backend="openvino", shared_cores=True).infer(_x(1)).shape == (1, 10)


def test_static_batch_is_padded_and_split(digits, digits_onnx):
    ref = open_runtime(digits["checkpoint"])
    rt = open_runtime(digits_onnx["fp32-b4"])
    assert (rt.spec.min_batch, rt.spec.max_batch) == (4, 4)
    for n in (1, 3, 4, 9):
        x = _x(n, seed=n)
        out = rt.infer(x)
        assert out.shape == (n, 10)
        assert np.abs(out - ref.infer(x)).max() < 1e-4


def test_torch_tensor_input_and_single_image(digits_onnx):
    rt = open_runtime(digits_onnx["fp32"])
    x = _x(2)
    assert np.allclose(rt.infer(torch.from_numpy(x)), rt.infer(x), atol=1e-6)
    assert rt.infer(x[0]).shape == (1, 10)


@pytest.mark.parametrize(
    ("batch", "message"),
    [(np.zeros((2, 3, 32, 32), np.float32), r"input shape \(2, 3, 32, 32\) does not match the model's \[N, 3, 224"),
     (np.zeros((1, 3, 224, 224), np.uint8), "not floating point"),
     ([1, 2, 3], "expected a numpy array")],
)
def test_bad_batches(digits_onnx, batch, message):
    with pytest.raises(InputError, match=message):
        open_runtime(digits_onnx["fp32"]).infer(batch)


def test_torch_bf16_and_compile_paths(digits):
    """bf16, eager and torch.compile'd, against fp32 on real digits images: the same predictions and
    logits within bf16's precision (8-bit mantissa; measured 0.3-0.4% of the largest logit here, the
    bound is 2%), and each path really is what its name says."""
    from vitdeploy.preprocess import Preprocessing, find_images, load_images

    fp32 = open_runtime(digits["checkpoint"])
    x = load_images(find_images(digits["test"])[::12][:32], Preprocessing.from_dict(fp32.metadata.preprocessing))
    a = fp32.infer(x)
    eager = open_runtime(digits["checkpoint"], dtype="bf16")
    compiled = open_runtime(digits["checkpoint"], dtype="bf16", compile=True)
    assert isinstance(compiled.model, torch._dynamo.eval_frame.OptimizedModule) and "compile" in compiled.describe()
    assert not isinstance(eager.model, torch._dynamo.eval_frame.OptimizedModule)
    for rt in (eager, compiled):
        assert next(rt.model.parameters()).dtype == torch.bfloat16
        b = rt.infer(x)
        assert b.dtype == np.float32 and not np.array_equal(a, b)  # computed in bf16, returned as float32
        cosine = float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
        assert np.mean(a.argmax(-1) == b.argmax(-1)) >= 31 / 32, rt.describe()
        assert np.abs(a - b).max() < 0.02 * np.abs(a).max() and cosine > 0.9999, rt.describe()


def test_openvino_runs_the_same_files(digits, digits_onnx):
    pytest.importorskip("openvino", reason="OpenVINO not installed: pip install 'vitdeploy[openvino]'")
    ref = open_runtime(digits_onnx["fp32"]).infer(_x(3))
    ov = open_runtime(digits_onnx["fp32"], backend="openvino")
    assert ov.backend == "openvino" and np.abs(ov.infer(_x(3)) - ref).max() < 1e-3
    ov8 = open_runtime(digits_onnx["int8"], backend="openvino")
    assert ov8.infer(_x(2)).shape == (2, 10)


def test_int8_qdq_as_uint8_is_exact(digits_onnx):
    """Run literally (no graph optimization), the uint8 form gives the same floats as the int8 file."""
    x = _x(3)
    as_written = open_runtime(digits_onnx["int8"], optimization="disable", qdq_activations="int8")
    as_uint8 = open_runtime(digits_onnx["int8"], optimization="disable", qdq_activations="uint8")
    quantize_nodes = sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(digits_onnx["int8"])).graph.node)
    assert as_written.qdq_rewritten == 0 and as_uint8.qdq_rewritten == quantize_nodes >= 13  # 13 linear inputs
    assert "Q/DQ as uint8]" in as_uint8.describe()
    np.testing.assert_array_equal(as_uint8.infer(x), as_written.infer(x))
    assert open_runtime(digits_onnx["fp32"], qdq_activations="uint8").qdq_rewritten == 0


def test_int8_qdq_as_uint8_fuses_every_quantized_matmul(digits_onnx):
    """With uint8 activations ONNX Runtime runs every quantized MatMul as an integer kernel; inspect says so.
    The classifier's Gemm, whose output has no Q/DQ (none on a linear layer's output: TensorRT's and
    ModelOpt's layout), runs in float on its dequantized inputs on ONNX Runtime 1.32 (integer Gemm, QGemm,
    only with a quantized output there); 1.21 still fuses it into an integer kernel."""
    from vitdeploy.inspection import inspect_artifact

    info = inspect_artifact(digits_onnx["int8"])
    report = info["onnxruntime_cpu"]
    gemms = sum(n.op_type == "Gemm" for n in onnx.load(str(digits_onnx["int8"])).graph.node)
    as_uint8 = report["qdq_as_uint8"]
    assert gemms == 1 and as_uint8["integer"] + as_uint8["float_on_dequantized"] == info["qdq"]["quantized"]
    assert as_uint8["float_on_dequantized"] <= gemms  # every quantized MatMul runs as an integer kernel
    assert report["as_written"]["integer"] + report["as_written"]["float_on_dequantized"] == info["qdq"]["quantized"]
    assert "onnxruntime_cpu" not in inspect_artifact(digits_onnx["fp32"])


def test_int8_qdq_as_uint8_keeps_accuracy(digits, digits_onnx):
    from vitdeploy.evaluate import evaluate_folder

    fp32 = evaluate_folder(open_runtime(digits_onnx["fp32"]), digits["test"])
    u8 = evaluate_folder(open_runtime(digits_onnx["int8"], qdq_activations="uint8"), digits["test"])
    assert np.mean(np.array(u8.predictions) == np.array(fp32.predictions)) >= 0.97
    assert abs(u8.accuracy - fp32.accuracy) <= 0.015
    with pytest.raises(VitDeployError, match="qdq_activations must be one of auto, int8, uint8"):
        open_runtime(digits_onnx["int8"], qdq_activations="s8")


def test_not_an_artifact(tmp_path):
    junk = tmp_path / "model.txt"
    junk.write_text("hello")
    with pytest.raises(VitDeployError, match="is not an ONNX file"):
        open_runtime(junk)
    r = CliRunner().invoke(main, ["predict", "x.png", "--model", str(junk)])
    assert r.exit_code == 1 and "is not an ONNX file" in r.output


# -- TensorRT runtime: the checks that run before any GPU is touched -------------------------------
# (check_compatible: tests/test_tensorrt_runtime.py, with the typed sidecar)
def test_corrupt_or_missing_sidecar(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not an engine")
    with pytest.raises(VitDeployError, match=r"has no sidecar m\.json"):
        open_runtime(engine)
    (tmp_path / "m.json").write_text("{broken")
    with pytest.raises(VitDeployError, match=r"sidecar .*m\.json is corrupt"):
        open_runtime(engine)


def test_engine_on_a_machine_without_gpu_is_refused(digits_onnx, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX not installed")
    from vitdeploy.engines.tensorrt.build import BuildOptions, build_engine, current_gpu

    if current_gpu() is not None:
        pytest.skip("a GPU is present")
    build_engine(digits_onnx["fp16"], tmp_path / "m.engine", BuildOptions(flavour="rtx", compute_capabilities=["sm89"]))
    with pytest.raises(VitDeployError, match="needs an NVIDIA GPU"):
        open_runtime(tmp_path / "m.engine")


def test_cuda_python_layer_fails_cleanly_without_a_driver():
    pytest.importorskip("cuda.bindings", reason="cuda-python not installed")
    from vitdeploy.engines.tensorrt.build import current_gpu
    from vitdeploy.engines.tensorrt.cuda_memory import CudaError, device_memory

    if current_gpu() is not None:
        mem = device_memory("cuda-python")
        ptr = mem.malloc(1024)
        host = mem.pinned((256,), np.float32)
        host[:] = np.arange(256)
        back = mem.pinned((256,), np.float32)
        s = mem.stream()
        mem.htod(ptr, host, s)
        mem.dtoh(back, ptr, s)
        mem.sync(s)
        assert np.array_equal(host, back)
        return
    with pytest.raises(CudaError, match="cudaGetDeviceCount failed: cudaError"):
        device_memory("cuda-python")


# the real-GPU engine test, which picks the flavour by compute capability: tests/test_tensorrt_runtime.py


# -- CLI: predict, compare, bench -------------------------------------------------------------------
def test_predict_from_artifact_alone(digits, digits_onnx):
    files = sorted((digits["test"] / "7").iterdir())[:2]
    r = CliRunner().invoke(main, ["predict", *map(str, files), "--model", str(digits_onnx["int8"]), "--json",
                                  "--top-k", "3"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert "running onnxruntime[CPU" in r.stderr
    assert len(out) == 2 and len(out[0]["top_k"]) == 3
    assert out[0]["top_k"][0]["label"] == "7" and 0 < out[0]["top_k"][0]["probability"] <= 1
    r = CliRunner().invoke(main, ["predict", "missing.png", "--model", str(digits_onnx["fp32"])])
    assert r.exit_code == 1 and "cannot open image missing.png" in r.output


def test_compare_passes_and_fails(digits, digits_onnx):
    r = CliRunner().invoke(main, ["compare", str(digits_onnx["fp32"]), str(digits["checkpoint"]), "--inputs", "4"])
    assert r.exit_code == 0 and "PASSED" in r.output, r.output
    # A's golden images (what `verify` runs) join the random inputs
    from vitdeploy.verify import artifact_golden

    golden = artifact_golden(digits_onnx["fp32"])
    r = CliRunner().invoke(main, ["compare", str(digits_onnx["fp32"]), str(digits["checkpoint"]), "--inputs", "4",
                                  "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["samples"] == 4 + len(golden.images)
    r = CliRunner().invoke(main, ["compare", str(digits_onnx["fp32"]), str(digits_onnx["int8"]),
                                  "--images", str(digits["test"] / "3"), "--atol", "1e-6", "--rtol", "0"])
    assert r.exit_code == 1 and "outputs differ beyond tolerance" in r.output


def test_bench_side_by_side(digits, digits_onnx, tmp_path):
    r = CliRunner().invoke(main, [
        "bench", str(digits_onnx["fp32"]), str(digits_onnx["int8"]), str(digits["checkpoint"]),
        "--backend", "onnxruntime,torch", "--batch", "1,2", "--warmup", "1", "--iters", "3",
        "--json", str(tmp_path / "b.json"), "--csv", str(tmp_path / "b.csv"), "--plot", str(tmp_path / "b.png")])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "b.json").read_text())
    rows = data["results"]
    assert len(rows) == 6 and {row["batch"] for row in rows} == {1, 2}
    assert {row["precision"] for row in rows} == {"fp32", "int8"}
    if platform.machine().lower() in ("x86_64", "amd64"):  # auto: ONNX Runtime's fast integer path on x86
        assert [row["precision"] for row in rows if "Q/DQ as uint8" in row["backend"]] == ["int8", "int8"]
    assert all(row["iterations"] == 3 for row in rows)
    # speed-up: against the first artifact given (the FP32 ONNX) at the same batch size, by mean latency
    for row in rows:
        base = next(b for b in rows if b["batch"] == row["batch"] and b["name"] == digits_onnx["fp32"].name)
        assert row["speedup"] == pytest.approx(base["latency_ms"]["mean"] / row["latency_ms"]["mean"], rel=1e-9)
    assert len({round(row["speedup"], 6) for row in rows}) > 2  # ratios of different rows, not a constant
    lat = rows[0]["latency_ms"]
    assert lat["min"] <= lat["median"] <= lat["p99"] <= lat["max"] and lat["mean"] > 0
    assert data["machine"]["cpu"] and data["libraries"]["onnxruntime"]
    assert (tmp_path / "b.csv").read_text().count("\n") == 7
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert "speed-up" in r.output


def test_bench_runs_int8_qdq_as_written_on_request(digits_onnx, tmp_path):
    r = CliRunner().invoke(main, ["bench", str(digits_onnx["int8"]), "--batch", "1", "--warmup", "0", "--iters", "2",
                                  "--qdq-activations", "int8", "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    (row,) = json.loads((tmp_path / "b.json").read_text())["results"]
    assert row["precision"] == "int8" and "uint8" not in row["backend"]
    r = CliRunner().invoke(main, ["bench", str(digits_onnx["int8"]), "--qdq-activations", "s8"])
    assert r.exit_code != 0 and "'s8' is not one of 'auto', 'int8', 'uint8'" in r.output
