"""`vitdeploy export`: lean graphs, metadata, verification, precisions, accuracy, bad input."""

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from vitdeploy.cli import main
from vitdeploy.exporters import ExportOptions, export_onnx, read_onnx_metadata
from vitdeploy.exporters.onnx_export import FORBIDDEN_OPS, ExportError, ort_max_opset


def _run(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"pixel_values": x})[0]


def _ops(path):
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_fp32_from_hf_folder_matches_transformers(hf_folders, tmp_path):
    import transformers

    folder = hf_folders["p32-w80-nobias"]
    report = export_onnx(folder, tmp_path / "m.onnx", options=ExportOptions(batch=2))
    assert report.verification.max_abs < 1e-4 * report.verification.scale
    model = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(model, full_check=True)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert model.graph.input[0].name == "pixel_values" and dims == [2, 3, 96, 64]
    assert model.graph.output[0].name == "logits"
    x = np.random.default_rng(5).standard_normal((2, 3, 96, 64), dtype=np.float32)
    with torch.no_grad():
        ref = transformers.ViTForImageClassification.from_pretrained(folder).eval()(torch.from_numpy(x)).logits
    assert np.abs(_run(tmp_path / "m.onnx", x) - ref.numpy()).max() < 1e-4


def test_graph_is_lean_and_fusable(tiny_checkpoint, tmp_path):
    report = export_onnx(tiny_checkpoint, tmp_path / "d.onnx", options=ExportOptions(dynamic_batch=True))
    ops = _ops(tmp_path / "d.onnx")
    assert not set(ops) & {*FORBIDDEN_OPS, "Gather" if ops["Gather"] > 1 else "", "Concat"}
    assert ops["LayerNormalization"] == 2 * 2 + 1 and ops["Softmax"] == 2 and ops["Erf"] == 2
    assert report.op_histogram == dict(ops) and report.node_count == sum(ops.values())
    graph = onnx.load(str(tmp_path / "d.onnx")).graph
    producer = {o: n for n in graph.node for o in n.output}
    for sm in (n for n in graph.node if n.op_type == "Softmax"):
        qk = producer[sm.input[0]]
        assert qk.op_type == "MatMul" and producer[qk.input[0]].op_type == "Mul"  # scale on Q, before Q·Kᵀ
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 224, 224]
    x = np.random.default_rng(0).standard_normal((5, 3, 224, 224), dtype=np.float32)
    assert _run(tmp_path / "d.onnx", x).shape == (5, 6)


def test_metadata_travels_with_the_file(tiny_checkpoint, tmp_path):
    export_onnx(tiny_checkpoint, tmp_path / "m.onnx", options=ExportOptions(batch=3, verify=False))
    meta = read_onnx_metadata(tmp_path / "m.onnx")
    assert meta.precision == "fp32" and meta.batch == "3" and meta.version
    assert meta.config["hidden_size"] == 32 and meta.labels == [f"LABEL_{i}" for i in range(6)]
    assert meta.preprocessing["mean"] == [0.5, 0.5, 0.5] and meta.preprocessing["image_size"] == [224, 224]
    assert meta.source == str(tiny_checkpoint) and len(meta.source_sha256) == 64


