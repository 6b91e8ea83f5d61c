"""TensorRT runtime (full TensorRT or TensorRT-RTX) behind the Runtime interface.

Instances. A runtime deserializes its engine once and holds ``instances`` slots (default 1), each
with its own stream, device and pinned buffers, scratch memory and execution contexts. A call takes
a free slot (waiting for one when all are busy), so up to ``instances`` batches are in flight at
once, from any threads: the copies of one overlap the compute of another. A slot runs one call at a
time, and all its work is queued on its own (non-blocking) stream. Only the slot's contexts use its
scratch memory. An engine with a dynamic batch needs one optimization profile per instance
(NvInferRuntime.h: each execution context in concurrent use must use a separate profile): ``vitdeploy
build --instances N`` builds N identical ones, and every context of slot ``i`` selects profile ``i``;
fewer profiles than instances is refused with the rebuild command.

CUDA graphs (``cuda_graph=True``). A graph captured around ``execute_async_v3`` is tied to the shapes
and addresses set when it was captured (TensorRT developer guide, CUDA Graphs; NVIDIA/TensorRT#3798).
So, with full TensorRT, each slot keeps one execution context per captured batch size, its shape and
addresses set once and never changed; all a slot's contexts share the slot's scratch block (the
user-managed allocation strategy plus ``set_device_memory``, NvInferRuntime.h). A slot captures the
first ``max_graphs`` sizes it runs and keeps them (nothing is evicted); other sizes run on its plain
context. :meth:`warm` runs a size on every slot (a server's warm-up does so for each size it warms), and
once a runtime has been warmed its slots capture only warmed sizes: any other size runs on the plain
context, so after the warm-up serving never creates a context or captures, whatever sizes the batcher
forms, however many were warmed, and whichever captures failed. A size is captured on its
first use, after one plain enqueue on its context, synchronized (TensorRT's lazy setup must not be
captured, as trtexec does). The slot's plain context (any shape; :meth:`run_device`, :meth:`infer_torch`,
sizes without a graph) is never captured. If a capture fails in any way (begin, TensorRT's enqueue,
``cudaErrorStreamCaptureInvalidated``, instantiation) the runtime does what trtexec does: ends the
capture, clears CUDA's error, runs that size without a graph from then on, and warns once. A graph
runs only from a host call, which ends by synchronizing its stream, so a free slot's graphs are idle.
With TensorRT-RTX the runtime does not capture streams itself: RTX engines take part in stream
capture only when built with ``REQUIRE_USER_ALLOCATION`` (TensorRT-RTX 1.2 release notes), and RTX
has built-in CUDA graphs that re-capture per shape by themselves. ``cuda_graph=True`` sets its
runtime config's ``cuda_graph_strategy`` to ``WHOLE_GRAPH_CAPTURE``; engines need no build flag.

Checked calls. ``set_input_shape`` and ``set_tensor_address`` results are checked (a shape outside
the profile, an address TensorRT refuses); tensor addresses must be 256-byte aligned.
:meth:`infer_torch` refuses a tensor of another dtype, device, layout or alignment.

Devices and threads. ``device`` is ``cuda`` (device 0) or ``cuda:N``; never ``cpu``. The CUDA layer is
activated around every call on the calling thread: cuda-python makes the device's primary context
current there for the call, then the thread's own context again (none on a thread that had none, so no
other device's context is ever created), pycuda pushes its context there and pops it (pycuda has no
stream capture, so it refuses ``--cuda-graph``). ``last_timing`` is per thread: the device phases of that
thread's last host call, empty when that call failed.

Versions. An engine runs on the TensorRT that built it; a version-compatible one also on later
releases of that major version and one major later from 8 or 10 (8 -> 10, 10 -> 11). TensorRT-RTX
engines run only on the release that built them.

With TensorRT-RTX the JIT runtime cache is saved beside the engine (``.rtcache``) when the runtime
closes, so kernels compile once: use it as a context manager (``with open_runtime(...) as rt``).
"""

from __future__ import annotations

