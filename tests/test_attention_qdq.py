"""INT8/FP8 attention: the Q/DQ layout TensorRT fuses, the static fusion check, the accuracy guard.

Tiny ViTs (head sizes 16, 32, 64; 17 tokens) exported for real and run on ONNX Runtime; the digits
model for accuracy. ViT-B/16's 12 of 12 blocks are in the slow tests at the end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from vitdeploy.cli import main
from vitdeploy.errors import VitDeployError
from vitdeploy.exporters import ExportOptions, export_onnx
from vitdeploy.exporters.attention import Graph, find_attention, quantize_attention
from vitdeploy.inspection import check_attention_fusion, inspect_artifact

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def _tiny(tmp: Path, hidden: int, heads: int, layers: int = 2, image: int = 32, patch: int = 8, **kw) -> Path:
    from vitdeploy import save_model
    from vitdeploy.checkpoints import build_model
    from vitdeploy.config import ViTConfig

    cfg = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                    intermediate_size=2 * hidden, image_size=image, patch_size=patch, num_labels=5, **kw)
    path = tmp / f"vit-{hidden}-{heads}-{layers}-{image}.safetensors"
    save_model(build_model(cfg, seed=0), path)
    return path


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    """Photographs would do; smooth random images give activations a realistic spread."""
    from PIL import Image

    root = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(0)
    for i in range(12):
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((48, 48), Image.BILINEAR).save(root / f"{i}.png")
    return root


def _export(ckpt: Path, out: Path, precision: str, attention: str, calib: Path, **kw) -> object:
    return export_onnx(ckpt, out, options=ExportOptions(precision=precision, attention=attention, calib_dir=calib,
                                                         **kw))


def _scale(g: Graph, q_node) -> float:
    return float(g.constant(q_node.input[1]))


def _chain(g: Graph, matmul: str, slot: int) -> list:
    """The nodes above a MatMul input, nearest first, through Q/DQ, Cast, Transpose and Mul."""
    _, passed = g.above(g.nodes[matmul].input[slot], ("QuantizeLinear", "DequantizeLinear", "Cast", "Transpose", "Mul"))
    return passed


@pytest.mark.parametrize("hidden,heads", [(32, 2), (64, 2), (128, 2)], ids=["head16", "head32", "head64"])
def test_int8_attention_layout(tmp_path, calib, hidden, heads):
    report = _export(_tiny(tmp_path, hidden, heads), tmp_path / "m.onnx", "int8", "int8", calib)
    assert report.golden.passed and report.qdq["attention_quantized"] == report.qdq["attention_blocks"] == 2
    model = onnx.load(str(tmp_path / "m.onnx"))
    g = Graph(model.graph)
    blocks = find_attention(model)
    assert len(blocks) == 2  # the last layer's is the [CLS]-only one (a 1-token query, like a pooling head)
    for b in blocks:
        for node, slot in ((b.qk, 0), (b.qk, 1), (b.pv, 0), (b.pv, 1)):
            dq = g.producer[g.nodes[node].input[slot]]  # each DequantizeLinear feeds its MatMul directly
            q = g.producer[dq.input[0]]
            assert (dq.op_type, q.op_type) == ("DequantizeLinear", "QuantizeLinear")
            assert g.initializers[q.input[2]].data_type == onnx.TensorProto.INT8 and g.constant(q.input[2]) == 0
        softmax_q = g.producer[g.producer[g.nodes[b.pv].input[0]].input[0]]
        assert softmax_q.input[0] == g.nodes[b.softmax].output[0] and _scale(g, softmax_q) == pytest.approx(1 / 127)
        # the scale on Q, above Q's QuantizeLinear; K's Transpose above K's
        assert [n.op_type for n in _chain(g, b.qk, 0)][:3] == ["DequantizeLinear", "QuantizeLinear", "Mul"]
        assert [n.op_type for n in _chain(g, b.qk, 1)][:3] == ["DequantizeLinear", "QuantizeLinear", "Transpose"]
        assert b.between == ()  # nothing between Q·Kᵀ and Softmax
    fusion = check_attention_fusion(model)
    assert fusion.precision == "int8" and fusion.passed == 2, fusion.summary()
    assert {b.head_size for b in fusion.blocks} == {hidden // heads} and fusion.blocks[0].sequence == 17


def test_fp8_attention_layout(tmp_path, calib):
    report = _export(_tiny(tmp_path, 64, 2), tmp_path / "f8.onnx", "fp8", "fp8", calib)
    assert report.opset >= 19 and report.golden.passed and report.qdq["attention_quantized"] == 2
    model = onnx.load(str(tmp_path / "f8.onnx"))
    g = Graph(model.graph)
    for b in find_attention(model):
        for node, slot in ((b.qk, 0), (b.qk, 1), (b.pv, 0), (b.pv, 1)):
            dq = g.producer[g.nodes[node].input[slot]]
            q = g.producer[dq.input[0]]
            assert (dq.op_type, q.op_type) == ("DequantizeLinear", "QuantizeLinear")  # no Cast in between
            assert g.initializers[q.input[1]].data_type == onnx.TensorProto.FLOAT16  # FP16 scales
            assert g.initializers[q.input[2]].data_type == onnx.TensorProto.FLOAT8E4M3FN
        softmax_q = g.producer[g.producer[g.nodes[b.pv].input[0]].input[0]]
        assert softmax_q.input[0] == g.nodes[b.softmax].output[0]
        assert _scale(g, softmax_q) == pytest.approx(1 / 448, rel=1e-3)
        # above the QuantizeLinear: the Cast to FP16, then the scale Mul (Q) or the Transpose (K)
        assert [n.op_type for n in _chain(g, b.qk, 0)][:4] == ["DequantizeLinear", "QuantizeLinear", "Cast", "Mul"]
        assert [n.op_type for n in _chain(g, b.qk, 1)][:4] == ["DequantizeLinear", "QuantizeLinear", "Cast",
                                                               "Transpose"]
    fusion = check_attention_fusion(model)
    assert fusion.precision == "fp8" and fusion.passed == 2 and fusion.blocks[0].rules["fp16_scales"]


def _hf_folder(tmp: Path, make) -> Path:
    """An HF transformers vision model (random weights, seed 0, perturbed) saved with save_pretrained."""
    import torch

    torch.manual_seed(0)
    model = make().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp / "hf")
    return tmp / "hf"


@pytest.mark.parametrize("family", ["siglip", "dinov2"])
def test_other_families_get_the_same_layout(tmp_path, calib, family):
    """SigLIP's pooling head is one more attention, with a 1-token query that the export folds into a
    constant (the probe, projected and scaled): it gets its Q/DQ too, and its block meets the rules."""
    import transformers as T

    make = {"siglip": lambda: T.SiglipVisionModel(T.SiglipVisionConfig(
                hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                patch_size=16)),
            "dinov2": lambda: T.Dinov2Model(T.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                           mlp_ratio=2, image_size=28, patch_size=14))}[family]
    report = _export(_hf_folder(tmp_path, make), tmp_path / "m.onnx", "int8", "int8", calib)
    blocks = 3 if family == "siglip" else 2
    assert report.golden.passed and report.qdq["attention_quantized"] == report.qdq["attention_blocks"] == blocks
    model = onnx.load(str(tmp_path / "m.onnx"))
    fusion = check_attention_fusion(model)
    assert fusion.passed == blocks and fusion.precision == "int8", fusion.summary()
    if family == "siglip":
        g = Graph(model.graph)
        head = find_attention(model)[-1]
        assert g.constant(head.q) is not None and g.constant(head.q).shape[-2] == 1  # one learned query
        assert g.producer[g.nodes[head.qk].input[0]].op_type == "DequantizeLinear"


@pytest.fixture(scope="module")
def int8_graph(tmp_path_factory, calib) -> Path:
    tmp = tmp_path_factory.mktemp("int8")
    _export(_tiny(tmp, 64, 2), tmp / "m.onnx", "int8", "int8", calib)
    return tmp / "m.onnx"


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_the_check_names_a_cast_between_qdq_and_matmul(int8_graph):
    model = onnx.load(str(int8_graph))
    b = find_attention(model)[1]
    qk = next(n for n in model.graph.node if n.name == b.qk)
    cast = onnx.helper.make_node("Cast", [qk.input[1]], ["k_cast"], name="inserted_cast", to=onnx.TensorProto.FLOAT)
    qk.input[1] = "k_cast"
    model.graph.node.insert(list(model.graph.node).index(qk), cast)
    fusion = check_attention_fusion(model)
    assert fusion.passed == 1 and fusion.blocks[1].broken == "no_cast"
    assert "breaks \"no Cast between Q/DQ and MatMul\": Cast inserted_cast sits between K's Q/DQ" in fusion.summary()
    _run(model, np.zeros((1, 3, 32, 32), np.float32))  # still a valid graph: only the layout is wrong


def test_the_check_names_a_missing_qdq(int8_graph):
    model = onnx.load(str(int8_graph))
    g = Graph(model.graph)
    b = find_attention(model)[0]
    pv = g.nodes[b.pv]
    dq = g.producer[pv.input[1]]
    q = g.producer[dq.input[0]]
    pv.input[1] = q.input[0]  # V straight into P·V
    model.graph.node.remove(dq)
    model.graph.node.remove(q)
    fusion = check_attention_fusion(model)
    assert fusion.precision == "int8" and fusion.blocks[0].broken == "qdq" and fusion.blocks[1].broken is None
    assert "V reaches" in fusion.blocks[0].why and "without a QuantizeLinear -> DequantizeLinear" in fusion.summary()


def test_the_check_names_a_head_size_of_80(tmp_path, calib):
    _export(_tiny(tmp_path, 160, 2, layers=1), tmp_path / "h80.onnx", "int8", "int8", calib)
    fusion = check_attention_fusion(onnx.load(str(tmp_path / "h80.onnx")))
    assert [b.broken for b in fusion.blocks] == ["head_size"] and fusion.blocks[0].rules["qdq"]
    assert "breaks \"head size 16, 32, 64\": the head size is 80" in fusion.summary()


def test_the_check_on_float_attention_and_hf_eager_scaling():
    """HF's eager form (Q·Kᵀ, then Div by √d, then Softmax) breaks the scale rule; the pass moves the scale
    onto Q, above its QuantizeLinear, and the graph computes the same attention."""
    from onnx import TensorProto, helper

    shape = [1, 2, 8, 16]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["s"], name="qk"),
             helper.make_node("Div", ["s", "sqrt_d"], ["s_scaled"], name="scale"),
             helper.make_node("Softmax", ["s_scaled"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["o"], name="pv")]
    graph = helper.make_graph(nodes, "eager", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
                                               for n in "qkv"],
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, shape)],
                              [onnx.numpy_helper.from_array(np.array(4.0, np.float32), "sqrt_d")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    before = check_attention_fusion(model)
    assert before.precision == "float" and before.blocks[0].broken == "scale"
    assert "Div scale scales Q·Kᵀ's output" in before.summary()

    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(shape, dtype=np.float32) for n in "qkv"}
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    amax = {n: float(np.abs(feeds[n]).max()) for n in "qv"} | {"kt": float(np.abs(feeds["k"]).max())}
    quantize_attention(model, "int8", amax)
    onnx.checker.check_model(model, full_check=True)
    after = check_attention_fusion(model)
    assert after.passed == 1 and after.blocks[0].rules == dict.fromkeys(
        ("qdq", "no_cast", "head_size", "sequence", "scale"), True)
    assert not any(n.op_type == "Div" for n in model.graph.node)
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    cosine = float((out * ref).sum() / np.linalg.norm(out) / np.linalg.norm(ref))
    assert cosine > 0.99 and np.abs(out - ref).max() < 0.1 * np.abs(ref).max()


def test_the_check_names_a_long_sequence_and_float32_fp8_scales():
    """601 tokens: past INT8's 512 (NVIDIA/TensorRT#3724), within FP8's 3072; an FP8 block whose scales are
    float32 breaks the FP16-scale rule."""
    from onnx import TensorProto, helper

    shape = [1, 2, 601, 64]
    nodes = [helper.make_node("Mul", ["q", "scale"], ["qs"], name="scale_q"),
             helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["qs", "kt"], ["s"], name="qk"),
             helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["o"], name="pv")]

    def graph() -> onnx.ModelProto:
        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv"]
        g = helper.make_graph(nodes, "long", inputs, [helper.make_tensor_value_info("o", TensorProto.FLOAT, shape)],
                              [onnx.numpy_helper.from_array(np.array(0.125, np.float32), "scale")])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])

    amax = {"qs": 1.0, "kt": 1.0, "v": 1.0}
    int8 = graph()
    quantize_attention(int8, "int8", amax)
    fusion = check_attention_fusion(int8)
    assert fusion.blocks[0].broken == "sequence" and fusion.blocks[0].sequence == 601
    assert "breaks \"sequence length at most 512\": the sequence length is 601" in fusion.summary()
    fp8 = graph()
    quantize_attention(fp8, "fp8", amax)
    assert check_attention_fusion(fp8).passed == 1
    for init in fp8.graph.initializer:  # scales back to float32
        if init.data_type == TensorProto.FLOAT16 and init.name.endswith("_scale"):
            init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init).astype(np.float32), init.name))
    fusion = check_attention_fusion(fp8)
    assert fusion.blocks[0].broken == "fp16_scales" and "has a float32 scale" in fusion.blocks[0].why


def test_auto_falls_back_to_float_attention_with_the_reason(tmp_path, calib):
    """257 tokens attending alike: every Softmax output is 1/257, under half of INT8's fixed step of 1/127,
    so INT8 attention rounds it all to zero. ``auto`` keeps attention float and says why."""
    import torch

    from vitdeploy import save_model
    from vitdeploy.checkpoints import resolve

    model = resolve(_tiny(tmp_path, 32, 2, layers=1, image=256, patch=16, qkv_bias=False), None).model
    with torch.no_grad():
        for layer in model.vit.encoder.layer:
            layer.attention.attention.query.weight.zero_()
            layer.attention.attention.value.weight.mul_(30)  # attention's output dominates the residual
    save_model(model, tmp_path / "uniform.safetensors")
    report = _export(tmp_path / "uniform.safetensors", tmp_path / "u.onnx", "int8", "auto", calib)
    note = next(n for n in report.notes if n.startswith("attention:"))
    assert note.startswith("attention: float (int8 attention failed the accuracy check: int8 ONNX disagrees")
    assert report.qdq["attention_quantized"] == 0 and report.golden.passed
    with pytest.raises(VitDeployError, match="disagrees with torch beyond tolerance"):
        _export(tmp_path / "uniform.safetensors", tmp_path / "forced.onnx", "int8", "int8", calib)


def test_auto_quantizes_attention_where_it_passes(tmp_path, calib):
    report = _export(_tiny(tmp_path, 32, 2), tmp_path / "a.onnx", "int8", "auto", calib)
    assert report.qdq["attention_quantized"] == 2
    assert any(n.startswith("attention: int8 Q/DQ on 2 blocks") for n in report.notes)
    nv = _export(_tiny(tmp_path, 32, 2), tmp_path / "nv.onnx", "int8", "auto", calib, verify=False)
    assert nv.qdq["attention_quantized"] == 0 and any("--no-verify skips the accuracy check" in n for n in nv.notes)


@pytest.mark.parametrize("args,message", [
    (["--precision", "fp8", "--attention", "int8"], "--attention int8 needs --precision int8"),
    (["--precision", "fp32", "--attention", "fp8"], "--attention fp8 needs --precision fp8"),
    (["--precision", "int8", "--attention", "int4"], "Invalid value for '--attention'"),
])
def test_cli_refuses_an_attention_that_does_not_fit(tmp_path, calib, args, message):
    r = CliRunner().invoke(main, ["export", "-m", "tiny", "-o", str(tmp_path / "x.onnx"), "--calib-dir", str(calib),
                                  *args])
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.onnx").exists()


def test_inspect_reports_the_fusion_check(int8_graph):
    info = inspect_artifact(int8_graph)
    assert info["attention"]["passed"] == 2 and info["qdq"]["attention_quantized"] == 2
    r = CliRunner().invoke(main, ["inspect", str(int8_graph)])
    assert r.exit_code == 0 and "attention: 2/2 blocks meet TensorRT's INT8 fused-attention rules" in r.output


@pytest.fixture(scope="module")
def digits_attention(digits, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("digits_attention")
    out = {}
    for precision in ("int8", "fp8"):
        report = export_onnx(digits["checkpoint"], root / f"{precision}.onnx", options=ExportOptions(
            dynamic_batch=True, precision=precision, attention=precision, calib_dir=digits["train"],
            calib_samples=200))
        assert report.golden.passed and report.qdq["attention_quantized"] == 2
        out[precision] = report.path
    return out


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_digits_accuracy_with_quantized_attention(digits, digits_onnx, digits_attention, precision):
    """Within 0.5 points of FP32's top-1 and at least 99% top-1 agreement with it, on the held-out digits."""
    import onnxruntime
    from packaging.version import Version

    from vitdeploy.engines import open_runtime
    from vitdeploy.errors import VitDeployError
    from vitdeploy.evaluate import evaluate_folder

    fp32 = evaluate_folder(open_runtime(digits_onnx["fp32"]), digits["test"])
    try:
        runtime = open_runtime(digits_attention[precision])
    except VitDeployError as e:
        # ONNX Runtime 1.21 (the floor) refuses the FP16 graph with FP8 Q/DQ around attention as an invalid model;
        # 1.32 runs it. The issue asks for FP8 accuracy "where ONNX Runtime runs it".
        if precision == "fp8" and Version(onnxruntime.__version__) < Version("1.32"):
            pytest.skip(f"onnxruntime {onnxruntime.__version__} cannot load FP8 attention: {e}")
        raise
    quantized = evaluate_folder(runtime, digits["test"])
    agreement = float(np.mean(np.array(quantized.predictions) == np.array(fp32.predictions)))
    assert abs(quantized.accuracy - fp32.accuracy) <= 0.005 and agreement >= 0.99, (fp32, quantized, agreement)
    assert check_attention_fusion(onnx.load(str(digits_attention[precision]))).passed == 2


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_vit_b16_twelve_of_twelve_blocks(tmp_path, calib, precision):
    """ViT-B/16 (random weights, seed 0): all 12 attention blocks meet the INT8 / FP8 rules."""
    report = export_onnx("vit-base-patch16-224", tmp_path / "b16.onnx", options=ExportOptions(
        precision=precision, attention=precision, calib_dir=calib, calib_samples=8, seed=0, verify=False))
    fusion = check_attention_fusion(onnx.load(str(report.path), load_external_data=False))
    assert (fusion.precision, fusion.passed, len(fusion.blocks)) == (precision, 12, 12), fusion.summary()
    assert {b.head_size for b in fusion.blocks} == {64} and fusion.blocks[0].sequence == 197


