"""Attention in INT8 / FP8: Q/DQ on both attention products and the Softmax output, in the layout
TensorRT fuses into one attention kernel.

Pattern-based, so it serves every family that exports plain attention: a ``MatMul`` (Q·Kᵀ), at most a
few ``Mul``/``Div``/``Add`` nodes (scale, mask), a ``Softmax``, and a ``MatMul`` that reads the Softmax
output as its first input (P·V). A pooling head's attention with a 1-token query is the same pattern.

The layout (TensorRT developer guide, "Fused Attention"; NVIDIA/TensorRT#3724; Model-Optimizer PR #1289):

- a QuantizeLinear -> DequantizeLinear pair on Q and K before Q·Kᵀ, on the Softmax output and on V before
  P·V; each DequantizeLinear feeds its MatMul directly (no Cast, no Transpose in between);
- the attention scale on Q, above Q's QuantizeLinear (a scalar scale found between Q·Kᵀ and Softmax,
  HF's eager form, is moved there), so Q's calibrated range is the scaled one;
- the Softmax output's scale fixed: 1/127 for INT8 (its range is [0, 1]), 1/448 for FP8 (E4M3's largest value);
- FP8: scales in FP16 (opset 19 or later) and the attention products in FP16 between a Cast to FP16 above
  the QuantizeLinears and a Cast back to float32 after P·V.

Q, K and V are calibrated here (max |x| over the calibration batches, read on ONNX Runtime beside
onnxruntime.quantization's own calibration of the linear layers, see :class:`AmaxObserver`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.errors import VitDeployError

ATTENTION_MODES = ("auto", "float", "int8", "fp8")
SOFTMAX_SCALE = {"int8": 1.0 / 127.0, "fp8": 1.0 / 448.0}
QMAX = {"int8": 127.0, "fp8": 448.0}
BETWEEN_OPS = ("Mul", "Div", "Add")  # scale and mask between Q·Kᵀ and Softmax
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "Cast")


@dataclass(frozen=True)
class AttentionBlock:
    """One attention: its nodes and the float tensors that enter its products (above any Q/DQ)."""
    qk: str  # the Q·Kᵀ MatMul's node name
    softmax: str
    pv: str  # the P·V MatMul's node name
    q: str
    k: str
    v: str
    between: tuple[str, ...]  # node names between Q·Kᵀ and Softmax, in order


class Graph:
    """Producer and consumer lookups over a ``GraphProto`` (rebuilt after each edit)."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.refresh()

    def refresh(self) -> None:
        self.nodes = {n.name: n for n in self.graph.node}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.initializers = {i.name: i for i in self.graph.initializer}

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a Constant node's output, else None."""
        import onnx

        if name in self.initializers:
            return onnx.numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return onnx.numpy_helper.to_array(a.t)
        return None

    def above(self, tensor: str, ops: tuple[str, ...] = QDQ_OPS) -> tuple[str, list[Any]]:
        """Walk up from ``tensor`` through ``ops`` (first input) -> (tensor reached, nodes passed, nearest first)."""
        passed = []
        node = self.producer.get(tensor)
        while node is not None and node.op_type in ops:
            passed.append(node)
            tensor = node.input[0]
            node = self.producer.get(tensor)
        return tensor, passed


def _is_activation(g: Graph, tensor: str) -> bool:
    source, _ = g.above(tensor)
    return g.constant(source) is None


def find_attention(model: Any) -> list[AttentionBlock]:
    """Every MatMul -> (Mul/Div/Add)* -> Softmax -> MatMul in ``model`` (Q/DQ and Casts looked through),
    in graph order. Q may be a constant (SigLIP's pooling head: one learned query, its projection and the
    scale folded into one constant at export); K and V are activations."""
    g = Graph(model.graph)
    blocks = []
    for sm in model.graph.node:
        if sm.op_type != "Softmax":
            continue
        scores, passed = g.above(sm.input[0], QDQ_OPS + BETWEEN_OPS)
        qk = g.producer.get(scores)
        between = tuple(n.name for n in reversed(passed) if n.op_type in BETWEEN_OPS)
        # K is an activation; Q may be a constant: a pooling head's learned probe, projected and scaled at export
        if qk is None or qk.op_type != "MatMul" or not _is_activation(g, qk.input[1]):
            continue
        pv = _softmax_consumer(g, sm.output[0])
        if pv is None or not _is_activation(g, pv.input[1]):
            continue
        blocks.append(AttentionBlock(qk.name, sm.name, pv.name, g.above(qk.input[0])[0], g.above(qk.input[1])[0],
                                     g.above(pv.input[1])[0], between))
    return blocks


def _softmax_consumer(g: Graph, tensor: str) -> Any | None:
    """The MatMul reading ``tensor`` (through Q/DQ and Casts) as its first input, else None."""
    frontier = [tensor]
    while frontier:
        t = frontier.pop()
        for c in g.consumers.get(t, []):
            if c.op_type == "MatMul" and c.input[0] == t:
                return c
            if c.op_type in QDQ_OPS:
                frontier.append(c.output[0])
    return None


