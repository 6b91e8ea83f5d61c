"""ONNX -> ONNX precision passes with maintained tools.

- FP16: onnxconverter-common's ``convert_float_to_float16`` (the converter ONNX Runtime's own
  transformer tools use), LayerNormalization kept float32 (it overflows in FP16 in large
  transformers; TensorRT issues 2564/3101) with Casts around it.
- INT8 / FP8: onnxruntime.quantization ``quantize_static`` in QDQ format: symmetric per-channel
  weights, symmetric per-tensor activations, the linear MatMul/Gemm layers quantized (see
  :func:`float_nodes` for what stays float), biases left float
  (an INT32 bias DequantizeLinear is refused by TensorRT's parser), one Q/DQ pair per consumer, none
  on a linear layer's output.
  FP8 scales are amax / 448 (per tensor, weights and activations; TensorRT's and ModelOpt's FP8 recipe),
  not ONNX Runtime's own, which matches the tensor's standard deviation to E4M3's and so saturates
  everything beyond 4.5 standard deviations: the outlier channels of a trained transformer's
  activations (:func:`fp8_weight_scales`, :func:`rescale_fp8_activations`).
  Chosen over NVIDIA ModelOpt because it is already a dependency (ONNX Runtime verifies every
  artifact), runs on the CPU without pulling onnxruntime-gpu, and its output is the Q/DQ layout
  TensorRT's explicit-quantization path consumes (checked by building it with TensorRT-RTX).

Export picks a precision's pass from :data:`PRECISION_STEPS`: one entry per precision, each a
:class:`PrecisionStep` whose ``run`` takes a :class:`PrecisionJob` (the FP32 graph) and gives back a
:class:`PrecisionResult`. Adding a precision to export is one entry there; the checks hold it to its
tolerances (``vitdeploy.metrics.TOLERANCES``, and the golden set's in ``vitdeploy.artifacts.golden``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.errors import VitDeployError

FP16_KEEP_FP32 = ("LayerNormalization",)
# ONNX Runtime's histogram calibrators (entropy, percentile) keep every calibrated tensor of every image
# in memory until the end: their images are capped so that this stays under this many bytes
HISTOGRAM_BUDGET_BYTES = 6 << 30
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
CALIB_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def to_fp16(model: Any, keep_io_types: bool = True, keep_fp32_ops: tuple[str, ...] = FP16_KEEP_FP32) -> Any:
    """FP32 ``onnx.ModelProto`` -> FP16 weights and compute; ``keep_io_types`` leaves I/O float32.
    A uint8 input's preprocessing (Cast, and the Reshape, Transpose, Reshape that cut out its patches) stays
    float32: see :func:`input_prefix`."""
    import onnxscript.optimizer
    from onnxconverter_common import float16

    # the converter warns once per weight it clamps to 1e-07; the caller's warning filters decide
    converted = float16.convert_float_to_float16(
        model, keep_io_types=keep_io_types, op_block_list=list(keep_fp32_ops), node_block_list=input_prefix(model),
        disable_shape_infer=False,
    )
    # the converter casts the kept ops' FP16 weights back to FP32 at run time: fold those Casts
    return onnxscript.optimizer.optimize(converted, input_size_limit=1 << 34, output_size_limit=1 << 34)


def input_prefix(model: Any) -> list[str]:
    """Names of the nodes between a non-float graph input and the first Conv/MatMul: the in-graph
    preprocessing of a ``--uint8-input`` model (empty for a float input)."""
    import onnx

    graph_in = model.graph.input[0]
    if graph_in.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
        return []
    reached, names = {graph_in.name}, []
    for node in model.graph.node:  # topologically sorted
        if node.op_type in ("Conv", "MatMul", "Gemm"):
            break
        if any(i in reached for i in node.input):
            reached.update(node.output)
            names.append(node.name)
    return names


def calibration_batches(files: list[Path], preprocess: Callable[[Path], np.ndarray], batch: int | None,
                        progress: bool = False) -> Iterator[np.ndarray]:
    """Preprocessed calibration inputs; ``batch`` None (dynamic axis) feeds one image at a time."""
    size = batch or 1
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), desc="calibrating", unit="img", leave=False)
    chunk: list[np.ndarray] = []
    for f in files:
        chunk.append(preprocess(f))
        if bar is not None:
            bar.update(1)
        if len(chunk) == size:
            yield np.stack(chunk)
            chunk = []
    if chunk:  # a static batch is topped up by repeating the last image
        chunk += [chunk[-1]] * (size - len(chunk))
        yield np.stack(chunk)
    if bar is not None:
        bar.close()


def float_nodes(model: Any) -> list[str]:
    """Nodes left unquantized:

    - attention's products (Q·Kᵀ and P·V: MatMuls between two activations, and those of
      :func:`vitdeploy.exporters.attention.find_attention`, whose Q may be a constant), as ModelOpt's
      ``--disable_mha_qdq`` does: no Q/DQ lands on Softmax here; the attention pass puts attention's own;
    - the patch embedding on raw pixels, whose input range is the image's, unlike the transformer's
      (no accuracy figure is claimed for this choice: see the README): the Conv, or for a uint8 input
      the MatMul that projects the patches its in-graph preprocessing cut out (:func:`input_prefix`).
    """
    from vitdeploy.exporters.attention import find_attention

    weights = {i.name for i in model.graph.initializer}
    weights |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    attention = [n.name for n in model.graph.node
                 if n.op_type == "MatMul" and not any(i in weights for i in n.input)]
    # a pooling head's Q·Kᵀ with a constant Q (SigLIP's probe) is attention too, not a linear layer
    attention += [name for b in find_attention(model) for name in (b.qk, b.pv) if name not in attention]
    prefix = set(input_prefix(model))
    pixels = {o for n in model.graph.node if n.name in prefix for o in n.output}
    projection = [n.name for n in model.graph.node
                  if n.op_type in ("MatMul", "Gemm") and any(i in pixels for i in n.input)]
    return attention + projection + [n.name for n in model.graph.node if n.op_type == "Conv"]


def quantize(model_path: Path, output_path: Path, input_name: str, batches: Iterator[np.ndarray],
             precision: str = "int8", method: str = "minmax", external_data: bool = False) -> None:
    """Static Q/DQ quantization of an FP32 ONNX file, calibrated on ``batches``; attention stays float
    (:func:`float_nodes`: :mod:`vitdeploy.exporters.attention` quantizes it afterwards)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class _Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(batches, None)
            return None if x is None else {input_name: x}

    if precision == "fp8":
        # ONNX Runtime calibrates float8 only from activation distributions
        qtype, calib, per_channel = QuantType.QFLOAT8E4M3FN, CalibrationMethod.Distribution, False
    else:
        qtype, calib, per_channel = QuantType.QInt8, getattr(CalibrationMethod, CALIB_METHODS[method]), True
    extra = {
        "QuantizeBias": False,
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "DedicatedQDQPair": True,
        "CalibMovingAverage": False,
        # Q/DQ on the inputs of a linear layer only, as ModelOpt places them: no Q/DQ between the
        # MatMul and its bias Add (nor on the logits), which costs accuracy and TensorRT's bias fusion
        "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
    }
    if method == "percentile":
        extra["CalibPercentile"] = 99.99
    model = onnx.load(str(model_path), load_external_data=False)
    exclude = float_nodes(model)
    if precision == "fp8":
        extra["TensorQuantOverrides"] = fp8_weight_scales(model_path, exclude)
    # what the quantizer logs or prints goes where the caller's logging and stdout send it
    try:
        quantize_static(
            str(model_path), str(output_path), _Reader(), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS), per_channel=per_channel, activation_type=qtype,
            weight_type=qtype, calibrate_method=calib, use_external_data_format=external_data,
            extra_options=extra, calibration_providers=["CPUExecutionProvider"], nodes_to_exclude=exclude,
        )
    except ImportError as e:
        raise VitDeployError(mismatched_quantizer(e)) from e


