"""What an artifact is: ONNX metadata, ops and Q/DQ coverage; an engine's sidecar, I/O and layers.

(Named ``inspection``, not ``inspect``, so that it does not shadow the standard library's module.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitdeploy.errors import VitDeployError
from vitdeploy.io import onnx_external_data


def inspect_artifact(path: str | Path) -> dict[str, Any]:
    from vitdeploy.engines import artifact_kind

    path = Path(path)
    kind = artifact_kind(path)
    if kind == "onnx":
        return inspect_onnx(path)
    if kind == "engine":
        return inspect_engine(path)
    raise VitDeployError(f"{path}: inspect reads .onnx files and TensorRT engines")


def inspect_onnx(path: Path) -> dict[str, Any]:
    import onnx

    from vitdeploy.artifacts.metadata import PREFIX, ArtifactMetadata
    from vitdeploy.exporters.onnx_export import histogram
    from vitdeploy.exporters.precision import qdq_coverage
    from vitdeploy.io import load_onnx_graph

    model = load_onnx_graph(path)

    def shape(vi: Any) -> list[Any]:
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    onnx_external_data(model, path.parent)  # a location outside the file's folder is refused here
    props = {p.key: p.value for p in model.metadata_props}
    # no vitdeploy metadata: None; metadata that is there but invalid: its one-line error
    meta = ArtifactMetadata.from_props(props).to_dict() if any(k.startswith(PREFIX) for k in props) else None
    qdq = qdq_coverage(model)
    fusion = check_attention_fusion(model)
    ort_cpu = _onnxruntime_cpu(path, model) if qdq["q_nodes"] else None
    return {
        "path": str(path), "kind": "onnx", "bytes": path.stat().st_size,
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "inputs": [{"name": i.name, "shape": shape(i), "dtype": onnx.helper.tensor_dtype_to_np_dtype(
            i.type.tensor_type.elem_type).name} for i in model.graph.input],
        "outputs": [{"name": o.name, "shape": shape(o)} for o in model.graph.output],
        "nodes": len(model.graph.node), "ops": histogram(model), "qdq": qdq,
        **({"attention": fusion.to_dict()} if fusion.blocks else {}),
        **({"onnxruntime_cpu": ort_cpu} if ort_cpu else {}), "model": meta,
    }


def _onnxruntime_cpu(path: Path, model: Any) -> dict[str, Any] | None:
    """Weighted ops ONNX Runtime's CPU provider runs as integer kernels, as written and as uint8."""
    import copy
    import importlib.util

    import onnx

    if importlib.util.find_spec("onnxruntime") is None or path.stat().st_size > 2**31 - 1:
        return None
    from vitdeploy.engines.onnxruntime_backend import cpu_kernel_report, qdq_activations_to_uint8

    if any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer):
        return None
    try:
        report: dict[str, Any] = {"as_written": cpu_kernel_report(model)}
        as_uint8 = copy.deepcopy(model)
        if qdq_activations_to_uint8(as_uint8):
            report["qdq_as_uint8"] = cpu_kernel_report(as_uint8)
    except Exception:  # a model ONNX Runtime cannot load: the runtime commands say why
        return None
    return report


def inspect_engine(path: Path) -> dict[str, Any]:
    from vitdeploy.engines.tensorrt.build import current_gpu
    from vitdeploy.engines.tensorrt.sidecar import EngineSidecar

    side = EngineSidecar.read(path)
    info: dict[str, Any] = {
        "path": str(path), "kind": "engine", "bytes": path.stat().st_size,
        "flavour": side.flavour, "trt_version": side.trt_version, "targets": side.targets,
        "precision": side.precision, "io": [vars(t) for t in side.io], "profile": side.profile,
        "onnx_sha256": side.onnx_sha256, "engine_sha256": side.engine_sha256, "build_seconds": side.build_seconds,
        "verification": (side.verification or {}).get("summary") or (side.verification or {}).get("reason"),
        "model": side.model,
    }
    gpu = current_gpu()
    if gpu is None:
        info["layers"] = "needs a GPU (the engine inspector deserializes the engine)"
        return info
    from vitdeploy.engines.tensorrt.runtime import engine_layers

    try:
        info["layers"] = engine_layers(path)
    except VitDeployError as e:  # e.g. a TensorRT-RTX engine on a GPU it cannot run on
        info["layers"] = f"not available here: {e}"
    return info


