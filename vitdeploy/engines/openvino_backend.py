"""OpenVINO backend (optional extra): runs the same ONNX files on Intel and AMD CPUs.

FP32 or its bf16 inference-precision hint; an INT8 Q/DQ ONNX runs as INT8 (OpenVINO folds the
Q/DQ pairs into low-precision kernels). ``hint="LATENCY"`` runs a batch as one request on all
threads; ``hint="THROUGHPUT"`` lets OpenVINO split the threads into streams, and a batch of a
dynamic-batch model is then split across them and run in parallel (an AsyncInferQueue).

Attention: OpenVINO's CPU plugin runs MatMul -> Softmax -> MatMul as one subgraph; with Q/DQ on both
products (``vitdeploy export --attention int8``) that subgraph runs in int8 (its runtime model says so:
:meth:`OpenVinoRuntime.attention_precisions`). ``attention="float"`` drops the attention's Q/DQ when the
model is read, so ``tune`` can time the same file both ways and keep the faster.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.artifacts.metadata import ArtifactMetadata, NoMetadataError, read_onnx_metadata
from vitdeploy.engines.base import InputSpec, Runtime
from vitdeploy.engines.onnxruntime_backend import DYNAMIC_MAX_BATCH
from vitdeploy.errors import VitDeployError
from vitdeploy.io import check_onnx_external_data
from vitdeploy.sysinfo import usable_cpus


class OpenVinoRuntime(Runtime):
    backend = "openvino"

    def __init__(self, path: str | Path, precision_hint: str = "f32", threads: int | None = None,
                 hint: str = "LATENCY", device: str = "CPU", attention: str = "as_written") -> None:
        try:
            import openvino as ov
        except ImportError:
            raise VitDeployError("the OpenVINO backend needs openvino: pip install 'vitdeploy[openvino]'") from None
        self.path = Path(path)
        check_onnx_external_data(self.path)  # refuses external data outside the file's folder, naming the tensor
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
        except Exception as e:
            raise VitDeployError(f"OpenVINO cannot read {self.path}: {str(e).splitlines()[0]}") from None
        if attention not in ("as_written", "float"):
            raise VitDeployError(f"OpenVINO attention {attention!r}: choose as_written or float")
        self.attention = attention
        self.attention_qdq_dropped = drop_attention_qdq(model) if attention == "float" else 0
        self._softmax = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Softmax"]
        if hint not in ("LATENCY", "THROUGHPUT"):
            raise VitDeployError(f"OpenVINO hint {hint!r}: choose LATENCY or THROUGHPUT")
        if precision_hint not in ("f32", "bf16", "f16"):
            raise VitDeployError(f"OpenVINO precision hint {precision_hint!r}: choose f32, bf16 or f16")
        self.threads = threads or usable_cpus()
        self.precision_hint = precision_hint
        self.hint = hint
        self.where = "cpu"
        config: dict[str, Any] = {"PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": self.threads,
                                  "INFERENCE_PRECISION_HINT": precision_hint}
        try:
            self.compiled = core.compile_model(model, device, config)
        except Exception as e:
            raise VitDeployError(f"OpenVINO cannot compile {self.path}: {str(e).strip().splitlines()[0]}") from None
        self.streams = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")) if hint == "THROUGHPUT" \
            else 1
        self._local = threading.local()
        port = self.compiled.input(0)
        pshape = port.get_partial_shape()
        dims = [d.get_length() if d.is_static else -1 for d in pshape]
        lo, hi = (dims[0], dims[0]) if dims[0] > 0 else (1, DYNAMIC_MAX_BATCH)
        dtype = {ov.Type.f16: "float16", ov.Type.u8: "uint8"}.get(port.get_element_type(), "float32")
        self.spec = InputSpec(port.get_any_name(), dtype, tuple(dims[1:]), lo, hi)
        self.output_name = self.compiled.output(0).get_any_name()  # the graph's: logits, embeddings, ...
        try:
            self.metadata: ArtifactMetadata | None = read_onnx_metadata(self.path)
        except NoMetadataError:  # a plain ONNX runs; invalid metadata is refused (its one-line error)
            self.metadata = None

    def describe(self) -> str:
        precision = self.metadata.precision if self.metadata else "?"
        mode = f", {self.streams} streams" if self.hint == "THROUGHPUT" else ""
        attention = sorted({t for p in self.attention_precisions() for t in p.split(",")})
        mode += f", attention in {'+'.join(attention)}" if attention else ""
        mode += " (its Q/DQ dropped)" if self.attention_qdq_dropped else ""
        return f"openvino[CPU, {self.precision_hint}, {self.threads} threads{mode}] {self.path.name} ({precision})"

    def attention_precisions(self) -> list[str]:
        """Per compiled node that runs one of the model's Softmaxes (OpenVINO's fused attention subgraph where
        it built one), the element types of its inputs (Q, K, V), e.g. ``i8,i8,i8`` where attention runs in
        int8, ``i8,i8,bf16`` where V is not quantized."""
        out = []
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            rt = op.get_rt_info()
            names = rt["originalLayersNames"].astype(str).split(",") if "originalLayersNames" in rt else []
            if any(n in names for n in self._softmax):
                out.append(",".join(op.input(i).get_element_type().get_type_name()
                                    for i in range(op.get_input_size())))
        return out

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self.streams > 1 and batch.shape[0] > 1 and not self.spec.static:
            return self._run_streams(batch)
        return self._run_one(batch)

    def _run_streams(self, batch: np.ndarray) -> np.ndarray:
        """One chunk per stream, run in parallel; one queue per calling thread."""
        import openvino as ov

        queue = getattr(self._local, "queue", None)
        if queue is None:
            queue = self._local.queue = ov.AsyncInferQueue(self.compiled, self.streams)
        chunks = np.array_split(batch, min(self.streams, batch.shape[0]))
        outs: list[np.ndarray | None] = [None] * len(chunks)

        def done(request: Any, i: int) -> None:
            outs[i] = np.array(request.get_output_tensor(0).data)

        queue.set_callback(done)
        for i, chunk in enumerate(chunks):
            queue.start_async({0: np.ascontiguousarray(chunk)}, i)
        queue.wait_all()
        return np.concatenate(outs)  # type: ignore[arg-type]

    def _run_one(self, batch: np.ndarray) -> np.ndarray:
        # one infer request per thread keeps infer() safe from several threads
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        request.infer({0: batch})
        return np.array(request.get_output_tensor(0).data)


_DEQUANTIZE = ("Multiply", "Subtract", "Convert")  # a DequantizeLinear as OpenVINO's ONNX reader writes it


def _is_constant(value: Any) -> bool:
    """A Constant, or a Constant behind Converts and Reshapes (a zero point or scale as read)."""
    node = value.get_node()
    while node.get_type_name() in ("Convert", "Reshape"):
        node = node.input_value(0).get_node()
    return bool(node.get_type_name() == "Constant")


def _above_dequantize(value: Any) -> tuple[Any, Any]:
    """From a MatMul input up through a dequantization (ops with a Constant second input, and Converts) ->
    (the FakeQuantize reached or None, the value where the walk stopped)."""
    node = value.get_node()
    while node.get_type_name() in _DEQUANTIZE:
        if node.get_input_size() > 1 and not _is_constant(node.input_value(1)):
            break
        value = node.input_value(0)
        node = value.get_node()
    return (node if node.get_type_name() == "FakeQuantize" else None), value


def drop_attention_qdq(model: Any) -> int:
    """Attention's products (MatMuls with no constant input) read their inputs before the Q/DQ (a
    FakeQuantize and its dequantization in OpenVINO's graph); -> the number of inputs changed."""
    changed = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        ups = [_above_dequantize(op.input_value(i)) for i in range(2)]
        if any(_is_constant(v) for _, v in ups):
            continue  # a linear layer: its weight is a constant
        for i, (fq, _) in enumerate(ups):
            if fq is not None:
                op.input(i).replace_source_output(fq.input_value(0))
                changed += 1
    if changed:
        model.validate_nodes_and_infer_types()
    return changed
