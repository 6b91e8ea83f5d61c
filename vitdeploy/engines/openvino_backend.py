"""OpenVINO backend (optional extra): runs the same ONNX files on Intel and AMD CPUs.

FP32 or its bf16 inference-precision hint; an INT8 Q/DQ ONNX runs as INT8 (OpenVINO folds the
Q/DQ pairs into low-precision kernels).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.engines.base import InputSpec, Runtime
from vitdeploy.engines.onnxruntime_backend import DYNAMIC_MAX_BATCH, default_threads
from vitdeploy.errors import VitDeployError
from vitdeploy.exporters.metadata import ArtifactMetadata, read_onnx_metadata


class OpenVinoRuntime(Runtime):
    backend = "openvino"

    def __init__(self, path: str | Path, precision_hint: str = "f32", threads: int | None = None,
                 hint: str = "LATENCY", device: str = "CPU") -> None:
        try:
            import openvino as ov
        except ImportError:
            raise VitDeployError("the OpenVINO backend needs openvino: pip install 'vitdeploy[openvino]'") from None
        self.path = Path(path)
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
        except Exception as e:
            raise VitDeployError(f"OpenVINO cannot read {self.path}: {str(e).splitlines()[0]}") from None
        self.threads = threads or default_threads()
        self.precision_hint = precision_hint
        config: dict[str, Any] = {"PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": self.threads,
                                  "INFERENCE_PRECISION_HINT": precision_hint}
        self.compiled = core.compile_model(model, device, config)
        self._local = threading.local()
        port = self.compiled.input(0)
        pshape = port.get_partial_shape()
        dims = [d.get_length() if d.is_static else -1 for d in pshape]
        lo, hi = (dims[0], dims[0]) if dims[0] > 0 else (1, DYNAMIC_MAX_BATCH)
        dtype = {ov.Type.f16: "float16", ov.Type.u8: "uint8"}.get(port.get_element_type(), "float32")
        self.spec = InputSpec(port.get_any_name(), dtype, tuple(dims[1:]), lo, hi)
        try:
            self.metadata: ArtifactMetadata | None = read_onnx_metadata(self.path)
        except VitDeployError:
            self.metadata = None

    def describe(self) -> str:
        precision = self.metadata.precision if self.metadata else "?"
        return f"openvino[CPU, {self.precision_hint}, {self.threads} threads] {self.path.name} ({precision})"

    def _run(self, batch: np.ndarray) -> np.ndarray:
        # one infer request per thread keeps infer() safe from several threads
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        request.infer({0: batch})
        return np.array(request.get_output_tensor(0).data)