def resolve_attention(precision: str, attention: str, verify: bool) -> tuple[list[str], str]:
    """``--attention`` for ``precision`` -> (the modes to try in order, a note). ``auto`` tries quantized
    attention first and falls back to float when the accuracy check fails; without the check, float."""
    if attention not in ATTENTION_MODES:
        raise VitDeployError(f"unknown --attention {attention!r}: choose {', '.join(ATTENTION_MODES)}")
    quantized = precision in SOFTMAX_SCALE
    if attention in SOFTMAX_SCALE and attention != precision:
        raise VitDeployError(f"--attention {attention} needs --precision {attention} (this export is {precision}): "
                             f"give --attention {precision if quantized else 'float'} or --precision {attention}")
    if attention == "auto":
        if not quantized:
            return ["float"], ""
        if not verify:
            return ["float"], (f"attention: float (--no-verify skips the accuracy check that quantized attention "
                               f"needs; give --attention {precision} to quantize it anyway)")
        return [precision, "float"], ""
    return [attention if quantized else "float"], ""


class AmaxObserver:
    """max |x| of the attention inputs (Q after its scale, K, V), and of the ``extra`` tensors, over
    calibration batches, read on ONNX Runtime from the FP32 graph at ``fp32_path`` with those tensors added
    as outputs."""

    def __init__(self, fp32_path: Path, input_name: str, extra: tuple[str, ...] = ()) -> None:
        import onnx

        model = onnx.load(str(fp32_path), load_external_data=False)
        self.blocks = find_attention(model)
        self.input_name = input_name
        g = Graph(model.graph)
        attention = {t for b in self.blocks for t in (b.q, b.k, b.v) if g.constant(t) is None}
        self.tensors = sorted(attention | set(extra))
        self.amax = dict.fromkeys(self.tensors, 0.0)
        known = {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                                  for t in self.tensors if t not in known)
        # beside the FP32 file, so a large model's external weights resolve
        self.path = fp32_path.with_name(fp32_path.stem + ".attention-calib.onnx")
        onnx.save_model(model, str(self.path))
        self._session: Any = None

    def observe(self, batches: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        """Pass ``batches`` through, recording the attention inputs' ranges of each."""
        import onnxruntime as ort

        if self._session is None and self.tensors:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            self._session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        for x in batches:
            if self._session is not None:
                values = self._session.run(self.tensors, {self.input_name: x})
                for name, value in zip(self.tensors, values, strict=True):
                    self.amax[name] = max(self.amax[name], float(np.max(np.abs(value))))
            yield x


def quantize_attention(model: Any, precision: str, amax: dict[str, float]) -> list[AttentionBlock]:
    """Put ``precision``'s Q/DQ on every attention block of ``model`` (in place; its attention still float),
    with Q, K and V scaled from ``amax``; -> the blocks quantized."""
    blocks = find_attention(model)
    g = Graph(model.graph)
    fp8 = precision == "fp8"
    for b in blocks:
        constant_q = g.constant(b.q)
        q_range = float(np.abs(constant_q).max()) if constant_q is not None else amax.get(b.q, 0.0)
        q_amax = q_range * _move_scale(g, b)
        g.refresh()
        qk, pv, sm = g.nodes[b.qk], g.nodes[b.pv], g.nodes[b.softmax]
        edit = _Editor(model.graph, b.qk, precision)
        qk.input[0] = edit.qdq(qk.input[0], q_amax / QMAX[precision])
        qk.input[1] = edit.qdq(qk.input[1], amax.get(b.k, 0.0) / QMAX[precision])
        pv.input[1] = edit.qdq(pv.input[1], amax.get(b.v, 0.0) / QMAX[precision])
        pv.input[0] = edit.qdq(sm.output[0], SOFTMAX_SCALE[precision], cast=False)
        if fp8:
            _to_fp16(model.graph, g, b, pv, edit)
        model.graph.node.extend(edit.nodes)
        model.graph.initializer.extend(edit.initializers)
        g.refresh()
    _sort(model)
    return blocks


def _move_scale(g: Graph, b: AttentionBlock) -> float:
    """A scalar Mul/Div between Q·Kᵀ and Softmax (HF's eager form) moves onto Q, above Q's QuantizeLinear;
    -> the factor Q's calibrated range grows by (1 when nothing moved)."""
    import onnx

    for name in b.between:
        node = g.nodes[name]
        if node.op_type not in ("Mul", "Div") or len(node.input) != 2:
            continue
        value = g.constant(node.input[1])
        if value is None or value.size != 1:
            continue
        factor = float(value.reshape(()))
        factor = 1.0 / factor if node.op_type == "Div" else factor
        for c in g.consumers.get(node.output[0], []):  # bypass the node
            c.input[:] = [node.input[0] if i == node.output[0] else i for i in c.input]
        g.graph.node.remove(node)
        qk = g.nodes[b.qk]
        const = f"{b.qk}_attention_scale"
        g.graph.initializer.append(onnx.numpy_helper.from_array(np.array(factor, np.float32), const))
        scaled = f"{qk.input[0]}_scaled"
        g.graph.node.append(onnx.helper.make_node("Mul", [qk.input[0], const], [scaled], name=f"{b.qk}_scale_q"))
        qk.input[0] = scaled
        return abs(factor)
    return 1.0


class _Editor:
    """New Q/DQ nodes and scales for one block, named after its Q·Kᵀ node."""

    def __init__(self, graph: Any, prefix: str, precision: str) -> None:
        self.graph, self.prefix, self.precision = graph, prefix, precision
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.count = 0

    def qdq(self, tensor: str, scale: float, cast: bool = True) -> str:
        """A Q/DQ pair on ``tensor`` (for FP8 after a Cast to FP16 when ``cast``) -> the DequantizeLinear's output."""
        import onnx
        from onnx import TensorProto

        if not np.isfinite(scale):
            raise VitDeployError(f"attention input {tensor} overflowed in calibration (range {scale!r}): "
                                 "give --attention float")
        scale = scale if scale > 0 else 1.0 / QMAX[self.precision]  # never seen non-zero: any scale is exact
        self.count += 1
        tag = f"{self.prefix}_attn{self.count}"
        fp8 = self.precision == "fp8"
        if fp8 and cast:
            self.nodes.append(onnx.helper.make_node("Cast", [tensor], [f"{tag}_fp16"], name=f"{tag}_cast",
                                                    to=TensorProto.FLOAT16))
            tensor = f"{tag}_fp16"
        dtype = np.float16 if fp8 else np.float32
        self.initializers.append(onnx.numpy_helper.from_array(np.array(scale, dtype), f"{tag}_scale"))
        if fp8:
            zp = onnx.helper.make_tensor(f"{tag}_zero_point", TensorProto.FLOAT8E4M3FN, [], [0.0])
        else:
            zp = onnx.numpy_helper.from_array(np.array(0, np.int8), f"{tag}_zero_point")
        self.initializers.append(zp)
        ins = [f"{tag}_scale", f"{tag}_zero_point"]
        self.nodes += [
            onnx.helper.make_node("QuantizeLinear", [tensor, *ins], [f"{tag}_q"], name=f"{tag}_QuantizeLinear"),
            onnx.helper.make_node("DequantizeLinear", [f"{tag}_q", *ins], [f"{tag}_dq"],
                                  name=f"{tag}_DequantizeLinear"),
        ]
        return f"{tag}_dq"


def _to_fp16(graph: Any, g: Graph, b: AttentionBlock, pv: Any, edit: _Editor) -> None:
    """FP8: the products, Softmax and what lies between them compute in FP16 (the DequantizeLinears give
    FP16); constants between Q·Kᵀ and Softmax get FP16 copies, and P·V's output is cast back to float32."""
    import onnx
    from onnx import TensorProto

    for name in b.between:
        node = g.nodes.get(name)
        if node is None:
            continue
        for j, i in enumerate(node.input):
            value = g.constant(i)
            if value is not None:
                half = f"{i}_fp16_{name}"
                edit.initializers.append(onnx.numpy_helper.from_array(value.astype(np.float16), half))
                node.input[j] = half
    region = {g.nodes[b.qk].output[0], g.nodes[b.softmax].output[0], pv.output[0]}
    region |= {g.nodes[n].output[0] for n in b.between if n in g.nodes}
    kept = [vi for vi in graph.value_info if vi.name not in region]  # their float32 types are stale
    del graph.value_info[:]
    graph.value_info.extend(kept)
    out = pv.output[0]
    half_out = f"{out}_fp16"
    pv.output[0] = half_out
    edit.nodes.append(onnx.helper.make_node("Cast", [half_out], [out], name=f"{b.pv}_cast_fp32",
                                            to=TensorProto.FLOAT))


def _sort(model: Any) -> None:
    """Topological order of ``model.graph.node`` (new nodes were appended at the end)."""
    nodes = list(model.graph.node)
    ready = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    order: list[int] = []
    seen: set[int] = set()

    def visit(k: int) -> None:
        stack = [(k, False)]
        while stack:
            idx, done = stack.pop()
            if done:
                if idx not in seen:
                    seen.add(idx)
                    order.append(idx)
                continue
            if idx in seen:
                continue
            stack.append((idx, True))
            stack += [(producer[i], False) for i in nodes[idx].input
                      if i not in ready and i in producer and producer[i] not in seen]

    for k in range(len(nodes)):
        visit(k)
    del model.graph.node[:]
    model.graph.node.extend(nodes[k] for k in order)
