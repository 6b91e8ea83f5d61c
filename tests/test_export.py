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


def _activation_pairs(model, op):
    """Nodes of ``op`` whose two inputs are both activations (not weights, not dequantized weights)."""
    weights = {i.name for i in model.graph.initializer}
    dq_of_weight = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights}
    return [n for n in model.graph.node
            if n.op_type == op and len(n.input) == 2 and not {*n.input} & (weights | dq_of_weight)]


def attention_and_residual_violations(model) -> list[str]:
    """What an INT8 export must never quantize: attention's Q·Kᵀ and P·V MatMuls and the residual
    Adds, i.e. MatMul/Add nodes whose two inputs are both activations (the residual stream's range is
    ~86 against 1-6 elsewhere: quantizing it is how ModelOpt's INT8 of this model falls to 55%).
    A violation: such a node reads a DequantizeLinear output, or its output goes into a QuantizeLinear."""
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    bad = []
    for op in ("MatMul", "Add"):
        for n in _activation_pairs(model, op):
            bad += [f"{op} {n.name}: input {i} is dequantized" for i in n.input
                    if producer.get(i) == "DequantizeLinear"]
            bad += [f"{op} {n.name}: output is quantized" for o in n.output if o in quantized]
    return bad


def test_int8_is_explicit_qdq_on_matmuls(digits_onnx):
    from vitdeploy.exporters.precision import qdq_coverage

    model = onnx.load(str(digits_onnx["int8"]))
    coverage = qdq_coverage(model)
    # 2 layers x (q, k, v, out, fc1, fc2) + classifier Gemm; the patch Conv stays float
    assert coverage["quantizable"] == 2 * 6 + 2 and coverage["quantized"] == 2 * 6 + 1
    # attention's two activation x activation MatMuls and the two residual Adds per layer are all found ...
    assert len(_activation_pairs(model, "MatMul")) == 2 * 2 and len(_activation_pairs(model, "Add")) == 2 * 2
    # ... and none of them is quantized
    assert attention_and_residual_violations(model) == []
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type in ("LayerNormalization", "Softmax", "Erf"):
            assert producer.get(n.input[0]) != "DequantizeLinear"
    init = {i.name: i for i in model.graph.initializer}
    for n in (n for n in model.graph.node if n.op_type == "DequantizeLinear"):
        if n.input[0] in init:  # weights are int8, never an INT32 bias
            assert init[n.input[0]].data_type == onnx.TensorProto.INT8
    assert read_onnx_metadata(digits_onnx["int8"]).precision == "int8"


def test_the_int8_layout_check_catches_quantized_attention_and_residuals(digits, tmp_path, monkeypatch):
    """The check above fails on an INT8 file that quantizes attention MatMuls and residual Adds
    (what ONNX Runtime's quantizer does with no exclusions and Add in its op list)."""
    from vitdeploy.exporters import precision

    monkeypatch.setattr(precision, "float_nodes", lambda model: [])
    monkeypatch.setattr(precision, "QUANTIZED_OPS", ("MatMul", "Gemm", "Conv", "Add"))
    export_onnx(digits["checkpoint"], tmp_path / "bad.onnx", options=ExportOptions(
        dynamic_batch=True, precision="int8", calib_dir=digits["train"], calib_samples=16, verify=False))
    bad = attention_and_residual_violations(onnx.load(str(tmp_path / "bad.onnx")))
    assert any(v.startswith("MatMul") for v in bad) and any(v.startswith("Add") for v in bad)


def test_fp8_exports_e4m3_qdq(digits, tmp_path):
    report = export_onnx(digits["checkpoint"], tmp_path / "f8.onnx",
                         options=ExportOptions(precision="fp8", calib_dir=digits["train"], calib_samples=64))
    assert report.opset == 19 and report.qdq["quantized"] == report.qdq["quantizable"] - 1
    model = onnx.load(str(tmp_path / "f8.onnx"))
    assert any(i.data_type == onnx.TensorProto.FLOAT8E4M3FN for i in model.graph.initializer)