def test_fp16_keeps_layernorm_fp32_and_runs_on_cpu(digits_onnx, tiny_checkpoint, tmp_path):
    model = onnx.load(str(digits_onnx["fp16"]))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    f16_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(f16_weights) > 10
    types = {vi.name: vi.type.tensor_type.elem_type for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    for n in (n for n in model.graph.node if n.op_type == "LayerNormalization"):
        assert types[n.output[0]] == onnx.TensorProto.FLOAT
    for n in (n for n in model.graph.node if n.op_type == "MatMul"):
        assert types[n.output[0]] == onnx.TensorProto.FLOAT16
    report = export_onnx(tiny_checkpoint, tmp_path / "io16.onnx",
                         options=ExportOptions(precision="fp16", fp16_io=True))
    io16 = onnx.load(str(tmp_path / "io16.onnx"))
    assert io16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert report.verification.cosine > 0.999


def test_int8_is_explicit_qdq_on_matmuls(digits_onnx):
    from vitdeploy.exporters.precision import qdq_coverage

    model = onnx.load(str(digits_onnx["int8"]))
    coverage = qdq_coverage(model)
    # 2 layers x (q, k, v, out, fc1, fc2) + classifier Gemm; the patch Conv stays float
    assert coverage["quantizable"] == 2 * 6 + 2 and coverage["quantized"] == 2 * 6 + 1
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type in ("LayerNormalization", "Softmax", "Erf"):
            assert producer.get(n.input[0]) != "DequantizeLinear"
        if n.op_type == "Softmax":  # attention matmuls stay float (ModelOpt's disable_mha_qdq layout)
            assert all(producer.get(i) != "DequantizeLinear" for i in [n.input[0]])
    for n in (n for n in model.graph.node if n.op_type == "DequantizeLinear"):
        init = {i.name: i for i in model.graph.initializer}
        if n.input[0] in init:  # weights are int8, never an INT32 bias
            assert init[n.input[0]].data_type == onnx.TensorProto.INT8
    assert read_onnx_metadata(digits_onnx["int8"]).precision == "int8"


def test_fp8_exports_e4m3_qdq(digits, tmp_path):
    report = export_onnx(digits["checkpoint"], tmp_path / "f8.onnx",
                         options=ExportOptions(precision="fp8", calib_dir=digits["train"], calib_samples=64))
    assert report.opset == 19 and report.qdq["quantized"] == report.qdq["quantizable"] - 1
    model = onnx.load(str(tmp_path / "f8.onnx"))
    assert any(i.data_type == onnx.TensorProto.FLOAT8E4M3FN for i in model.graph.initializer)


def test_digits_accuracy_per_precision(digits, digits_onnx):
    from vitdeploy.engines import open_runtime
    from vitdeploy.evaluate import evaluate_folder

    torch_acc = evaluate_folder(open_runtime(digits["checkpoint"]), digits["test"])
    assert torch_acc.accuracy > 0.90
    results = {p: evaluate_folder(open_runtime(digits_onnx[p]), digits["test"]) for p in ("fp32", "fp16", "int8")}
    assert results["fp32"].correct == torch_acc.correct
    assert abs(results["fp16"].accuracy - torch_acc.accuracy) <= 0.005
    assert abs(results["int8"].accuracy - torch_acc.accuracy) <= 0.015
    for p in ("fp16", "int8"):
        agree = np.mean(np.array(results[p].predictions) == np.array(results["fp32"].predictions))
        assert agree >= 0.97, (p, agree)


def test_eval_cli(digits, digits_onnx):
    r = CliRunner().invoke(main, ["eval", "--model", str(digits_onnx["fp32-b4"]), "--data", str(digits["test"])])
    assert r.exit_code == 0, r.output
    assert "top-1 accuracy 9" in r.output


def _no_leftovers(folder):
    return [p.name for p in folder.iterdir()] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "vit-bogus-patch16-224"], "unknown model"),
        (["--model", "{tmp}/missing.safetensors", "--preset", "vit-tiny-patch16-224"], "does not exist"),
        (["--model", "{tmp}/in/corrupt.safetensors", "--preset", "vit-tiny-patch16-224"], "not a readable"),
        (["--model", "vit-tiny-patch32-224", "--precision", "int8", "--calib-dir", "{tmp}/in/empty"],
         "holds no image files"),
        (["--model", "vit-tiny-patch32-224", "--precision", "int8"], "needs --calib-dir"),
        (["--model", "vit-tiny-patch32-224", "--output", "{tmp}/out/nodir/m.onnx"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, args, message):
    (tmp_path / "in" / "empty").mkdir(parents=True)
    (tmp_path / "in" / "empty" / "readme.txt").write_text("no images here")
    (tmp_path / "in" / "corrupt.safetensors").write_bytes(b"\x00garbage")
    (tmp_path / "out").mkdir()
    args = [a.format(tmp=tmp_path) for a in args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out" / "m.onnx")]
    r = CliRunner().invoke(main, ["export", *args])
    assert r.exit_code == 1, r.output
    assert len(r.output.strip().splitlines()) == 1 and message in r.output
    assert _no_leftovers(tmp_path / "out")


def test_opset_beyond_onnxruntime_is_refused(tmp_path, monkeypatch):
    from vitdeploy.exporters import onnx_export

    assert ort_max_opset() >= 18  # the probe loads real one-node models in this onnxruntime
    too_new = ort_max_opset() + 1
    if too_new > onnx.defs.onnx_opset_version():  # this onnxruntime runs all opsets: act as an older one
        monkeypatch.setattr(onnx_export, "ort_max_opset", lambda: 18)
        too_new = 19
    with pytest.raises(ExportError, match=f"runs opsets up to {too_new - 1}"):
        export_onnx("vit-tiny-patch32-224", tmp_path / "m.onnx", options=ExportOptions(opset=too_new))
    assert _no_leftovers(tmp_path)


def test_failed_verification_removes_the_file(tiny_checkpoint, tmp_path, monkeypatch):
    from vitdeploy import metrics

    monkeypatch.setitem(metrics.TOLERANCES, "fp32", {"max_abs_rel": 0.0, "min_cosine": 1.5})
    with pytest.raises(ExportError, match="disagrees with torch beyond tolerance"):
        export_onnx(tiny_checkpoint, tmp_path / "m.onnx")
    assert _no_leftovers(tmp_path)



def test_fp16_has_no_runtime_casts_of_weights(digits_onnx):
    model = onnx.load(str(digits_onnx["fp16"]))
    inits = {i.name for i in model.graph.initializer}
    assert not [n for n in model.graph.node if n.op_type == "Cast" and n.input[0] in inits]
    ln_weights = {n.input[1] for n in model.graph.node if n.op_type == "LayerNormalization"}
    assert all(i.data_type == onnx.TensorProto.FLOAT for i in model.graph.initializer if i.name in ln_weights)