# TensorRT's fused-attention rules, per precision of the attention's Q/DQ (TensorRT developer guide,
# "Fused Attention"; NVIDIA/TensorRT#3724: no INT8 fusion past 512 tokens; TensorRT 10.6 release notes:
# FP8 attention fusion on Ada for sequences up to 3072 and head sizes up to 64; Model-Optimizer PR #1289)
FUSION_RULES = {
    "qdq": "Q/DQ on Q and K before Q·Kᵀ, on the Softmax output and on V before P·V",
    "no_cast": "no Cast between Q/DQ and MatMul",
    "head_size": "head size {sizes}",
    "sequence": "sequence length at most {seq}",
    "scale": "the attention scale on Q or K before Q·Kᵀ (nothing but a mask Add between Q·Kᵀ and Softmax)",
    "fp16_scales": "FP16 Q/DQ scales (FP8)",
}
FUSION_LIMITS: dict[str, dict[str, Any]] = {
    "int8": {"sizes": (16, 32, 64), "seq": 512},
    "fp8": {"sizes": (16, 32, 64), "seq": 3072},
    "float": {"sizes": tuple(range(16, 257, 8)), "seq": None},
}


@dataclass
class BlockFusion:
    """One attention block against the rules: each rule's verdict (in order) and the first broken, with why."""
    index: int
    qk: str  # the Q·Kᵀ MatMul's node name
    head_size: int | None
    sequence: int | None
    rules: dict[str, bool]
    broken: str | None = None  # the first rule broken
    why: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "qk": self.qk, "head_size": self.head_size, "sequence": self.sequence,
                "rules": self.rules, "broken": self.broken, "why": self.why}


@dataclass
class AttentionFusion:
    """Every attention block of a graph checked against TensorRT's fused-attention rules for ``precision``."""
    precision: str  # int8 | fp8 (of the attention's Q/DQ) | float (no Q/DQ on attention)
    blocks: list[BlockFusion]

    @property
    def passed(self) -> int:
        return sum(b.broken is None for b in self.blocks)

    def summary(self) -> str:
        head = (f"attention: {self.passed}/{len(self.blocks)} blocks meet TensorRT's "
                f"{self.precision.upper() if self.precision != 'float' else 'float'} fused-attention rules")
        first = next((b for b in self.blocks if b.broken), None)
        if first is None:
            return head
        rule = rule_text(first.broken, self.precision)
        return f"{head}; block {first.index} ({first.qk}) breaks \"{rule}\": {first.why}"

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "passed": self.passed, "blocks": [b.to_dict() for b in self.blocks],
                "summary": self.summary()}


def rule_text(rule: str | None, precision: str) -> str:
    limits = FUSION_LIMITS[precision]
    sizes = limits["sizes"]
    size_text = ", ".join(map(str, sizes)) if len(sizes) < 5 else f"{sizes[0]}-{sizes[-1]}, a multiple of 8"
    return FUSION_RULES.get(rule or "", "").format(sizes=size_text, seq=limits["seq"])


def check_attention_fusion(model: Any, precision: str | None = None) -> AttentionFusion:
    """Each attention block (MatMul -> Mul/Add -> Softmax -> MatMul) of ``model`` against TensorRT's
    fused-attention rules for ``precision`` (default: the attention's own Q/DQ type, float without any)."""
    import onnx

    from vitdeploy.exporters.attention import Graph, find_attention

    blocks = find_attention(model)
    g = Graph(model.graph)
    precision = precision or _attention_precision(g, blocks)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
                  for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    except Exception:  # an unusual graph: the shape rules say "unknown"
        shapes = {}
    return AttentionFusion(precision, [_check_block(i, b, g, shapes, precision) for i, b in enumerate(blocks)])


def _attention_precision(g: Any, blocks: list[Any]) -> str:
    import onnx

    for b in blocks:
        for node, slot in ((b.qk, 0), (b.qk, 1), (b.pv, 0), (b.pv, 1)):
            _, passed = g.above(g.nodes[node].input[slot])
            for n in passed:
                if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in g.initializers:
                    zp = g.initializers[n.input[2]].data_type
                    return "fp8" if zp == onnx.TensorProto.FLOAT8E4M3FN else "int8"
    return "float"


