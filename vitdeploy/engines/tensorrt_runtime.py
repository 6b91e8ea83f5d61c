"""TensorRT runtime (full TensorRT or TensorRT-RTX) behind the Runtime interface.

One execution context on one stream; device buffers allocated once for the profile's maximum
batch and reused; pinned host buffers and async copies; optional CUDA-graph capture per batch
size; torch CUDA tensors run zero-copy through :meth:`TensorRTRuntime.infer_torch`. With
TensorRT-RTX the JIT runtime cache is saved beside the engine (``.rtcache``) so kernels compile once.
Calls are serialised by a lock (one context is not re-entrant): open one runtime per stream for
concurrency.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.engines.base import InputSpec, Runtime
from vitdeploy.errors import VitDeployError
from vitdeploy.exporters.metadata import ArtifactMetadata

_NP = {"float": np.float32, "float32": np.float32, "half": np.float16, "float16": np.float16,
       "int8": np.int8, "int32": np.int32, "int64": np.int64, "bf16": np.float32}


def _enum_name(value: Any) -> str:
    """'TensorIOMode.INPUT' -> 'input', 'DataType.HALF' -> 'half' (pybind enums print as Type.NAME)."""
    return str(value).rsplit(".", 1)[-1].lower()


def check_compatible(side: dict[str, Any], trt_module: str, trt_version: str, gpu: tuple[str, str] | None) -> None:
    """Refuse an engine built by another TensorRT or for another GPU, saying how to rebuild."""
    rebuild = f"rebuild with `vitdeploy build {side.get('onnx', {}).get('path', 'MODEL.onnx')}`"
    if side["flavour"] != trt_module:
        raise VitDeployError(f"engine built with {side['flavour']} {side['trt_version']}; this machine has "
                             f"{trt_module} {trt_version}: {rebuild}")
    opts = side.get("options", {})
    same = side["trt_version"] == trt_version
    if not same and not (opts.get("version_compatible") and trt_version >= side["trt_version"]):
        raise VitDeployError(f"engine built with {side['flavour']} {side['trt_version']}; this is {trt_version}: "
                             f"{rebuild} (or build with --version-compatible)")
    if gpu is None:
        raise VitDeployError("running a TensorRT engine needs an NVIDIA GPU; none is visible here")
    if opts.get("hardware_compat") == "ampere+":
        if int(gpu[1][2:]) < 80:
            raise VitDeployError(f"engine built for Ampere and newer; this GPU is {gpu[0]} ({gpu[1]}): {rebuild}")
        return
    if gpu[1] not in side["targets"]:
        raise VitDeployError(f"engine built for {', '.join(side['targets'])}; this GPU is {gpu[0]} ({gpu[1]}): "
                             f"{rebuild}" + (f" --compute-capability {gpu[1]}" if trt_module == "tensorrt_rtx" else ""))


class TensorRTRuntime(Runtime):
    backend = "tensorrt"

    def __init__(self, path: str | Path, cuda_graph: bool = False, memory: str = "auto",
                 runtime_cache: bool = True) -> None:
        from vitdeploy.engines.cuda_memory import device_memory
        from vitdeploy.engines.tensorrt_build import _Logger, current_gpu, import_tensorrt
        from vitdeploy.inspect import read_sidecar

        self.path = Path(path)
        side = read_sidecar(self.path)
        flavour = "rtx" if side.get("flavour") == "tensorrt_rtx" else "tensorrt"
        trt, name = import_tensorrt(flavour)
        self.trt = trt
        check_compatible(side, name, trt.__version__, current_gpu())
        self.side = side
        self.cuda = device_memory(memory)
        self._log = _Logger(trt)
        self.runtime = trt.Runtime(self._log.logger)
        engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise VitDeployError(f"TensorRT could not load {self.path} ({'; '.join(self._log.errors) or 'corrupt'}): "
                                 "rebuild it with `vitdeploy build`")
        self.engine = engine
        self.cache_path = self.path.with_suffix(".rtcache")
        self.runtime_cache = None
        if name == "tensorrt_rtx" and runtime_cache:
            rconfig = engine.create_runtime_config()
            self.runtime_cache = rconfig.create_runtime_cache()
            if self.cache_path.is_file():
                self.runtime_cache.deserialize(self.cache_path.read_bytes())
            rconfig.set_runtime_cache(self.runtime_cache)
            self.context = engine.create_execution_context(rconfig)
        else:
            self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        modes = {n: _enum_name(engine.get_tensor_mode(n)) for n in names}
        self.input_name = next(n for n in names if modes[n] == "input")
        self.output_name = next(n for n in names if modes[n] == "output")
        lo, _, hi = (list(s) for s in engine.get_tensor_profile_shape(self.input_name, 0))
        in_dtype = np.dtype(_NP[_enum_name(engine.get_tensor_dtype(self.input_name))])
        out_dtype = np.dtype(_NP[_enum_name(engine.get_tensor_dtype(self.output_name))])
        out_shape = list(engine.get_tensor_shape(self.output_name))
        self.num_labels = out_shape[-1]
        self.spec = InputSpec(self.input_name, in_dtype.name, tuple(hi[1:]), lo[0], hi[0])
        self.metadata = ArtifactMetadata.from_dict(side["model"]) if side.get("model") else None
        self.stream = self.cuda.stream()
        self.d_in = self.cuda.malloc(int(np.prod(hi)) * in_dtype.itemsize)
        self.d_out = self.cuda.malloc(hi[0] * self.num_labels * out_dtype.itemsize)
        self.h_in = self.cuda.pinned(tuple(hi), in_dtype)
        self.h_out = self.cuda.pinned((hi[0], self.num_labels), out_dtype)
        self.context.set_tensor_address(self.input_name, self.d_in)
        self.context.set_tensor_address(self.output_name, self.d_out)
        self.use_graph = cuda_graph
        self.graphs: dict[int, Any] = {}
        self.lock = threading.Lock()
        self.last_timing: dict[str, float] = {}
        self._events = [self.cuda.event() for _ in range(4)]

    def describe(self) -> str:
        graph = ", cuda graph" if self.use_graph else ""
        return (f"tensorrt[{self.side['flavour']} {self.trt.__version__}{graph}] {self.path.name} "
                f"({self.side.get('precision')})")

    def _enqueue(self, n: int) -> None:
        if self.use_graph:
            graph = self.graphs.get(n)
            if graph is None:
                # one plain enqueue first (TensorRT's lazy setup must not be captured), then capture
                if not self.context.execute_async_v3(self.stream):
                    raise VitDeployError("TensorRT enqueue failed")
                self.cuda.sync(self.stream)
                self.cuda.begin_capture(self.stream)
                self.context.execute_async_v3(self.stream)
                graph = self.graphs[n] = self.cuda.end_capture(self.stream)
            self.cuda.launch(graph, self.stream)
        elif not self.context.execute_async_v3(self.stream):
            raise VitDeployError(f"TensorRT enqueue failed: {'; '.join(self._log.errors[-3:])}")

    def _run(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        with self.lock:
            h_in = self.h_in[:n]
            np.copyto(h_in, batch)
            e0, e1, e2, e3 = self._events
            self.context.set_input_shape(self.input_name, batch.shape)
            self.cuda.record(e0, self.stream)
            self.cuda.htod(self.d_in, h_in, self.stream)
            self.cuda.record(e1, self.stream)
            self._enqueue(n)
            self.cuda.record(e2, self.stream)
            h_out = self.h_out[:n]
            self.cuda.dtoh(h_out, self.d_out, self.stream)
            self.cuda.record(e3, self.stream)
            self.cuda.sync(self.stream)
            self.last_timing = {"h2d_ms": self.cuda.elapsed_ms(e0, e1), "compute_ms": self.cuda.elapsed_ms(e1, e2),
                                "d2h_ms": self.cuda.elapsed_ms(e2, e3)}
            return h_out.astype(np.float32, copy=True)

    def infer_torch(self, x: Any) -> Any:
        """A torch CUDA tensor in, a torch CUDA tensor out: no host copies (zero-copy addresses)."""
        import torch

        if not x.is_cuda:
            raise VitDeployError("infer_torch takes a CUDA tensor; use infer() for host data")
        x = x.contiguous().to(getattr(torch, self.spec.dtype))
        if x.shape[0] > self.spec.max_batch or x.shape[0] < self.spec.min_batch:
            raise VitDeployError(f"batch {x.shape[0]} is outside the engine's profile "
                                 f"{self.spec.min_batch}..{self.spec.max_batch}")
        out = torch.empty((x.shape[0], self.num_labels), dtype=torch.float32 if self.h_out.dtype == np.float32
                          else torch.float16, device=x.device)
        stream = torch.cuda.current_stream(x.device).cuda_stream
        with self.lock:
            self.context.set_input_shape(self.input_name, tuple(x.shape))
            self.context.set_tensor_address(self.input_name, x.data_ptr())
            self.context.set_tensor_address(self.output_name, out.data_ptr())
            try:
                if not self.context.execute_async_v3(stream):
                    raise VitDeployError("TensorRT enqueue failed")
            finally:
                self.context.set_tensor_address(self.input_name, self.d_in)
                self.context.set_tensor_address(self.output_name, self.d_out)
        return out

    def close(self) -> None:
        if self.runtime_cache is not None:
            from vitdeploy.io import atomic_write_bytes

            atomic_write_bytes(self.cache_path, bytes(memoryview(self.runtime_cache.serialize())))
            self.runtime_cache = None
        if getattr(self, "d_in", None):
            self.cuda.free(self.d_in)
            self.cuda.free(self.d_out)
            self.cuda.free_pinned()
            self.d_in = self.d_out = 0


def engine_layers(path: Path, side: dict[str, Any]) -> Any:
    """The engine inspector's per-layer JSON (precisions, tactics); needs a GPU to deserialize."""
    import json

    rt = TensorRTRuntime(path, runtime_cache=False)
    try:
        inspector = rt.engine.create_engine_inspector()
        inspector.execution_context = rt.context
        return json.loads(inspector.get_engine_information(rt.trt.LayerInformationFormat.JSON))
    finally:
        rt.close()