import queue
import re
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from vitdeploy import dtypes
from vitdeploy.artifacts.metadata import ArtifactMetadata
from vitdeploy.engines.base import InputError, InputSpec, Runtime
from vitdeploy.engines.tensorrt.sidecar import TENSORRT_RTX, runs_on
from vitdeploy.errors import VitDeployError
from vitdeploy.sysinfo import TRT_FLAVOURS

if TYPE_CHECKING:
    from vitdeploy.engines.tensorrt.sidecar import EngineSidecar

ALIGNMENT = 256  # bytes: TensorRT's requirement for tensor addresses (NvInferRuntime.h, setTensorAddress)
MAX_GRAPHS = 8  # batch sizes captured per slot, the first it runs (each holds an execution context and a graph)
_NO_TIMING: Mapping[str, float] = MappingProxyType({})
# Version-compatible engines across major versions (TensorRT support matrix): built -> runs on
_CROSS_MAJOR = {(8, 10), (10, 11)}


def io_dtype(trt_name: str, tensor: str) -> np.dtype:
    """The numpy dtype of an engine I/O tensor, or a clear refusal (BF16 has no numpy type)."""
    try:
        return dtypes.to_numpy(trt_name)
    except VitDeployError:
        raise VitDeployError(
            f"engine tensor {tensor!r} is {trt_name}: the TensorRT runtime takes float32, float16 or integer I/O; "
            "export with float32 (or float16) inputs and outputs and keep bf16 inside the graph") from None


def _version(text: str) -> Any:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(text)
    except InvalidVersion:
        return text


def parse_device(device: str | int) -> int:
    """``auto``/``cuda`` -> 0, ``cuda:N`` -> N; ``cpu`` and anything else refused (an engine runs on a GPU)."""
    text = str(device).strip().lower()
    if text in ("auto", "cuda", "gpu"):
        return 0
    m = re.fullmatch(r"(?:cuda:)?(\d+)", text)
    if m:
        return int(m.group(1))
    if text == "cpu":
        raise VitDeployError("a TensorRT engine runs on an NVIDIA GPU, not on --device cpu: use --device cuda "
                             "(or cuda:N), or run the ONNX file on the CPU")
    raise VitDeployError(f"--device {device!r}: a TensorRT engine runs on cuda or cuda:N")


def _check_version(side: EngineSidecar, trt_version: str, rebuild: str) -> None:
    from packaging.version import Version

    built, here = _version(side.trt_version), _version(trt_version)
    if built == here:
        return
    if side.flavour == TENSORRT_RTX:
        raise VitDeployError(f"engine built with {side.flavour} {side.trt_version}; this is {trt_version}: "
                             f"TensorRT-RTX engines run only on the release that built them: {rebuild}")
    if not side.version_compatible:
        raise VitDeployError(f"engine built with {side.flavour} {side.trt_version}; this is {trt_version}: "
                             f"{rebuild} (or build with --version-compatible)")
    ordered = isinstance(built, Version) and isinstance(here, Version) and here > built
    if not (ordered and (built.major == here.major or (built.major, here.major) in _CROSS_MAJOR)):
        raise VitDeployError(f"version-compatible engine built with {side.flavour} {side.trt_version} runs on that "
                             "release, later ones of its major version, and 8 -> 10, 10 -> 11; "
                             f"this is {trt_version}: {rebuild}")