def histogram_bytes_per_image(model_path: Path) -> int:
    """What ONNX Runtime's histogram calibrators keep per image of the graph at ``model_path``: every float
    input and output of its MatMul/Gemm/Conv nodes (shapes from ONNX shape inference; batch taken as 1)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path), load_external_data=False))
    shapes = {v.name: v.type.tensor_type for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    weights = {i.name for i in model.graph.initializer}
    names = {t for n in model.graph.node if n.op_type in QUANTIZED_OPS for t in [*n.input, *n.output]} - weights
    total = 0
    for name in names:
        tt = shapes.get(name)
        if tt is None or tt.elem_type != onnx.TensorProto.FLOAT:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        total += 4 * int(np.prod(dims[1:] if dims else [1]))
    return total


def quantized_linear(model: Any, exclude: list[str]) -> list[Any]:
    """The MatMul/Gemm nodes :func:`quantize` quantizes: a weight as their second input, not in ``exclude``."""
    weights = {i.name for i in model.graph.initializer}
    skip = set(exclude)
    return [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.name not in skip
            and len(n.input) > 1 and n.input[1] in weights and n.input[0] not in weights]


def linear_inputs(model_path: Path) -> tuple[str, ...]:
    """The activations that the quantized linear layers of the FP32 graph at ``model_path`` read."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return tuple(sorted({n.input[0] for n in quantized_linear(model, float_nodes(model))}))


