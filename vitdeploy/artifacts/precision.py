"""An ONNX graph's real number format, read from the graph itself, never from the metadata it carries:
what the golden check's tolerance is based on (issue 29), and what ``build`` records for an engine
(a strongly typed engine computes in its ONNX's types)."""

from __future__ import annotations

from typing import Any

from vitdeploy.artifacts.golden import LOSSINESS

# Integer kernels ONNX Runtime's quantizer writes without Q/DQ nodes
_INTEGER_OPS = {"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "DynamicQuantizeLinear",
                "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention", "QGemm"}


def _format_of(data_type: int) -> str:
    """An ONNX element type -> the number format it stores (fp32 for full-precision and non-float types)."""
    from onnx import TensorProto as T

    if data_type in (T.FLOAT16,):
        return "fp16"
    if data_type in (T.BFLOAT16,):
        return "bf16"
    if data_type in (T.INT8, T.UINT8, T.INT16, T.UINT16):
        return "int8"
    narrow = {getattr(T, n) for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "INT4",
                                       "UINT4", "FLOAT4E2M1") if hasattr(T, n)}
    return "fp8" if data_type in narrow else "fp32"


def graph_precision(model: Any) -> str:
    """The lossiest number format an ONNX graph computes in, read from the graph itself (never from its
    metadata): Q/DQ nodes by the type of their quantized tensors (int8, fp8), integer kernels (int8),
    float16 or bfloat16 weights, constants, casts or inputs (fp16, bf16); fp32 otherwise."""
    from onnx import TensorProto as T

    g = model.graph
    halves = (T.FLOAT16, T.BFLOAT16)
    nodes, needed = _live(g)
    types = {t.name: t.data_type for t in g.initializer}
    used = [t for n, t in types.items() if n in needed]
    used += [v.type.tensor_type.elem_type for v in [*g.input, *g.output] if v.name in needed]
    found = {"fp32"}
    for node in nodes:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and "value" in attrs:
            types[node.output[0]] = attrs["value"].t.data_type
            used.append(attrs["value"].t.data_type)
        elif node.op_type == "Cast" and "to" in attrs:
            used.append(attrs["to"].i)
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            # the quantized side: the zero point's type, a DQ's stored input, Q's output_dtype; else uint8
            names = [*node.input[2:3], *(node.input[:1] if node.op_type == "DequantizeLinear" else [])]
            quantized = [types[n] for n in names if n in types] + (
                [attrs["output_dtype"].i] if "output_dtype" in attrs else [])
            found |= {f for f in map(_format_of, quantized) if f in ("int8", "fp8")} or {"int8"}
        elif node.op_type in _INTEGER_OPS:
            found.add("int8")
    found |= {_format_of(t) for t in used if t in halves}
    return max(found, key=LOSSINESS.index)


def _live(graph: Any) -> tuple[list[Any], set[str]]:
    """The nodes the graph's outputs depend on, and the tensor names they read: a node or an initializer that
    feeds no output (a dead Q/DQ, an unused float16 constant) computes nothing, so it says nothing of the
    precision (it would only loosen the golden check's tolerance)."""
    needed = {v.name for v in graph.output}
    live = []
    for node in reversed(graph.node):  # ONNX keeps nodes in topological order
        if any(name in needed for name in node.output):
            live.append(node)
            needed.update(name for name in node.input if name)
    return live[::-1], needed