def check_compatible(side: EngineSidecar, trt_module: str, trt_version: str, gpu: tuple[str, str] | None) -> None:
    """Refuse an engine built by another TensorRT or for another GPU, with advice that can work."""
    source = side.onnx_path or "MODEL.onnx"
    rebuild = f"rebuild with `vitdeploy build {source}`"
    if side.flavour != trt_module:
        raise VitDeployError(f"engine built with {side.flavour} {side.trt_version}; this machine has "
                             f"{trt_module} {trt_version}: {rebuild}")
    _check_version(side, trt_version, rebuild)
    if gpu is None:
        raise VitDeployError("running a TensorRT engine needs an NVIDIA GPU; none is visible here")
    name, cc = gpu
    if not runs_on(side.flavour, cc):
        raise VitDeployError(f"{TRT_FLAVOURS[side.flavour]} cannot run on {cc} ({name}); build with full "
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


def _gpu(index: int) -> tuple[str, str] | None:
    """(name, smXY) of ``cuda:index``; None without a GPU; a clear error for a device that is not there."""
    from vitdeploy import sysinfo

    devices = sysinfo.cuda_devices()
    if not devices:
        return None
    if index >= len(devices):
        raise VitDeployError(f"--device cuda:{index}: this machine has {len(devices)} CUDA device(s), "
                             f"cuda:0..cuda:{len(devices) - 1}")
    return devices[index].name, devices[index].compute_capability


@dataclass
class _Slot:
    """One instance: a stream, I/O buffers, scratch memory and its contexts; one call at a time."""

    index: int
    profile: int = 0  # the optimization profile of every context of this slot (a dynamic engine: its own)
    stream: int = 0
    d_in: int = 0
    d_out: int = 0
    scratch: int = 0  # device memory shared by this slot's contexts (full TensorRT: user-managed)
    h_in: Any = None
    h_out: Any = None
    events: list[Any] = field(default_factory=list)
    context: Any = None  # the plain context: any shape, any address, never captured
    shape: tuple[int, ...] | None = None  # the plain context's input shape now
    graphs: dict[int, tuple[Any, Any]] = field(default_factory=dict)  # batch -> (context, graph)


class TensorRTRuntime(Runtime):
    backend = "tensorrt"
    where = "cuda"

    def __init__(self, path: str | Path, cuda_graph: bool = False, memory: str = "auto",
                 runtime_cache: bool = True, device: str | int = "cuda", instances: int = 1,
                 max_graphs: int = MAX_GRAPHS) -> None:
        from vitdeploy.engines.tensorrt import build as tb
        from vitdeploy.engines.tensorrt import cuda_memory
        from vitdeploy.engines.tensorrt.sidecar import EngineSidecar, runtime_cache_path

        self._closed = True  # until everything below exists
        self._state = threading.Lock()
        self._every = threading.Lock()  # warm and close take every slot: one at a time (see _every_slot)
        self._timing = threading.local()  # each thread's last call's device phases
        self.slots: list[_Slot] = []
        self._free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        if int(instances) < 1 or int(max_graphs) < 1:
            raise VitDeployError(f"instances ({instances}) and max_graphs ({max_graphs}) must be at least 1")
        self.device = parse_device(device)
        self.path = Path(path)
        if not self.path.is_file():
            raise VitDeployError(f"engine {self.path} does not exist")
        data = self.path.read_bytes()
        side = EngineSidecar.read(self.path, data=data)
        trt, name = tb.import_tensorrt(side.flavour)
        check_compatible(side, name, trt.__version__, _gpu(self.device))
        self.trt, self.side = trt, side
        self.rtx = name == TENSORRT_RTX
        self.use_graph = cuda_graph
        self.own_capture = cuda_graph and not self.rtx  # TensorRT-RTX captures by itself (cuda_graph_strategy)
        self.max_graphs = int(max_graphs)
        self._no_graph: set[int] = set()  # batch sizes whose capture failed: they run without a graph
        self._warmed: frozenset[int] | None = None  # once warm() has run: the only sizes a slot may capture
        self._warned = False
        self.cache_path = runtime_cache_path(self.path)
        self.runtime_cache: Any = None
        self._rconfig: Any = None
        self.cuda = cuda_memory.device_memory(memory, device=self.device)
        if self.own_capture and not self.cuda.can_capture:
            raise VitDeployError(f"--cuda-graph needs CUDA stream capture, which {self.cuda.name} does not have: "
                                 "pip install 'vitdeploy[cuda]' (cuda-python), or run without --cuda-graph")
        try:
            with self.cuda.activate():
                self._open(data, self.rtx and runtime_cache, tb.Logger(trt), int(instances))
        except BaseException:
            self._release(quiet=True)
            raise
        for slot in self.slots:
            self._free.put(slot)
        self._closed = False

    def _open(self, data: bytes, with_cache: bool, log: Any, instances: int) -> None:
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
        if self.rtx and (with_cache or self.use_graph):
            self._rconfig = engine.create_runtime_config()
            if with_cache:
                self._load_cache()
            if self.use_graph:
                self._rconfig.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        modes = {n: dtypes.enum_name(engine.get_tensor_mode(n)) for n in names}
        self.input_name = next(n for n in names if modes[n] == "input")
        self.output_name = next(n for n in names if modes[n] == "output")
        lo, opt, hi = (list(s) for s in engine.get_tensor_profile_shape(self.input_name, 0))
        in_dtype = io_dtype(dtypes.enum_name(engine.get_tensor_dtype(self.input_name)), self.input_name)
        self.out_dtype = io_dtype(dtypes.enum_name(engine.get_tensor_dtype(self.output_name)), self.output_name)
        self.num_labels = list(engine.get_tensor_shape(self.output_name))[-1]
        self.spec = InputSpec(self.input_name, in_dtype.name, tuple(hi[1:]), lo[0], hi[0])
        self._opt_shape = tuple(opt)
        self.metadata = ArtifactMetadata.from_dict(side.model) if side.model else None
        self._scratch_bytes = 0 if self.rtx else int(engine.device_memory_size_v2)
        self._dynamic = lo != hi
        self._check_profiles(int(engine.num_optimization_profiles), instances)
        for i in range(instances):
            self._new_slot(i, tuple(hi), in_dtype)

    def _check_profiles(self, profiles: int, instances: int) -> None:
        """NvInferRuntime.h: "each execution context in concurrent use must use a separate optimization
        profile" (an engine with dynamic shapes). Each slot takes profile ``slot.index``."""
        if self._dynamic and profiles < instances:
            source = self.side.onnx_path or "MODEL.onnx"
            raise VitDeployError(
                f"{self.path.name} has {profiles} optimization profile(s); {instances} instances need one each "
                f"(TensorRT runs concurrent contexts of a dynamic-batch engine on separate profiles): rebuild with "
                f"`vitdeploy build {source} --instances {instances}`, or run it with {profiles} instance(s)")

    def _load_cache(self) -> None:
        self.runtime_cache = self._rconfig.create_runtime_cache()
        if self.cache_path.is_file():
            try:
                loaded = self.runtime_cache.deserialize(self.cache_path.read_bytes())
                why = "" if loaded else "made by another TensorRT-RTX, GPU or driver"
            except Exception as e:  # a cache TensorRT-RTX cannot use: start a new one
                why = str(e)
            if why:
                warnings.warn(f"ignoring runtime cache {self.cache_path.name} ({why}): kernels compile again "
                              "and a new cache is saved on close", stacklevel=4)
        self._rconfig.set_runtime_cache(self.runtime_cache)

    def _new_slot(self, index: int, max_shape: tuple[int, ...], in_dtype: np.dtype) -> None:
        cuda, slot = self.cuda, _Slot(index, profile=index if self._dynamic else 0)
        self.slots.append(slot)  # first, so that a failure below frees what was made
        slot.stream = cuda.stream()
        slot.d_in = cuda.malloc(int(np.prod(max_shape)) * in_dtype.itemsize)
        slot.d_out = cuda.malloc(max_shape[0] * self.num_labels * self.out_dtype.itemsize)
        if self._scratch_bytes:
            slot.scratch = cuda.malloc(self._scratch_bytes)
        slot.h_in = cuda.pinned(max_shape, in_dtype)
        slot.h_out = cuda.pinned((max_shape[0], self.num_labels), self.out_dtype)
        for _ in range(6):  # 4 for timing one host call, 2 for ordering a caller's stream with ours
            slot.events.append(cuda.event())
        slot.context = self._new_context(slot)

    def _new_context(self, slot: _Slot) -> Any:
        """An execution context bound to the slot's buffers (and, with full TensorRT, its scratch block)."""
        engine = self.engine
        if self._rconfig is not None:
            ctx = engine.create_execution_context(self._rconfig)
        elif self.rtx:
            ctx = engine.create_execution_context()
        else:
            ctx = engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if ctx is None:
            raise VitDeployError(f"TensorRT could not create an execution context for {self.path} "
                                 f"({self._why('out of device memory?')})")
        if not self.rtx:
            ctx.set_device_memory(slot.scratch, self._scratch_bytes)
        if self._dynamic and not ctx.set_optimization_profile_async(slot.profile, slot.stream):
            raise VitDeployError(f"TensorRT refused optimization profile {slot.profile} of {self.path.name}: "
                                 f"{self._why()}")
        self._bind(ctx, slot.d_in, slot.d_out)
        return ctx

    def describe(self) -> str:
        graph = ", cuda graph" if self.use_graph else ""
        inst = f", {len(self.slots)} instances" if len(self.slots) > 1 else ""
        return (f"tensorrt[{self.side.flavour} {self.trt.__version__} cuda:{self.device}{graph}{inst}] "
                f"{self.path.name} ({self.side.precision})")

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def instances(self) -> int:
        return len(self.slots)

    def _check_open(self) -> None:
        if self._closed:
            raise VitDeployError(f"the TensorRT runtime for {self.path.name} is closed: open it again")

    @contextmanager
    def _slot(self) -> Iterator[_Slot]:
        """A free slot (waiting for one), with the CUDA layer active on this thread; the slot returns after."""
        self._check_open()
        slot = self._free.get()
        try:
            self._check_open()  # closed while this call waited
            with self.cuda.activate():
                yield slot
        finally:
            self._free.put(slot)

    # -- checked TensorRT calls ------------------------------------------------------------------------
    def _why(self, default: str = "no reason logged") -> str:
        return "; ".join(self._log.errors[-3:]) or default

    def _set_shape(self, ctx: Any, shape: tuple[int, ...]) -> None:
        if not ctx.set_input_shape(self.input_name, shape):
            dims = ", ".join(map(str, self.spec.shape))
            raise VitDeployError(f"TensorRT refused input shape {shape} for {self.input_name} (the engine takes "
                                 f"[{self.spec.min_batch}..{self.spec.max_batch}, {dims}]): {self._why()}")

    def _bind(self, ctx: Any, in_ptr: int, out_ptr: int) -> None:
        for name, ptr in ((self.input_name, in_ptr), (self.output_name, out_ptr)):
            if ptr % ALIGNMENT:
                raise InputError(f"the address of {name} ({ptr:#x}) is not {ALIGNMENT}-byte aligned, as TensorRT "
                                 "requires: pass memory that starts an allocation (e.g. a tensor's .clone())")
        for name, ptr in ((self.input_name, in_ptr), (self.output_name, out_ptr)):
            if not ctx.set_tensor_address(name, ptr):
                raise VitDeployError(f"TensorRT refused the address {ptr:#x} for {name}: {self._why()}")

    def _execute(self, ctx: Any, stream: int) -> None:
        if not ctx.execute_async_v3(stream):
            raise VitDeployError(f"TensorRT enqueue failed: {self._why()}")

    # -- execution --------------------------------------------------------------------------------------
    def _plain(self, slot: _Slot, shape: tuple[int, ...]) -> None:
        if slot.shape != shape:
            slot.shape = None  # unknown until TensorRT accepts the new one
            self._set_shape(slot.context, shape)
            slot.shape = shape
        self._execute(slot.context, slot.stream)

    def _enqueue(self, slot: _Slot, n: int) -> None:
        """Run batch ``n`` (its input in slot.d_in) on the slot's stream: by its graph when it has one.
        A slot captures the first ``max_graphs`` sizes it runs (once warmed: warmed sizes only) and keeps
        them; other sizes run on the plain context (no capture, no new context, no host sync)."""
        shape = (n, *self.spec.shape)
        entry = slot.graphs.get(n)
        if entry is not None:
            self.cuda.launch(entry[1], slot.stream)
            return
        warmed = self._warmed
        if (not self.own_capture or n in self._no_graph or len(slot.graphs) >= self.max_graphs
                or (warmed is not None and n not in warmed)):
            self._plain(slot, shape)
            return
        ctx = self._new_context(slot)  # this size's own context: its shape is never changed again
        self._set_shape(ctx, shape)
        self._execute(ctx, slot.stream)  # this call's result, and TensorRT's lazy setup (never captured)
        graph = self._capture(ctx, slot, n)
        if graph is not None:
            slot.graphs[n] = (ctx, graph)

    def _capture(self, ctx: Any, slot: _Slot, n: int) -> Any:
        """A graph of ``ctx``'s enqueue, or None: after any failure (begin, the enqueue, end, instantiate)
        the capture is ended and CUDA's error cleared, as trtexec does, and that size runs without a graph
        from then on, with one warning per runtime."""
        cuda, stream = self.cuda, slot.stream
        # The plain run above finishes first: TensorRT's first enqueue of a shape sets things up, which a
        # capture must not record (trtexec synchronizes there too), and ``ctx`` is dropped on a failure.
        cuda.sync(stream)
        ok, cause, graph = False, "", None
        try:
            cuda.begin_capture(stream)
        except Exception as e:  # not capturing: nothing to end
            cuda.clear_error()
            return self._no_graph_for(n, str(e))
        try:
            ok = bool(ctx.execute_async_v3(stream))
        except Exception as e:
            cause = str(e)
        try:
            graph = cuda.end_capture(stream)  # ends the capture whatever it reports
        except Exception as e:  # invalidated, instantiation refused, or anything else
            cuda.clear_error()
            cause = cause or str(e)
        if ok and graph is not None:
            return graph
        if graph is not None:
            cuda.destroy_graph(graph)  # never launched
        return self._no_graph_for(n, cause or self._why())

    def _no_graph_for(self, n: int, cause: str) -> None:
        with self._state:
            self._no_graph.add(n)
            warn, self._warned = not self._warned, True
        if warn:
            warnings.warn(f"CUDA graph capture failed for batch {n} ({cause}): batches of that size (and any other "
                          "whose capture fails, not reported again) run without a CUDA graph", stacklevel=7)
        return None

    def _run(self, batch: np.ndarray) -> np.ndarray:
        with self._slot() as slot:
            return self._run_on(slot, batch)

    def _run_on(self, slot: _Slot, batch: np.ndarray) -> np.ndarray:
        self._timing.value = _NO_TIMING  # until this call has its own: a failure leaves none
        n = batch.shape[0]
        cuda, stream = self.cuda, slot.stream
        h_in = slot.h_in[:n]
        np.copyto(h_in, batch)
        e0, e1, e2, e3 = slot.events[:4]
        cuda.record(e0, stream)
        cuda.htod(slot.d_in, h_in, stream)
        cuda.record(e1, stream)
        self._enqueue(slot, n)
        cuda.record(e2, stream)
        h_out = slot.h_out[:n]
        cuda.dtoh(h_out, slot.d_out, stream)
        cuda.record(e3, stream)
        cuda.sync(stream)  # the host reads h_out next; and every graph is idle when its slot is free
        self._timing.value = MappingProxyType({"h2d_ms": cuda.elapsed_ms(e0, e1), "compute_ms": cuda.elapsed_ms(e1, e2),
                                               "d2h_ms": cuda.elapsed_ms(e2, e3)})
        return h_out.astype(np.float32, copy=True)

    def infer(self, batch: Any) -> np.ndarray:
        self._timing.value = _NO_TIMING  # a call refused before it runs leaves no timing either
        return super().infer(batch)

    @property  # type: ignore[override]
    def last_timing(self) -> Mapping[str, float]:
        """The device phases (ms: h2d, compute, d2h) of the last host call made from this thread (its last
        chunk, for a batch split into several); empty before one, and after a call that failed. Per thread:
        calls from other threads, on other instances, never replace it."""
        return getattr(self._timing, "value", _NO_TIMING)

    def warm(self, batch: Any) -> None:
        """Run ``batch`` once on every instance, so that each has set up (and, with CUDA graphs, captured)
        that size before serving: a server's warm-up. From the first warm on, slots capture only warmed
        sizes (see :meth:`_enqueue`), so serving another size never captures. Waits for the calls in flight."""
        x = self.check_input(batch)
        if not self.spec.min_batch <= len(x) <= self.spec.max_batch:
            self.infer(x)
            return
        self._check_open()
        with self._every_slot() as taken:
            self._check_open()
            with self._state:
                self._warmed = (self._warmed or frozenset()) | {len(x)}
            with self.cuda.activate():
                for slot in taken:
                    self._run_on(slot, x)

    @contextmanager
    def _every_slot(self) -> Iterator[list[_Slot]]:
        """Every slot, once the calls in flight have returned them; one caller at a time: two callers
        taking slots at once (warm beside close, say) could each hold some and wait for the other's forever."""
        with self._every:
            taken: list[_Slot] = []
            try:
                for _ in self.slots:
                    taken.append(self._free.get())
                yield taken
            finally:
                for slot in taken:
                    self._free.put(slot)  # callers still waiting wake up (and see the runtime closed, after close)

    def run_device(self, in_ptr: int, out_ptr: int, shape: tuple[int, ...], caller_stream: int) -> None:
        """Run on device memory the caller owns, ordered with the caller's stream, without a host sync.

        The slot's stream first waits for the work the caller has queued so far (its input is ready),
        the slot's plain context (never captured) runs on the slot's stream, and the caller's stream
        then waits for that execution: whatever the caller queues next on its stream (reading the
        output, freeing or reusing the input) runs after it.
        """
        shape = tuple(int(d) for d in shape)
        with self._slot() as slot:
            cuda = self.cuda
            ready, done = slot.events[4:6]
            cuda.record(ready, caller_stream)
            cuda.wait_event(slot.stream, ready)
            try:
                self._bind(slot.context, in_ptr, out_ptr)
                self._plain(slot, shape)
            finally:  # the plain context is bound to the slot's own buffers between calls, whatever happened
                self._bind(slot.context, slot.d_in, slot.d_out)
            cuda.record(done, slot.stream)
            cuda.wait_event(caller_stream, done)

    def infer_torch(self, x: Any) -> Any:
        """A torch CUDA tensor in, a torch CUDA tensor out: no host copies (zero-copy addresses).

        The tensor must be the engine's dtype, on this runtime's device, contiguous and 256-byte
        aligned (a fresh tensor is; a view at an offset may not be): anything else is refused, never
        silently copied. Ordered with torch's current stream (see :meth:`run_device`): the result is
        ready for any later work on that stream; other streams must wait on it as usual in torch.
        """
        import torch

        self._check_open()
        want = getattr(torch, self.spec.dtype)
        if not getattr(x, "is_cuda", False):
            raise InputError("infer_torch takes a CUDA tensor; use infer() for host data")
        if x.device.index not in (None, self.device):
            raise InputError(f"the tensor is on {x.device}; this runtime runs on cuda:{self.device}: "
                             f"move it with x.to('cuda:{self.device}')")
        if x.dtype != want:
            raise InputError(f"the tensor is {x.dtype}; the engine takes {want}: convert it with x.to({want})")
        if x.layout != torch.strided or not x.is_contiguous():
            raise InputError("the tensor is not a dense contiguous tensor: pass x.contiguous()")
        if tuple(x.shape[1:]) != self.spec.shape:
            raise InputError(f"input shape {tuple(x.shape)} does not match the engine's "
                             f"[N, {', '.join(map(str, self.spec.shape))}]")
        if not self.spec.min_batch <= x.shape[0] <= self.spec.max_batch:
            raise InputError(f"batch {x.shape[0]} is outside the engine's profile "
                             f"{self.spec.min_batch}..{self.spec.max_batch}")
        if x.data_ptr() % ALIGNMENT:
            raise InputError(f"the tensor's data is not {ALIGNMENT}-byte aligned, as TensorRT requires "
                             "(a view at an offset?): pass x.clone()")
        out = x.new_empty((x.shape[0], self.num_labels), dtype=getattr(torch, self.out_dtype.name))
        self.run_device(x.data_ptr(), out.data_ptr(), tuple(x.shape), torch.cuda.current_stream(x.device).cuda_stream)
        return out

    def layers(self) -> Any:
        """The engine inspector's per-layer JSON, with the input shape set (to the profile's opt) first."""
        import json

        with self._slot() as slot:
            self._set_shape(slot.context, self._opt_shape)
            slot.shape = self._opt_shape
            inspector = self.engine.create_engine_inspector()
            # the inspector's context: ``execution_context`` from TensorRT 10.10 (and TensorRT-RTX), ``context`` before
            setattr(inspector, "execution_context" if hasattr(type(inspector), "execution_context") else "context",
                    slot.context)
            return json.loads(inspector.get_engine_information(self.trt.LayerInformationFormat.JSON))

    # -- closing ----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for the calls in flight, save TensorRT-RTX's runtime cache (atomically), then free
        everything this runtime created. Idempotent; any call after it is a clear error."""
        with self._state:
            if self._closed:
                return
            self._closed = True
        with self._every_slot():  # each slot returns when its call ends
            try:
                self._save_cache()
            finally:
                self._release(quiet=False)

    def _save_cache(self) -> None:
        if self.runtime_cache is None:
            return
        from vitdeploy.engines.tensorrt.sidecar import EngineSidecar
        from vitdeploy.io import atomic_write_bytes

        try:
            current = EngineSidecar.read(self.path, verify=False)
            if current.engine_sha256 != self.side.engine_sha256:
                return  # the engine was rebuilt meanwhile: this cache belongs to the old one
            atomic_write_bytes(self.cache_path, bytes(memoryview(self.runtime_cache.serialize())))
        except (OSError, VitDeployError) as e:
            warnings.warn(f"could not save the runtime cache {self.cache_path.name}: {e}", stacklevel=3)

    def _release(self, quiet: bool) -> None:
        """Free what exists, each step on its own, on this runtime's device."""
        errors: list[BaseException] = []
        cuda = getattr(self, "cuda", None)
        if cuda is None:
            return
        try:
            with cuda.activate():
                self._free_all(cuda, errors)
        except Exception as e:
            errors.append(e)
        if errors and not quiet:
            raise errors[0]

    def _free_all(self, cuda: Any, errors: list[BaseException]) -> None:
        """Graphs, events, TensorRT objects, streams, buffers: in that order, each failure kept."""
        def attempt(fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except Exception as e:
                errors.append(e)

        for slot in self.slots:
            if slot.stream:
                attempt(cuda.sync, slot.stream)  # queued work must finish before its memory goes
        for slot in self.slots:
            for _, graph in slot.graphs.values():
                attempt(cuda.destroy_graph, graph)
            slot.graphs.clear()  # drops those contexts too
            for event in slot.events:
                attempt(cuda.destroy_event, event)
            slot.events = []
            slot.context = None
        # TensorRT objects free themselves when dropped: contexts before engine before runtime
        for attr in ("_rconfig", "runtime_cache", "engine", "runtime"):
            if hasattr(self, attr):
                setattr(self, attr, None)
        for slot in self.slots:
            if slot.stream:
                attempt(cuda.destroy_stream, slot.stream)
                slot.stream = 0
            for attr in ("d_in", "d_out", "scratch"):
                ptr = getattr(slot, attr)
                if ptr:
                    attempt(cuda.free, ptr)
                setattr(slot, attr, 0)
            slot.h_in = slot.h_out = None  # views of the pinned memory freed next
        attempt(cuda.free_pinned)


def engine_layers(path: Path) -> Any:
    """The engine inspector's per-layer JSON (precisions, tactics); needs a GPU to deserialize."""
    with TensorRTRuntime(path, runtime_cache=False) as rt:
        return rt.layers()