def fp8_weight_scales(model_path: Path, exclude: list[str]) -> dict[str, list[dict[str, Any]]]:
    """ONNX Runtime ``TensorQuantOverrides`` giving each quantized weight the FP8 scale max |w| / 448."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path), load_external_data=True)
    wanted = {n.input[1] for n in quantized_linear(model, exclude)}
    overrides: dict[str, list[dict[str, Any]]] = {}
    for init in model.graph.initializer:
        if init.name in wanted:
            amax = float(np.max(np.abs(numpy_helper.to_array(init))))
            scale = np.array(amax / 448.0 if amax > 0 else 1.0, dtype=np.float32)
            overrides[init.name] = [{"scale": scale, "zero_point": np.array(0, dtype=np.float32)}]
    return overrides


def rescale_fp8_activations(model: Any, amax: dict[str, float]) -> int:
    """Give every FP8 QuantizeLinear of an activation in ``amax`` (and its DequantizeLinear) the scale
    amax / 448, in place; -> how many scales changed."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    changed: set[str] = set()
    for q in model.graph.node:
        if q.op_type != "QuantizeLinear" or amax.get(q.input[0], 0.0) <= 0 or q.input[1] not in inits:
            continue
        scale_names = {q.input[1]} | {d.input[1] for d in consumers.get(q.output[0], [])
                                      if d.op_type == "DequantizeLinear"}
        for name in scale_names & inits.keys():
            old = numpy_helper.to_array(inits[name])
            new = numpy_helper.from_array(np.array(amax[q.input[0]] / 448.0, dtype=old.dtype), name)
            inits[name].CopyFrom(new)
            changed.add(name)
    return len(changed)


def mismatched_quantizer(error: ImportError) -> str:
    """One line for an ONNX Runtime quantizer that imports from an onnx that no longer has it
    (onnxruntime 1.23's FP8 path imports ``float8e4m3_to_float32``, which onnx 1.23 removed)."""
    import onnx
    import onnxruntime

    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    quoted = text.split("'")
    name = quoted[1] if text.startswith("cannot import name") and len(quoted) > 1 else text
    return (f"onnxruntime {onnxruntime.__version__}'s quantizer cannot import {name} from onnx {onnx.__version__} "
            "(removed there): install the onnx/onnxruntime pair that pyproject declares, e.g. a newer onnxruntime "
            "or an older onnx")


def qdq_coverage(model: Any) -> dict[str, int]:
    """How many ops with weights (MatMul/Gemm/Conv) read quantized weights and activations, and how many
    attention blocks have Q/DQ on all four inputs of their two products."""
    producers = {out: n for n in model.graph.node for out in n.output}
    weights = {i.name for i in model.graph.initializer}

    def is_weight(name: str) -> bool:
        node = producers.get(name)
        return name in weights or (node is not None and node.op_type == "DequantizeLinear"
                                   and node.input[0] in weights)

    def dq(name: str) -> bool:
        node = producers.get(name)
        return node is not None and node.op_type == "DequantizeLinear"

    total = quantized = 0
    for n in model.graph.node:
        if n.op_type in QUANTIZED_OPS and len(n.input) > 1 and is_weight(n.input[1]):
            total += 1
            quantized += dq(n.input[0]) and dq(n.input[1])
    from vitdeploy.exporters.attention import find_attention

    nodes = {n.name: n for n in model.graph.node}
    blocks = find_attention(model)
    attention = sum(dq(nodes[b.qk].input[0]) and dq(nodes[b.qk].input[1]) and dq(nodes[b.pv].input[0])
                    and dq(nodes[b.pv].input[1]) for b in blocks)
    return {"quantizable": total, "quantized": quantized, "attention_blocks": len(blocks),
            "attention_quantized": attention,
            "q_nodes": sum(n.op_type == "QuantizeLinear" for n in model.graph.node),
            "dq_nodes": sum(n.op_type == "DequantizeLinear" for n in model.graph.node)}


@dataclass
class PrecisionJob:
    """What a precision step starts from: the FP32 graph as ``proto``, or, when it is over 2 GB (``large``),
    only on disk at ``fp32_path``; ``output`` is where a step that writes its own file (Q/DQ) writes it."""
    precision: str
    proto: Any | None
    fp32_path: Path
    output: Path
    large: bool
    input_name: str
    external_data_bytes: int
    fp16_io: bool = False  # FP16 inputs and outputs too (default: they stay float32)
    calib_method: str = "minmax"
    calibration: Iterator[np.ndarray] | None = None  # batches in the form the graph takes
    attention: str = "float"  # float | int8 | fp8: Q/DQ on attention (vitdeploy.exporters.attention)


@dataclass
class PrecisionResult:
    proto: Any  # the graph in the target precision (weights external, not loaded, when ``large``)
    large: bool  # its weights go to external data
    qdq: dict[str, int] | None = None  # Q/DQ coverage (:func:`qdq_coverage`) of a quantized graph
    notes: list[str] = field(default_factory=list)  # what the step chose, for the export report