def test_fp8_scales_are_amax_over_448(digits, tmp_path):
    """TensorRT's and ModelOpt's FP8 recipe: per-tensor scale max|x| / 448, weights and activations alike.
    ONNX Runtime's own FP8 scale matches E4M3's standard deviation and saturates beyond 4.5 of the
    tensor's: this model's weights were cut at 0.70 of their range, its LayerNorm outputs too."""
    from onnx import numpy_helper

    from vitdeploy.checkpoints import load_model
    from vitdeploy.preprocess import Preprocessing, find_images, open_image

    files = find_images(digits["train"])[:32]
    export_onnx(digits["checkpoint"], tmp_path / "f8.onnx", options=ExportOptions(
        precision="fp8", calib_dir=digits["train"], calib_samples=len(files), attention="float", verify=False))
    export_onnx(digits["checkpoint"], tmp_path / "f32.onnx", options=ExportOptions(verify=False))  # same names
    f8, fp32 = onnx.load(str(tmp_path / "f8.onnx")), onnx.load(str(tmp_path / "f32.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in f8.graph.initializer}
    weights = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    q_weights = [(n.input[0].removesuffix("_quantized"), float(inits[n.input[1]])) for n in f8.graph.node
                 if n.op_type == "DequantizeLinear" and n.input[0].removesuffix("_quantized") in weights]
    assert len(q_weights) >= 10
    for name, scale in q_weights:
        assert scale * 448 == pytest.approx(float(np.abs(weights[name]).max()), rel=1e-6), name
    produced = {o for n in fp32.graph.node for o in n.output}
    q_acts = {n.input[0]: float(inits[n.input[1]]) for n in f8.graph.node
              if n.op_type == "QuantizeLinear" and n.input[0] in produced}
    fp32.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in q_acts)
    session = ort.InferenceSession(fp32.SerializeToString(), providers=["CPUExecutionProvider"])
    prep = Preprocessing.from_config(load_model(digits["checkpoint"]).config)
    amax = dict.fromkeys(q_acts, 0.0)
    for f in files:
        values = session.run(list(q_acts), {"pixel_values": prep(open_image(f))[None]})
        for name, value in zip(q_acts, values, strict=True):
            amax[name] = max(amax[name], float(np.abs(value).max()))
    assert len(q_acts) >= 5
    for name, scale in q_acts.items():
        assert scale * 448 == pytest.approx(amax[name], rel=1e-4), name


def _count_calibration(monkeypatch) -> list[int]:
    """Images ONNX Runtime's calibrator is handed by the real quantize, counted on the way."""
    from vitdeploy.exporters import precision

    seen: list[int] = []
    real = precision.quantize

    def counting(model_path, output_path, input_name, batches, *args, **kw):
        def counted():
            for x in batches:
                seen.append(len(x))
                yield x
        return real(model_path, output_path, input_name, counted(), *args, **kw)

    monkeypatch.setattr(precision, "quantize", counting)
    return seen


def test_fp8_calibration_holds_one_batch_in_onnx_runtime(digits, tmp_path, monkeypatch):
    """ONNX Runtime's FP8 (distribution) calibrator keeps every tensor of every image until the end: at
    ViT-B's 160 MiB per image, 512 images would need 80 GiB. Every FP8 scale is amax / 448 from vitdeploy's
    own running max, so the calibrator gets one batch; the scales still cover all images."""
    seen = _count_calibration(monkeypatch)
    report = export_onnx(digits["checkpoint"], tmp_path / "f8.onnx", options=ExportOptions(
        precision="fp8", calib_dir=digits["train"], calib_samples=24, attention="float"))
    assert seen == [1] and report.golden.passed
    assert any("calibrated on 24 images" in n for n in report.notes)


def test_histogram_calibration_is_capped_by_memory(digits, tmp_path, monkeypatch):
    from vitdeploy.exporters import precision

    export_onnx(digits["checkpoint"], tmp_path / "f32.onnx", options=ExportOptions(verify=False))
    per_image = precision.histogram_bytes_per_image(tmp_path / "f32.onnx")
    assert per_image > 100_000  # the digits ViT: about 1 MiB of MatMul inputs and outputs per image
    monkeypatch.setattr(precision, "HISTOGRAM_BUDGET_BYTES", 10 * per_image)
    seen = _count_calibration(monkeypatch)
    report = export_onnx(digits["checkpoint"], tmp_path / "e.onnx", options=ExportOptions(
        precision="int8", calib_dir=digits["train"], calib_samples=32, calib_method="entropy", attention="float"))
    assert sum(seen) == 10 and report.golden.passed
    assert any(n.startswith("calibration histograms on the first 10 of 32 images") for n in report.notes), report.notes


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


def test_precision_stage_runs_the_registry_entry(tiny_checkpoint, tmp_path, monkeypatch):
    """Export's precision stage is PRECISION_STEPS' entry (a step swapped in there is the one that runs);
    every registered precision has the tolerances verification holds it to; an unknown one is refused."""
    import dataclasses

    from vitdeploy.artifacts.golden import tolerance_for
    from vitdeploy.exporters import precision
    from vitdeploy.metrics import TOLERANCES

    assert set(precision.PRECISION_STEPS) == set(TOLERANCES) and all(map(tolerance_for, precision.PRECISION_STEPS))
    real, seen = precision.PRECISION_STEPS["fp16"], []

    def spy(job):
        seen.append((job.precision, job.proto is not None, job.calibration))
        return real.run(job)

    monkeypatch.setitem(precision.PRECISION_STEPS, "fp16", dataclasses.replace(real, run=spy))
    report = export_onnx(tiny_checkpoint, tmp_path / "h.onnx", options=ExportOptions(precision="fp16", batch=2))
    assert seen == [("fp16", True, None)] and report.verification.within(**TOLERANCES["fp16"])
    assert _ops(tmp_path / "h.onnx")["Cast"] >= 2  # the real FP16 pass ran behind the spy
    with pytest.raises(ExportError, match="unknown precision 'bf16': choose fp32, fp16, int8 or fp8"):
        export_onnx(tiny_checkpoint, tmp_path / "x.onnx", options=ExportOptions(precision="bf16"))
    assert not (tmp_path / "x.onnx").exists()


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


# --- external data, atomic publication ------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_external_data_path_publishes_one_matching_set(tiny_checkpoint, images, tmp_path, precision):
    """The > 2 GB path (weights in a .data file), forced on a tiny model by lowering the threshold:
    the data file is named by content hash, the graph references exactly it, re-exporting other
    weights replaces both and removes the old data file, and the result matches the in-file export."""
    from vitdeploy import save_model
    from vitdeploy.checkpoints import build_model, load_model
    from vitdeploy.io import onnx_external_files

    calib = {"calib_dir": images, "calib_samples": 6} if precision == "int8" else {}
    opts = {"precision": precision, "batch": 2, **calib}
    inline = export_onnx(tiny_checkpoint, tmp_path / "inline.onnx", options=ExportOptions(**opts))
    target = tmp_path / "m.onnx"
    report = export_onnx(tiny_checkpoint, target, options=ExportOptions(external_data_bytes=1, **opts))
    assert not onnx_external_files(tmp_path / "inline.onnx")
    (data,) = onnx_external_files(target)
    assert data.is_file() and data.name.startswith("m.onnx.") and data.name.endswith(".data")
    assert any("external data" in n for n in report.notes)
    # the graph file holds no weights (only tensors under 1 kB; it is not smaller than the data file of a tiny
    # model now that its metadata carries the golden set's images)
    inline_bytes = sum(len(t.raw_data) for t in onnx.load(str(target), load_external_data=False).graph.initializer)
    assert inline_bytes < 0.05 * data.stat().st_size
    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224), dtype=np.float32)
    np.testing.assert_allclose(_run(target, x), _run(tmp_path / "inline.onnx", x), rtol=0, atol=1e-6)
    assert inline.verification.cosine > 0.98 and report.verification.cosine > 0.98
    assert read_onnx_metadata(target).precision == precision

    other = tmp_path / "other.safetensors"
    save_model(build_model(load_model(tiny_checkpoint).config, seed=1), other)
    export_onnx(other, target, options=ExportOptions(external_data_bytes=1, **opts))
    (data2,) = onnx_external_files(target)
    assert data2 != data and not data.exists()
    assert sorted(p.name for p in tmp_path.glob("m.onnx*")) == sorted(["m.onnx", data2.name])
    assert not np.allclose(_run(target, x), _run(tmp_path / "inline.onnx", x))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".vitdeploy-")]  # no staging folder left