def _fused_attention_layers(layers: object) -> list[str]:
    """Names of the engine inspector's layers that are fused attention kernels (TensorRT names them after
    MHA / fMHA / attention; an unfused block shows two MatMuls and a Softmax instead)."""
    entries = layers.get("Layers", []) if isinstance(layers, dict) else []
    out = []
    for layer in entries:
        text = layer if isinstance(layer, str) else " ".join(str(layer.get(k, "")) for k in ("Name", "LayerType",
                                                                                            "Metadata", "TacticName"))
        if any(word in text.lower() for word in ("mha", "attention", "fmha")):
            out.append(text[:160])
    return out


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.slow
def test_gpu_engines_fuse_quantized_attention(tmp_path, calib):
    """On a GPU: ViT-B/16 INT8 and FP8 engines with and without attention Q/DQ; the inspector's layer list
    shows one fused attention layer per block for the Q/DQ layout; latency against FP16 at batch 1 and 64
    is printed (run with -s), never asserted."""
    import importlib.util

    from vitdeploy.bench import measure
    from vitdeploy.engines import open_runtime
    from vitdeploy.engines.tensorrt.build import BuildOptions, build_engine, current_gpu
    from vitdeploy.engines.tensorrt.runtime import engine_layers

    gpu = current_gpu()
    if gpu is None:
        pytest.skip("needs an NVIDIA GPU with CUDA (none found): the engines are built and run on it")
    if not any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx")):
        pytest.skip("needs TensorRT or TensorRT-RTX (pip install 'vitdeploy[tensorrt]' or '[tensorrt-rtx]')")
    sm = int(gpu[1].removeprefix("sm"))
    variants = [("fp16", "float"), ("int8", "float"), ("int8", "int8")]
    variants += [("fp8", "float"), ("fp8", "fp8")] if sm >= 89 else []  # FP8 needs Ada or later
    results: dict[str, dict[int, float]] = {}
    for precision, attention in variants:
        name = f"{precision}-{attention}"
        onnx_path = export_onnx("vit-base-patch16-224", tmp_path / f"{name}.onnx", options=ExportOptions(
            precision=precision, attention=attention if precision != "fp16" else "auto", dynamic_batch=True,
            calib_dir=calib if precision != "fp16" else None, calib_samples=12, seed=0, verify=False)).path
        engine = tmp_path / f"{name}.engine"
        try:
            build_engine(onnx_path, engine, BuildOptions(min_batch=1, opt_batch=64, max_batch=64,
                                                         profiling_verbosity="detailed"))
            layers = engine_layers(engine)
        except VitDeployError as e:
            pytest.skip(f"this GPU ({gpu[0]}, {gpu[1]}) cannot build or run the engine here: {e}")
        fused = _fused_attention_layers(layers)
        if attention in ("int8", "fp8"):
            assert check_attention_fusion(onnx.load(str(onnx_path), load_external_data=False)).passed == 12
            assert len(fused) == 12, (name, fused, layers)
        with open_runtime(engine) as rt:
            results[name] = {b: measure(rt, b, warmup=5, iters=20).latency_ms.median for b in (1, 64)}
        print(f"{gpu[0]} {name}: fused attention layers {len(fused)}; median ms at batch 1 "
              f"{results[name][1]:.3f}, batch 64 {results[name][64]:.3f}")
    for name, ms in results.items():
        print(f"{name}: " + ", ".join(f"batch {b}: {results['fp16-float'][b] / ms[b]:.2f}x FP16" for b in (1, 64)))


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_tensorrt_builds_the_layout_and_build_prints_the_check(tmp_path, calib, precision):
    """TensorRT-RTX parses and builds both layouts ahead of time for Ada (sm89) without a GPU, and `build`
    prints the static check's summary first."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX not installed: pip install 'vitdeploy[tensorrt-rtx]'")
    _export(_tiny(tmp_path, 64, 2), tmp_path / "m.onnx", precision, precision, calib)
    r = CliRunner().invoke(main, ["build", str(tmp_path / "m.onnx"), "--compute-capability", "sm89",
                                  "-o", str(tmp_path / "m.engine")])
    assert r.exit_code == 0, r.output
    assert f"attention: 2/2 blocks meet TensorRT's {precision.upper()} fused-attention rules" in r.output
    assert (tmp_path / "m.engine").stat().st_size > 0