def _check_block(index: int, b: Any, g: Any, shapes: dict[str, list[Any]], precision: str) -> BlockFusion:
    q_shape, k_shape = shapes.get(b.q) or [], shapes.get(b.k) or []
    head = q_shape[-1] if q_shape else None
    seq = max((d for d in (q_shape[-2:-1] + k_shape[-1:]) if d), default=None) if k_shape else None
    result = BlockFusion(index, b.qk, head, seq, {})
    checks = [("qdq", lambda: _qdq_rule(b, g)), ("no_cast", lambda: _cast_rule(b, g)),
              ("head_size", lambda: _head_rule(head, precision)), ("sequence", lambda: _seq_rule(seq, precision)),
              ("scale", lambda: _scale_rule(b, g))]
    if precision == "fp8":
        checks.append(("fp16_scales", lambda: _fp16_rule(b, g)))
    for rule, check in checks:
        if rule in ("qdq", "no_cast") and precision == "float":
            continue
        why = check()
        result.rules[rule] = not why
        if why and result.broken is None:
            result.broken, result.why = rule, why
    return result


def _inputs(b: Any) -> list[tuple[str, str, int]]:
    return [("Q", b.qk, 0), ("K", b.qk, 1), ("the Softmax output", b.pv, 0), ("V", b.pv, 1)]


def _qdq_rule(b: Any, g: Any) -> str:
    for what, node, slot in _inputs(b):
        _, passed = g.above(g.nodes[node].input[slot])
        ops = [n.op_type for n in passed if n.op_type != "Cast"]
        if ops[:2] != ["DequantizeLinear", "QuantizeLinear"]:
            return f"{what} reaches {node} without a QuantizeLinear -> DequantizeLinear pair"
    return ""


def _cast_rule(b: Any, g: Any) -> str:
    for what, node, slot in _inputs(b):
        _, passed = g.above(g.nodes[node].input[slot])
        for n in passed:
            if n.op_type == "QuantizeLinear":
                break
            if n.op_type == "Cast":
                return f"Cast {n.name} sits between {what}'s Q/DQ and {node}"
    return ""


def _head_rule(head: int | None, precision: str) -> str:
    if head is None:
        return "the head size is unknown (no shape inferred for Q)"
    return "" if head in FUSION_LIMITS[precision]["sizes"] else f"the head size is {head}"


def _seq_rule(seq: int | None, precision: str) -> str:
    limit = FUSION_LIMITS[precision]["seq"]
    if limit is None:
        return ""
    if seq is None:
        return "the sequence length is unknown (no shape inferred for K)"
    return "" if seq <= limit else f"the sequence length is {seq}"


def _scale_rule(b: Any, g: Any) -> str:
    for name in b.between:
        node = g.nodes[name]
        value = g.constant(node.input[1]) if len(node.input) > 1 else None
        if node.op_type in ("Mul", "Div") and value is not None and value.size == 1:
            return f"{node.op_type} {name} scales Q·Kᵀ's output instead of Q or K"
    if g.constant(b.q) is not None:
        return ""  # a constant Q (a pooling head's probe): the export folded the scale into it
    for tensor in (b.q, b.k):
        _, passed = g.above(tensor, ("Transpose", "Cast"))
        node = g.producer.get(passed[-1].input[0] if passed else tensor)
        if node is not None and node.op_type == "Mul" and any(
                (v := g.constant(i)) is not None and v.size == 1 for i in node.input):
            return ""
    return "neither Q nor K is multiplied by a scalar before Q·Kᵀ"


def _fp16_rule(b: Any, g: Any) -> str:
    import onnx

    for what, node, slot in _inputs(b):
        _, passed = g.above(g.nodes[node].input[slot])
        for n in passed:
            scale = g.initializers.get(n.input[1]) if n.op_type in ("QuantizeLinear", "DequantizeLinear") else None
            if scale is not None and scale.data_type != onnx.TensorProto.FLOAT16:
                return f"{what}'s {n.op_type} {n.name} has a float32 scale"
    return ""


def attention_summary(path: str | Path) -> str:
    """One line for ``build``: the static fused-attention check of the ONNX at ``path``."""
    try:
        fusion = check_attention_fusion(load_onnx_graph_checked(Path(path)))
    except VitDeployError as e:
        return f"attention: not checked ({e})"
    if not fusion.blocks:
        return "attention: no MatMul -> Softmax -> MatMul block found"
    return fusion.summary()


def load_onnx_graph_checked(path: Path) -> Any:
    """The graph of the ONNX at ``path`` without its external weights, its external-data paths checked."""
    from vitdeploy.io import load_onnx_graph

    model = load_onnx_graph(path)
    onnx_external_data(model, path.parent)
    return model