def test_a_stale_data_file_of_an_older_export_is_removed(tiny_checkpoint, tmp_path):
    """Older vitdeploy wrote ``<name>.data``; a new export (in-file weights) must not leave it for
    `vitdeploy triton` or anyone else to pick up."""
    (tmp_path / "m.onnx.data").write_bytes(b"old weights")
    (tmp_path / "m.onnx.0123456789abcdef.data").write_bytes(b"left by a killed export")
    export_onnx(tiny_checkpoint, tmp_path / "m.onnx", options=ExportOptions(verify=False))
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


# --- verification ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dynamic", [False, True])
def test_int8_with_fewer_calibration_images_than_the_batch(digits, tiny_checkpoint, tmp_path, dynamic):
    """Two calibration images, static batch 4: verified on what there is (repeated to fill the batch)."""
    import shutil

    few = tmp_path / "few"
    few.mkdir()
    for f in sorted(digits["train"].rglob("*.png"))[:2]:
        shutil.copy(f, few / f.name)
    opts = ExportOptions(precision="int8", calib_dir=few, **({"dynamic_batch": True} if dynamic else {"batch": 4}))
    report = export_onnx(tiny_checkpoint, tmp_path / "m.onnx", options=opts)
    assert report.verification.samples == (2 if dynamic else 4) and report.verification.cosine > 0.9


