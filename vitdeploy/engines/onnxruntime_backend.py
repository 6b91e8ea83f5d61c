"""ONNX Runtime backend: CPU by default; CUDA and TensorRT execution providers when present."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.engines.base import InputSpec, Runtime
from vitdeploy.errors import VitDeployError
from vitdeploy.exporters.metadata import PREFIX, ArtifactMetadata

_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}
DYNAMIC_MAX_BATCH = 256  # larger requests to a dynamic-batch artifact are split to bound memory


def choose_providers(device: str = "auto", engine_cache: str | None = None) -> list[Any]:
    """TensorRT, then CUDA, then CPU, as far as this onnxruntime build and ``device`` allow."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers: list[Any] = []
    if device in ("auto", "cuda", "tensorrt"):
        if "TensorrtExecutionProvider" in available and device != "cuda":
            opts = {"trt_engine_cache_enable": bool(engine_cache)}
            if engine_cache:
                opts["trt_engine_cache_path"] = engine_cache
                opts["trt_timing_cache_enable"] = True
            providers.append(("TensorrtExecutionProvider", opts))
        if "CUDAExecutionProvider" in available:
            providers.append("CUDAExecutionProvider")
        if device in ("cuda", "tensorrt") and not providers:
            raise VitDeployError(
                f"--device {device}: this onnxruntime has no GPU providers ({', '.join(available)}); "
                "pip install onnxruntime-gpu"
            )
    providers.append("CPUExecutionProvider")
    return providers


def default_threads() -> int:
    """Physical-ish core count; ONNX Runtime's own default also spins on hyper-threads."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


class OnnxRuntime(Runtime):
    backend = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None,
                 optimization: str = "all", engine_cache: str | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = threads or default_threads()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        self.threads = so.intra_op_num_threads
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=choose_providers(device, engine_cache))
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise VitDeployError(f"ONNX Runtime cannot load {self.path}: {first}") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        dims = inp.shape
        if len(dims) < 2 or any(not isinstance(d, int) for d in dims[1:]):
            raise VitDeployError(f"{self.path}: input {inp.name} needs static non-batch dims, got {dims}")
        lo, hi = (dims[0], dims[0]) if isinstance(dims[0], int) else (1, DYNAMIC_MAX_BATCH)
        self.spec = InputSpec(inp.name, _DTYPES.get(inp.type, "float32"), tuple(dims[1:]), lo, hi)
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata = ArtifactMetadata.from_props(props) if any(k.startswith(PREFIX) for k in props) else None

    def describe(self) -> str:
        provider = self.session.get_providers()[0].replace("ExecutionProvider", "")
        precision = self.metadata.precision if self.metadata else "?"
        return f"onnxruntime[{provider}, {self.threads} threads] {self.path.name} ({precision})"

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]
