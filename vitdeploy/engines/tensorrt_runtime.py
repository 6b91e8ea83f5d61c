"""TensorRT runtime (full TensorRT or TensorRT-RTX) behind the Runtime interface.

One execution context on one stream (``self.stream``); device buffers allocated once for the
profile's maximum batch and reused; pinned host buffers and async copies; optional CUDA-graph
capture per batch size; torch CUDA tensors run zero-copy through :meth:`TensorRTRuntime.infer_torch`.
With TensorRT-RTX the JIT runtime cache is saved beside the engine (``.rtcache``) when the runtime
closes, so kernels compile once: use it as a context manager (``with open_runtime(...) as rt``).

Concurrency: every call that touches the execution context takes one lock and enqueues on
``self.stream`` only, so the context's executions (from :meth:`infer` and :meth:`infer_torch`, from
any thread) run one after another in the order the lock was taken, never overlapping on its scratch
memory. Open one runtime per stream for parallelism on one GPU.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vitdeploy.engines.base import InputSpec, Runtime
from vitdeploy.engines.sidecar import FLAVOUR_TITLES, TENSORRT_RTX, runs_on
from vitdeploy.errors import VitDeployError
from vitdeploy.exporters.metadata import ArtifactMetadata

if TYPE_CHECKING:
    from vitdeploy.engines.sidecar import EngineSidecar

# TensorRT DataType names -> numpy; BF16, FP8, INT4, FP4 I/O have no numpy type: refused by name
_NP = {"float": np.float32, "half": np.float16, "int8": np.int8, "uint8": np.uint8, "int32": np.int32,
       "int64": np.int64, "bool": np.bool_}


def _enum_name(value: Any) -> str:
    """'TensorIOMode.INPUT' -> 'input', 'DataType.HALF' -> 'half' (pybind enums print as Type.NAME)."""
    return str(value).rsplit(".", 1)[-1].lower()


def io_dtype(trt_name: str, tensor: str) -> np.dtype:
    """The numpy dtype of an engine I/O tensor, or a clear refusal (BF16 has no numpy type)."""
    try:
        return np.dtype(_NP[trt_name])
    except KeyError:
        raise VitDeployError(
            f"engine tensor {tensor!r} is {trt_name}: the TensorRT runtime takes float32, float16 or integer I/O; "
            "export with float32 (or float16) inputs and outputs and keep bf16 inside the graph") from None


def _version(text: str) -> Any:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(text)
    except InvalidVersion:
        return text


def check_compatible(side: EngineSidecar, trt_module: str, trt_version: str, gpu: tuple[str, str] | None) -> None:
    """Refuse an engine built by another TensorRT or for another GPU, with advice that can work."""
    source = side.onnx_path or "MODEL.onnx"
    rebuild = f"rebuild with `vitdeploy build {source}`"
    if side.flavour != trt_module:
        raise VitDeployError(f"engine built with {side.flavour} {side.trt_version}; this machine has "
                             f"{trt_module} {trt_version}: {rebuild}")
    built, here = _version(side.trt_version), _version(trt_version)
    if built != here:
        if not side.version_compatible:
            raise VitDeployError(f"engine built with {side.flavour} {side.trt_version}; this is {trt_version}: "
                                 f"{rebuild} (or build with --version-compatible)")
        if type(built) is not type(here) or here < built:
            raise VitDeployError(f"version-compatible engine built with {side.flavour} {side.trt_version} runs on "
                                 f"that version or later; this is {trt_version}: {rebuild}")
    if gpu is None:
        raise VitDeployError("running a TensorRT engine needs an NVIDIA GPU; none is visible here")
    name, cc = gpu
    if not runs_on(side.flavour, cc):
        raise VitDeployError(f"{FLAVOUR_TITLES[side.flavour]} cannot run on {cc} ({name}); build with full "
                             f"TensorRT: `vitdeploy build {source} --trt tensorrt` on this GPU")
    if side.hardware_compat == "ampere+":
        if int(cc[2:]) < 80:
            raise VitDeployError(f"engine built for Ampere and newer; this GPU is {name} ({cc}): "
                                 f"{rebuild} on this GPU without --hardware-compat")
        return
    if cc not in side.targets:
        advice = (f"{rebuild} --trt rtx --compute-capability {cc}" if side.flavour == TENSORRT_RTX
                  else f"{rebuild} --trt tensorrt on this GPU (or --hardware-compat ampere+ for portability)")
        raise VitDeployError(f"engine built for {', '.join(side.targets)}; this GPU is {name} ({cc}): {advice}")


class TensorRTRuntime(Runtime):
    backend = "tensorrt"
    where = "cuda"

    def __init__(self, path: str | Path, cuda_graph: bool = False, memory: str = "auto",
                 runtime_cache: bool = True) -> None:
        from vitdeploy.engines import cuda_memory
        from vitdeploy.engines import tensorrt_build as tb
        from vitdeploy.engines.sidecar import EngineSidecar, runtime_cache_path

        self.lock = threading.Lock()
        self._closed = True  # until everything below exists
        self.path = Path(path)
        if not self.path.is_file():
            raise VitDeployError(f"engine {self.path} does not exist")
        data = self.path.read_bytes()
        side = EngineSidecar.read(self.path, data=data)
        trt, name = tb.import_tensorrt(side.flavour)
        check_compatible(side, name, trt.__version__, tb.current_gpu())
        self.trt, self.side = trt, side
        self.use_graph = cuda_graph
        self.graphs: dict[int, Any] = {}
        self._events: list[Any] = []
        self.last_timing: dict[str, float] = {}
        self.cache_path = runtime_cache_path(self.path)
        self.runtime_cache: Any = None
        self.cuda = cuda_memory.device_memory(memory)
        try:
            self._open(data, name == TENSORRT_RTX and runtime_cache, tb._Logger(trt))
        except BaseException:
            self._release(quiet=True)
            raise
        self._closed = False

    def _open(self, data: bytes, with_cache: bool, log: Any) -> None:
        trt, side = self.trt, self.side
        self._log = log
        self.runtime = trt.Runtime(log.logger)
        if side.version_compatible:  # such a plan carries its own lean runtime, which must be allowed to load
            self.runtime.engine_host_code_allowed = True
        engine = self.runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise VitDeployError(f"TensorRT could not load {self.path} ({'; '.join(log.errors) or 'corrupt'}): "
                                 "rebuild it with `vitdeploy build`")
        self.engine = engine
        if with_cache:
            self._rconfig = engine.create_runtime_config()
            self.runtime_cache = self._rconfig.create_runtime_cache()
            if self.cache_path.is_file():
                try:
                    self.runtime_cache.deserialize(self.cache_path.read_bytes())
                except Exception as e:  # a cache TensorRT-RTX cannot use: start a new one
                    warnings.warn(f"ignoring runtime cache {self.cache_path.name}: {e}", stacklevel=3)
            self._rconfig.set_runtime_cache(self.runtime_cache)
            self.context = engine.create_execution_context(self._rconfig)
        else:
            self.context = engine.create_execution_context()
        if self.context is None:
            raise VitDeployError(f"TensorRT could not create an execution context for {self.path} "
                                 f"({'; '.join(log.errors) or 'out of device memory?'})")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        modes = {n: _enum_name(engine.get_tensor_mode(n)) for n in names}
        self.input_name = next(n for n in names if modes[n] == "input")
        self.output_name = next(n for n in names if modes[n] == "output")
        lo, _, hi = (list(s) for s in engine.get_tensor_profile_shape(self.input_name, 0))
        in_dtype = io_dtype(_enum_name(engine.get_tensor_dtype(self.input_name)), self.input_name)
        out_dtype = io_dtype(_enum_name(engine.get_tensor_dtype(self.output_name)), self.output_name)
        self.out_dtype = out_dtype
        out_shape = list(engine.get_tensor_shape(self.output_name))
        self.num_labels = out_shape[-1]
        self.spec = InputSpec(self.input_name, in_dtype.name, tuple(hi[1:]), lo[0], hi[0])
        self.metadata = ArtifactMetadata.from_dict(side.model) if side.model else None
        self.stream = self.cuda.stream()
        self.d_in = self.cuda.malloc(int(np.prod(hi)) * in_dtype.itemsize)
        self.d_out = self.cuda.malloc(hi[0] * self.num_labels * out_dtype.itemsize)
        self.h_in = self.cuda.pinned(tuple(hi), in_dtype)
        self.h_out = self.cuda.pinned((hi[0], self.num_labels), out_dtype)
        self.context.set_tensor_address(self.input_name, self.d_in)
        self.context.set_tensor_address(self.output_name, self.d_out)
        for _ in range(6):  # 4 for timing one host call, 2 for ordering a caller's stream with ours
            self._events.append(self.cuda.event())

    def describe(self) -> str:
        graph = ", cuda graph" if self.use_graph else ""
        return f"tensorrt[{self.side.flavour} {self.trt.__version__}{graph}] {self.path.name} ({self.side.precision})"

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise VitDeployError(f"the TensorRT runtime for {self.path.name} is closed: open it again")

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream):
            raise VitDeployError(f"TensorRT enqueue failed: {'; '.join(self._log.errors[-3:]) or 'no reason logged'}")

    def _enqueue(self, n: int) -> None:
        if not self.use_graph:
            self._execute()
            return
        graph = self.graphs.get(n)
        if graph is None:
            self._execute()  # one plain enqueue first: TensorRT's lazy setup must not be captured
            self.cuda.sync(self.stream)
            self.cuda.begin_capture(self.stream)
            try:
                ok = self.context.execute_async_v3(self.stream)
            finally:
                graph = self.cuda.end_capture(self.stream)  # always leave capture mode
            if not ok:
                self.cuda.destroy_graph(graph)
                raise VitDeployError("TensorRT enqueue failed while capturing a CUDA graph "
                                     f"({'; '.join(self._log.errors[-3:]) or 'no reason logged'}): "
                                     "run without --cuda-graph")
            self.graphs[n] = graph
        self.cuda.launch(graph, self.stream)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        with self.lock:
            self._check_open()
            h_in = self.h_in[:n]
            np.copyto(h_in, batch)
            e0, e1, e2, e3 = self._events[:4]
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

    def run_device(self, in_ptr: int, out_ptr: int, shape: tuple[int, ...], caller_stream: int) -> None:
        """Run on device memory the caller owns, ordered with the caller's stream, without a host sync.

        Our stream first waits for the work the caller has queued so far (its input is ready), the
        context runs on our stream (so never beside another call's execution), and the caller's
        stream then waits for that execution: whatever the caller queues next on its stream (reading
        the output, freeing or reusing the input) runs after it.
        """
        with self.lock:
            self._check_open()
            ready, done = self._events[4:6]
            self.cuda.record(ready, caller_stream)
            self.cuda.wait_event(self.stream, ready)
            self.context.set_input_shape(self.input_name, tuple(shape))
            self.context.set_tensor_address(self.input_name, in_ptr)
            self.context.set_tensor_address(self.output_name, out_ptr)
            try:
                self._execute()
            finally:
                self.context.set_tensor_address(self.input_name, self.d_in)
                self.context.set_tensor_address(self.output_name, self.d_out)
            self.cuda.record(done, self.stream)
            self.cuda.wait_event(caller_stream, done)

    def infer_torch(self, x: Any) -> Any:
        """A torch CUDA tensor in, a torch CUDA tensor out: no host copies (zero-copy addresses).

        Ordered with torch's current stream (see :meth:`run_device`): the result is ready for any
        later work on that stream; other streams must wait on it as usual in torch.
        """
        import torch

        self._check_open()
        if not x.is_cuda:
            raise VitDeployError("infer_torch takes a CUDA tensor; use infer() for host data")
        x = x.contiguous().to(getattr(torch, self.spec.dtype))
        if x.shape[0] > self.spec.max_batch or x.shape[0] < self.spec.min_batch:
            raise VitDeployError(f"batch {x.shape[0]} is outside the engine's profile "
                                 f"{self.spec.min_batch}..{self.spec.max_batch}")
        out = torch.empty((x.shape[0], self.num_labels), dtype=getattr(torch, self.out_dtype.name),
                          device=x.device)
        self.run_device(x.data_ptr(), out.data_ptr(), tuple(x.shape), torch.cuda.current_stream(x.device).cuda_stream)
        return out

    def close(self) -> None:
        """Save TensorRT-RTX's runtime cache (atomically), then free everything this runtime created.
        Idempotent; any call after it is a clear error."""
        with self.lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._save_cache()
            finally:
                self._release(quiet=False)

    def _save_cache(self) -> None:
        if self.runtime_cache is None:
            return
        from vitdeploy.engines.sidecar import EngineSidecar
        from vitdeploy.io import atomic_write_bytes

        try:
            current = EngineSidecar.read(self.path, verify=False)
            if current.engine_sha256 != self.side.engine_sha256:
                return  # the engine was rebuilt meanwhile: this cache belongs to the old one
            atomic_write_bytes(self.cache_path, bytes(memoryview(self.runtime_cache.serialize())))
        except (OSError, VitDeployError) as e:
            warnings.warn(f"could not save the runtime cache {self.cache_path.name}: {e}", stacklevel=3)

    def _release(self, quiet: bool) -> None:
        """Free what exists, each step on its own: graphs, events, TensorRT objects, stream, buffers."""
        errors: list[BaseException] = []

        def attempt(fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except Exception as e:
                errors.append(e)

        cuda = getattr(self, "cuda", None)
        stream = getattr(self, "stream", None)
        if cuda is not None and stream is not None:
            attempt(cuda.sync, stream)  # queued work must finish before its memory goes
        for graph in self.graphs.values():
            attempt(cuda.destroy_graph, graph)
        self.graphs = {}
        for event in self._events:
            attempt(cuda.destroy_event, event)
        self._events = []
        # TensorRT objects free themselves when dropped: context before engine before runtime
        for attr in ("context", "_rconfig", "runtime_cache", "engine", "runtime"):
            if hasattr(self, attr):
                setattr(self, attr, None)
        if cuda is not None and stream is not None:
            attempt(cuda.destroy_stream, stream)
            self.stream = None
        for attr in ("d_in", "d_out"):
            ptr = getattr(self, attr, None)
            if ptr:
                attempt(cuda.free, ptr)
            setattr(self, attr, 0)
        self.h_in = self.h_out = None  # views of the pinned memory freed next
        if cuda is not None:
            attempt(cuda.free_pinned)
        if errors and not quiet:
            raise errors[0]


def engine_layers(path: Path) -> Any:
    """The engine inspector's per-layer JSON (precisions, tactics); needs a GPU to deserialize."""
    import json

    with TensorRTRuntime(path, runtime_cache=False) as rt:
        inspector = rt.engine.create_engine_inspector()
        inspector.execution_context = rt.context
        return json.loads(inspector.get_engine_information(rt.trt.LayerInformationFormat.JSON))