def test_fp8_verification_runs_the_qdq_graph_unfused(digits_onnx, tmp_path):
    """FP8 is verified with ONNX Runtime's QDQ fusions off (onnxruntime 1.30 fused float8 DQ->MatMul->Q
    into a QLinearMatMul its CPU provider then refused). Shown on the INT8 file, which this ONNX Runtime
    does fuse into integer kernels by default: with the verification options nothing is fused."""
    from vitdeploy.exporters.onnx_export import verification_session_options

    def optimized_ops(options):
        options.optimized_model_filepath = str(tmp_path / "opt.onnx")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        ort.InferenceSession(str(digits_onnx["int8"]), options, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)

    fused = optimized_ops(verification_session_options("int8"))
    unfused = optimized_ops(verification_session_options("fp8"))
    integer = {"QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "QLinearConv", "QLinearAdd"}
    assert sum(fused[op] for op in integer) > 0, fused
    assert sum(unfused[op] for op in integer) == 0 and unfused["MatMul"] >= 2 * 6, unfused


def test_fp8_with_a_quantizer_that_cannot_import_from_onnx(digits, tmp_path, monkeypatch):
    """onnxruntime 1.23's FP8 quantizer imports float8e4m3_to_float32, which onnx 1.23 removed: one line."""
    import onnxruntime.quantization

    def quantize_static(*args, **kwargs):  # what that pair raises, without installing it
        raise ImportError("cannot import name 'float8e4m3_to_float32' from 'onnx.numpy_helper'")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", quantize_static)
    (tmp_path / "out").mkdir()
    r = CliRunner().invoke(main, ["export", "--model", str(digits["checkpoint"]), "--precision", "fp8",
                                  "--calib-dir", str(digits["train"]), "--calib-samples", "4",
                                  "--output", str(tmp_path / "out" / "f8.onnx")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert "cannot import float8e4m3_to_float32" in r.output and "onnxruntime" in r.output
    assert _no_leftovers(tmp_path / "out")


# --- the exporter leaves the process alone, and says why it failed ----------------------------------
def test_export_leaves_logging_and_stdio_alone(digits, tmp_path, monkeypatch):
    """No logger level changed, no stdout/stderr swapped while torch.onnx and the quantizer run."""
    import logging
    import sys

    import onnxruntime.quantization

    seen = []
    real_export, real_quantize = torch.onnx.export, onnxruntime.quantization.quantize_static

    def spy(real):
        def call(*args, **kwargs):
            seen.append((sys.stdout, sys.stderr, logging.getLogger().level, logging.getLogger("torch.onnx").level))
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(torch.onnx, "export", spy(real_export))
    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", spy(real_quantize))
    before = (sys.stdout, sys.stderr, logging.getLogger().level, logging.getLogger("torch.onnx").level)
    export_onnx(digits["checkpoint"], tmp_path / "m.onnx", options=ExportOptions(
        precision="int8", calib_dir=digits["train"], calib_samples=8, verify=False))
    assert len(seen) == 2 and all(s == before for s in seen)
    assert (sys.stdout, sys.stderr, logging.getLogger().level, logging.getLogger("torch.onnx").level) == before


class _DataDependent(torch.nn.Module):
    """A forward that torch.export cannot trace (a branch on a tensor's value)."""

    def forward(self, x):
        return x.mean((2, 3)) if x.sum() > 0 else x.amax((2, 3))


def test_exporter_failure_reaches_the_user(tiny_checkpoint, tmp_path, monkeypatch):
    """A real torch.onnx failure: the root cause in one line, the exporter's error chained for --debug."""
    from vitdeploy.checkpoints import load_model
    from vitdeploy.exporters.onnx_export import _torch_export

    with pytest.raises(ExportError, match="Could not guard on data-dependent expression") as info:
        _torch_export(_DataDependent(), load_model(tiny_checkpoint).config, 1, False, 18)
    assert info.value.__cause__ is not None and "--debug" in str(info.value)

    real_export = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda model, args, *a, **k: real_export(_DataDependent(), args, *a, **k))
    r = CliRunner().invoke(main, ["export", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "m.onnx")])
    # what the exporter prints (here the graph it traced) reaches the user, then our one-line error
    *exporter_output, last = r.output.strip().splitlines()
    assert r.exit_code == 1 and "torch.onnx could not export this model" in last and "data-dependent" in last
    assert any("def forward" in line for line in exporter_output)
    assert _no_leftovers(tmp_path)


# --- uint8 image input: preprocessing in the graph ---------------------------------------------------
@pytest.fixture(scope="module")
def uint8_onnx(digits, tmp_path_factory):
    """The digits model with --uint8-input, per precision, calibrated like digits_onnx's INT8."""
    root = tmp_path_factory.mktemp("uint8")
    calib = {"calib_dir": digits["train"], "calib_samples": 200}
    return {p: export_onnx(digits["checkpoint"], root / f"u8-{p}.onnx", options=ExportOptions(
        dynamic_batch=True, precision=p, uint8_input=True, **(calib if p == "int8" else {}))).path
        for p in ("fp32", "fp16", "int8")}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_uint8_input_equals_the_float_path(digits, digits_onnx, uint8_onnx, precision):
    """Same images: uint8 pixels into the uint8 model == normalized floats into the float model,
    within the precision's tolerance; then the CLI's eval gives the same accuracy through each."""
    from vitdeploy.engines import open_runtime
    from vitdeploy.evaluate import evaluate_folder
    from vitdeploy.metrics import TOLERANCES, compare_logits
    from vitdeploy.preprocess import Preprocessing, find_images, load_images

    path = uint8_onnx[precision]
    model = onnx.load(str(path))
    inp = model.graph.input[0]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [224, 224, 3]
    chain, name = [], inp.name  # the input's first consumers, in order
    for _ in range(4):
        (node,) = [n for n in model.graph.node if name in n.input]
        chain.append(node.op_type)
        name = node.output[0]
    assert chain == ["Cast", "Reshape", "Transpose", "Reshape"]  # the patches cut out of NHWC, then one projection
    # the projection of raw pixels stays float in INT8, as the float graph's patch Conv does (fp16: cast to it)
    (projection,) = [n for n in model.graph.node if name in n.input]
    assert projection.op_type == ("Cast" if precision == "fp16" else "MatMul")
    meta = read_onnx_metadata(path)
    assert meta.extra["input"] == "uint8_nhwc" and meta.precision == precision

    prep = Preprocessing.from_dict(meta.preprocessing)
    pixels = load_images(find_images(digits["test"])[::9][:40], prep, uint8=True)
    assert pixels.dtype == np.uint8 and pixels.shape == (40, 224, 224, 3)
    cmp = compare_logits(_run(digits_onnx[precision], prep.normalize(pixels)), _run(path, pixels))
    tol = TOLERANCES[precision] if precision != "fp32" else {"max_abs_rel": 1e-5, "min_cosine": 0.999999}
    assert cmp.within(**tol) and cmp.top1_agreement >= (1.0 if precision != "int8" else 0.97), cmp.summary()

    rt = open_runtime(path)
    assert rt.spec.dtype == "uint8" and rt.spec.shape == (224, 224, 3)
    float_acc = evaluate_folder(open_runtime(digits_onnx[precision]), digits["test"])
    assert abs(evaluate_folder(rt, digits["test"]).accuracy - float_acc.accuracy) <= 0.005


def test_uint8_runtime_takes_pixels_and_refuses_floats(digits, uint8_onnx, images):
    from vitdeploy.engines import InputError, open_runtime
    from vitdeploy.preprocess import find_images, open_image

    rt = open_runtime(uint8_onnx["fp32"])
    files = find_images(images)[:3]
    batch = rt.preprocess([open_image(f) for f in files])
    assert batch.dtype == np.uint8 and batch.shape == (3, 224, 224, 3)
    top = rt.predict_images(files, top_k=1)
    assert len(top) == 3 and all(0 <= p <= 1 for ((_, p),) in top)
    with pytest.raises(InputError, match="takes uint8 NHWC pixels"):
        rt.infer(batch.astype(np.float32))
    with pytest.raises(InputError, match=r"does not match the model's \[N, 224, 224, 3\]"):
        rt.infer(np.zeros((1, 3, 224, 224), np.uint8))
    float_rt = open_runtime(digits["checkpoint"])
    assert float_rt.preprocess([open_image(files[0])]).dtype == np.float32


def test_uint8_input_on_openvino(uint8_onnx):
    pytest.importorskip("openvino", reason="OpenVINO not installed: pip install 'vitdeploy[openvino]'")
    from vitdeploy.engines import open_runtime

    ov = open_runtime(uint8_onnx["fp32"], backend="openvino")
    assert ov.spec.dtype == "uint8" and ov.spec.shape == (224, 224, 3)
    x = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    np.testing.assert_allclose(ov.infer(x), _run(uint8_onnx["fp32"], x), atol=1e-3)


def test_uint8_input_engine_builds_for_sm89(uint8_onnx, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX not installed: pip install 'vitdeploy[tensorrt-rtx]'")
    from vitdeploy.engines.tensorrt.build import BuildOptions, build_engine

    for precision in ("fp16", "int8"):
        report = build_engine(uint8_onnx[precision], tmp_path / f"{precision}.engine", BuildOptions(
            flavour="rtx", compute_capabilities=["sm89"], min_batch=1, opt_batch=2, max_batch=4))
        assert report.targets == ["sm89"] and (tmp_path / f"{precision}.engine").stat().st_size > 10_000
        assert report.profile["max"] == [4, 224, 224, 3]


def test_cli_uint8_input(tiny_checkpoint, tmp_path):
    r = CliRunner().invoke(main, ["export", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "u8.onnx"),
                                  "--uint8-input", "--batch", "2"])
    assert r.exit_code == 0, r.output
    assert "verified with ONNX Runtime" in r.output
    assert read_onnx_metadata(tmp_path / "u8.onnx").extra["input"] == "uint8_nhwc"
    r = CliRunner().invoke(main, ["export", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "x.onnx"),
                                  "--uint8-input", "--precision", "fp16", "--fp16-io"])
    assert r.exit_code == 1 and "not both" in r.output