@dataclass(frozen=True)
class PrecisionStep:
    """One precision: its pass, and what export must know before running it."""
    run: Callable[[PrecisionJob], PrecisionResult]
    calibrated: bool = False  # needs calibration images (``--calib-dir``), and is verified on them
    min_opset: int = 0  # exported at least at this opset ...
    opset_reason: str = ""  # ... because it needs this


def _keep_fp32(job: PrecisionJob) -> PrecisionResult:
    import onnx

    proto = job.proto if job.proto is not None else onnx.load(str(job.fp32_path), load_external_data=True)
    return PrecisionResult(proto, job.large)


def _half(job: PrecisionJob) -> PrecisionResult:
    import onnx

    # FP16 halves the weights: ViT-H's proto fits under 2 GB again
    proto = to_fp16(job.proto if job.proto is not None else onnx.load(str(job.fp32_path)),
                    keep_io_types=not job.fp16_io)
    return PrecisionResult(proto, proto.ByteSize() > job.external_data_bytes)


def _qdq(job: PrecisionJob) -> PrecisionResult:
    """Calibrated static Q/DQ (:func:`quantize`) written to ``job.output``; with ``job.attention`` quantized,
    attention's Q/DQ too (:func:`vitdeploy.exporters.attention.quantize_attention`), Q/K/V calibrated on
    the same batches."""
    import onnx

    from vitdeploy.exporters.attention import AmaxObserver, quantize_attention

    if job.calibration is None:
        raise VitDeployError(f"--precision {job.precision} needs calibration images: give --calib-dir DIR")
    if job.proto is not None:
        onnx.save_model(job.proto, str(job.fp32_path))
    batches, observer, notes = job.calibration, None, []
    fp8 = job.precision == "fp8"
    if job.attention != "float" or fp8:
        observer = AmaxObserver(job.fp32_path, job.input_name, linear_inputs(job.fp32_path) if fp8 else ())
        batches = observer.observe(batches)
    if fp8:  # every FP8 scale is amax / 448 from the observer: ONNX Runtime's own calibration needs one batch
        batches = _first_of(batches)
    elif job.calib_method != "minmax":
        batches, note = _capped(batches, job.fp32_path)
        notes += [note] if note else []
    quantize(job.fp32_path, job.output, job.input_name, batches, job.precision, job.calib_method,
             external_data=job.large)
    proto = onnx.load(str(job.output), load_external_data=not job.large)
    if fp8 and observer is not None:
        rescale_fp8_activations(proto, observer.amax)
        notes.append("fp8 scales: amax / 448 per tensor (weights, and activations over the calibration images)")
    if observer is not None and job.attention != "float":
        blocks = quantize_attention(proto, job.attention, observer.amax)
        plural = "" if len(blocks) == 1 else "s"
        notes.append(f"attention: {job.attention} Q/DQ on {len(blocks)} block{plural} (Q·Kᵀ, Softmax output, P·V; "
                     f"TensorRT's fused-attention layout, see `vitdeploy inspect`)")
    return PrecisionResult(proto, job.large, qdq_coverage(proto), notes)


def _first_of(batches: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """Run ``batches`` to their end (an observer reads every one) and give only the first."""
    first = None
    for x in batches:
        first = x if first is None else first
    if first is not None:
        yield first


def _capped(batches: Iterator[np.ndarray], fp32_path: Path) -> tuple[Iterator[np.ndarray], str]:
    """At most as many images as ONNX Runtime's histogram calibrators hold in HISTOGRAM_BUDGET_BYTES."""
    per_image = max(histogram_bytes_per_image(fp32_path), 1)
    cap = max(1, HISTOGRAM_BUDGET_BYTES // per_image)
    kept: list[np.ndarray] = []
    seen = 0
    for x in batches:
        seen += len(x)
        if sum(len(k) for k in kept) + len(x) <= cap or not kept:
            kept.append(x)
    used = sum(len(k) for k in kept)
    if used >= seen:
        return iter(kept), ""
    return iter(kept), (f"calibration histograms on the first {used} of {seen} images: ONNX Runtime keeps every "
                        f"calibrated tensor of every image ({per_image / 2**20:.0f} MiB each here) in memory "
                        f"until the end; --calib-method minmax has no such limit")


PRECISION_STEPS: dict[str, PrecisionStep] = {
    "fp32": PrecisionStep(_keep_fp32),
    "fp16": PrecisionStep(_half),
    "int8": PrecisionStep(_qdq, calibrated=True),
    "fp8": PrecisionStep(_qdq, calibrated=True, min_opset=19, opset_reason="float8 Q/DQ"),
}
