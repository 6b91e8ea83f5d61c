"""The TensorRT runtime's logic without a GPU: small fakes of TensorRT and of the CUDA layer that
enforce the contracts a GPU would.

The fake CUDA layer keeps a timeline of what each stream has queued (and which memory each op
touches) and which events a stream has waited on, so an execution on a stream that is not ordered
after unfinished work on the same memory elsewhere is caught as the data race it would be on a GPU.
It also enforces:
- a CUDA graph replays only while its context still has the shapes, addresses and scratch memory it
  had when captured (TensorRT's developer guide, CUDA Graphs);
- a capture is invalidated by TensorRT's lazy setup (no plain enqueue of that shape first), by a
  TensorRT-RTX engine (not built with REQUIRE_USER_ALLOCATION), or on demand; its end then fails with
  cudaErrorStreamCaptureInvalidated and leaves CUDA's last error set, which fails TensorRT's next
  enqueue until it is cleared;
- a context is used only on a thread whose current device (or pycuda context) is its own;
- set_input_shape / set_tensor_address return False for a shape outside the profile or an address
  that is not 256-byte aligned; set_device_memory needs 256-byte alignment and the engine's size.
The fake device computes (FakeCuda): copies and enqueues are queued per stream and run only at a sync
(or through an event a synchronized stream waits for), so a sync or wait left out gives a stale answer;
TensorRT's contexts are held weakly (Contexts), so one dropped with work queued is caught. The real
CudaPython layer also runs over cudart calls that queue on that device (CudartOverFake), and the real
PyCuda layer over a fake pycuda. The real-GPU tests are at the end, marked ``gpu``.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import threading
import time
import types
import warnings
import weakref
from contextlib import contextmanager, suppress

import numpy as np
import pytest

from vitdeploy import sysinfo
from vitdeploy.engines.tensorrt import build as tb
from vitdeploy.engines.tensorrt import cuda_memory
from vitdeploy.engines.tensorrt.sidecar import EngineSidecar, TensorIO, write_engine
from vitdeploy.errors import VitDeployError

REAL_DEVICE_MEMORY = cuda_memory.device_memory
MAX_BATCH = 8


# -- fakes -----------------------------------------------------------------------------------------
class Race(AssertionError):
    pass


class StaleGraph(AssertionError):
    pass


class WrongDevice(AssertionError):
    pass


class ProfileClash(AssertionError):
    pass


class Busy(AssertionError):
    """Memory freed, or a context, stream or graph destroyed, while work that uses it is queued."""


LEGACY_STREAM = 0  # CUDA's legacy default stream: torch's default stream
TORCH_MEMORY: dict[int, np.ndarray] = {}  # the fake torch tensors' device memory, by address


def expected(x: np.ndarray) -> np.ndarray:
    """What the fake engine computes: each row's sum plus the label index (float32 [n, 10])."""
    return x.reshape(len(x), -1).astype(np.float64).sum(1, keepdims=True).astype(np.float32) + np.arange(10)


class FakeCuda:
    """The CUDA layer's interface over a device that computes: each copy or enqueue is queued on its
    stream and runs only when that stream is synchronized (or an event it recorded is waited for by a
    stream being synchronized). Device memory holds bytes; a copy moves them when it runs, so a read
    of host output before its copy ran sees stale data. It also enforces: races between streams on
    the same memory, one optimization profile per context in concurrent use, freeing or destroying
    anything with queued work, CUDA graph capture rules, the legacy stream during a blocking stream's
    capture (906), and each thread's current device."""

    name = "fake"
    can_capture = True

    def __init__(self, fail_malloc_at: int | None = None, invalidate_capture: bool = False,
                 fail_instantiate: bool = False, blocking_streams: bool = False) -> None:
        self.ids = itertools.count(1)
        self.mutex = threading.RLock()
        self.pending: dict[int, dict[int, frozenset | None]] = {}  # stream -> {op: memory it touches}, not yet run
        self.queued: dict[int, list[tuple[int, object]]] = {}  # stream -> [(op, run)] in order
        self.waited: dict[int, set[int]] = {}  # stream -> ops it is ordered after (through events)
        self.done: set[int] = set()
        self.cost: dict[int, float] = {}  # op -> its time on the device (ms), for event timing
        self.last_op: dict[int, int] = {}
        self.stream_of: dict[int, int] = {}
        self.copies: set[int] = set()  # ops that read or write pinned host memory
        self.writers: dict[int, object] = {}  # execution op -> its first half (writing its scratch)
        self.profile_of: dict[int, tuple] = {}  # execution op -> (engine, profile)
        self.graph_of: dict[int, int] = {}  # op -> the graph whose launch queued it
        self.capturing: set[int] = set()
        self.captured: dict[int, list[dict]] = {}  # stream -> executions recorded by its capture
        self.invalid: dict[int, str] = {}  # stream -> why its capture is invalidated
        self.invalidate_capture = invalidate_capture
        self.fail_instantiate = fail_instantiate
        self.blocking_streams = blocking_streams
        self.check_races = True
        self.last_error: str | None = None
        self.allocs: dict[int, np.ndarray] = {}  # ptr -> its bytes
        self.scratch_own: dict[object, np.ndarray] = {}  # memory a context allocated itself
        self.pinned_arrays: list[np.ndarray] = []
        self.streams: dict[int, bool] = {}  # stream -> blocking
        self.events: set[int] = set()
        self.graphs: dict[int, list[dict]] = {}
        self.freed: list[str] = []
        self.mallocs = 0
        self.captures = 0
        self.launches = 0
        self.fail_malloc_at = fail_malloc_at
        self.executions: list[tuple[int, int]] = []  # (stream, op)
        self.device = 0
        self.tls = threading.local()
        self.in_sync = 0  # threads inside sync at once (instances in flight)
        self.max_in_sync = 0
        self.sync_delay = 0.0

    def bind(self, device: int) -> FakeCuda:
        self.device = device
        return self

    # the current device of the calling thread (CUDA's default: 0)
    def thread_device(self) -> int | None:
        return getattr(self.tls, "device", 0)

    @contextmanager
    def activate(self):
        previous, self.tls.device = self.thread_device(), self.device  # cudaSetDevice: for this thread only
        try:
            yield
        finally:
            self.tls.device = previous

    def clear_error(self) -> None:
        self.last_error = None

    # -- the queue -------------------------------------------------------------------------------
    def _legacy(self, stream: int) -> None:
        """The legacy stream during a blocking stream's capture: cudaErrorStreamCaptureImplicit (906),
        and the capture is invalidated (CUDA runtime docs, cudaStreamIsCapturing)."""
        if stream != LEGACY_STREAM:
            return
        blocking = [s for s in self.capturing if self.streams.get(s)]
        if blocking:
            for s in blocking:
                self.invalid[s] = "the legacy stream used during the capture"
            raise cuda_memory.CudaError("cudaEventRecord failed: cudaErrorStreamCaptureImplicit (906)")

    def queue(self, stream: int, touches: frozenset | None = None, run: object = None, cost: float = 0.0) -> int:
        """An op on ``stream`` that runs ``run()`` when the stream gets there; ``touches=None``: any memory."""
        with self.mutex:
            self._legacy(stream)
            assert stream == LEGACY_STREAM or stream in self.streams, f"op on stream {stream}: not created or destroyed"
            op = next(self.ids)
            self.pending.setdefault(stream, {})[op] = touches
            self.queued.setdefault(stream, []).append((op, run))
            self.cost[op] = cost
            self.last_op[stream] = op
            self.stream_of[op] = stream
            return op

    def _run_until(self, stream: int, target: int | None) -> None:
        """Run ``stream``'s queued ops in order, up to ``target`` (all when None)."""
        with self.mutex:
            ops = self.queued.get(stream, [])
            while ops and (target is None or ops[0][0] <= target):
                op, run = ops.pop(0)
                if run is not None:
                    run()
                self.pending.get(stream, {}).pop(op, None)
                self.done.add(op)

    def _complete(self, ops: set[int]) -> None:
        for stream in list(self.queued):
            mine = [op for op, _ in self.queued.get(stream, []) if op in ops]
            if mine:
                self._run_until(stream, max(mine))

    def execute(self, stream: int, touches: frozenset, run: object = None, profile: tuple | None = None,
                cost: float = 1.0, graph: int | None = None, writer: object = None) -> int:
        """A TensorRT execution on ``stream``: unfinished work on its memory, or on its optimization profile,
        on another stream must be ordered before it."""
        with self.mutex:
            waited = self.waited.get(stream, set())
            for other, ops in self.pending.items():
                for op, mem in ops.items():
                    if other == stream or op in waited:
                        continue
                    if self.check_races and (mem is None or mem & touches):
                        raise Race(f"context runs on stream {stream} while stream {other} has unordered work "
                                   "on the same memory in flight")
                    if profile is not None and self.profile_of.get(op) == profile:
                        raise ProfileClash(f"two contexts on optimization profile {profile[1]} run at once (streams "
                                           f"{other} and {stream}): each context in concurrent use needs its own")
            op = self.queue(stream, touches, run, cost)
            if profile is not None:
                self.profile_of[op] = profile
            if graph is not None:
                self.graph_of[op] = graph
            if writer is not None:
                self.writers[op] = writer
            self.executions.append((stream, op))
            return op

    # -- memory (256-byte aligned, like cudaMalloc) ------------------------------------------------
    def malloc(self, nbytes: int) -> int:
        with self.mutex:
            self.mallocs += 1
            if self.mallocs == self.fail_malloc_at:
                raise cuda_memory.CudaError("cudaMalloc failed: cudaErrorMemoryAllocation")
            ptr = (1 << 40) + next(self.ids) * (1 << 24)
            self.allocs[ptr] = np.zeros(nbytes, np.uint8)
            return ptr

    def buffer(self, ptr: object, nbytes: int) -> np.ndarray:
        """``nbytes`` of device memory at ``ptr`` (ours, a fake torch tensor's, or a context's own)."""
        if not isinstance(ptr, int):
            return self.scratch_own.setdefault(ptr, np.zeros(max(nbytes, 1 << 12), np.uint8))[:nbytes]
        for base, data in itertools.chain(self.allocs.items(), TORCH_MEMORY.items()):
            if base <= ptr < base + len(data):
                assert ptr + nbytes <= base + len(data), f"{nbytes} bytes at {ptr:#x}: past the allocation's end"
                return data[ptr - base:ptr - base + nbytes]
        return TORCH_MEMORY.setdefault(ptr, np.zeros(max(nbytes, 1 << 16), np.uint8))[:nbytes]  # a raw address

    def _busy(self, what: str, test) -> None:
        with self.mutex:
            for stream, ops in self.pending.items():
                for op, mem in ops.items():
                    if test(op, mem):
                        raise Busy(f"{what} while stream {stream} has queued work that uses it")

    def free(self, ptr: int) -> None:
        assert ptr in self.allocs, f"free of {ptr}: not allocated (double free?)"
        self._busy(f"cudaFree({ptr:#x})", lambda op, mem: mem is not None and ptr in mem)
        del self.allocs[ptr]
        self.freed.append("device")

    def pinned(self, shape: tuple[int, ...], dtype: object) -> np.ndarray:
        arr = np.zeros(shape, dtype)
        self.pinned_arrays.append(arr)
        return arr

    def free_pinned(self) -> None:
        self._busy("cudaFreeHost", lambda op, mem: op in self.copies)
        if self.pinned_arrays:
            self.freed.append("pinned")
        self.pinned_arrays.clear()

    # -- streams and copies --------------------------------------------------------------------
    def stream(self) -> int:
        s = next(self.ids)
        self.streams[s] = self.blocking_streams
        return s

    def destroy_stream(self, stream: int) -> None:
        assert stream in self.streams
        self._busy(f"cudaStreamDestroy({stream})", lambda op, mem: op in self.pending.get(stream, {}))
        del self.streams[stream]
        self.freed.append("stream")

    def htod(self, dst: int, src: np.ndarray, stream: int) -> None:
        def run() -> None:  # reads the host buffer when it runs, as an async copy from pinned memory does
            self.buffer(dst, src.nbytes)[:] = src.reshape(-1).view(np.uint8)

        self.copies.add(self.queue(stream, frozenset({dst}), run, cost=src.nbytes / 1e4))

    def dtoh(self, dst: np.ndarray, src: int, stream: int) -> None:
        def run() -> None:
            dst.reshape(-1).view(np.uint8)[:] = self.buffer(src, dst.nbytes)

        self.copies.add(self.queue(stream, frozenset({src}), run, cost=dst.nbytes / 1e4))

    def sync(self, stream: int) -> None:
        assert stream not in self.capturing, "stream synchronize during capture invalidates it"
        with self.mutex:
            self.in_sync += 1
            self.max_in_sync = max(self.max_in_sync, self.in_sync)
        time.sleep(self.sync_delay)  # the GPU working
        with self.mutex:
            self.in_sync -= 1
            self._run_until(stream, None)
            self.pending.pop(stream, None)

    # -- events ------------------------------------------------------------------------------------
    def event(self) -> dict:
        e = {"id": next(self.ids), "ops": set(), "stream": None, "mark": 0}
        self.events.add(e["id"])
        return e

    def record(self, event: dict, stream: int) -> None:
        with self.mutex:
            self._legacy(stream)
            event["ops"] = set(self.pending.get(stream, {})) | self.waited.get(stream, set())
            event["stream"], event["mark"] = stream, self.last_op.get(stream, 0)

    def wait_event(self, stream: int, event: dict) -> None:
        with self.mutex:
            ops = set(event["ops"])
            self.waited.setdefault(stream, set()).update(ops)
            self.queue(stream, frozenset(), lambda: self._complete(ops))  # runs the event's work first

    def elapsed_ms(self, start: dict, end: dict) -> float:
        """The device time between two events, which must both have completed (cudaErrorNotReady otherwise)."""
        with self.mutex:
            if not (start["ops"] | end["ops"]) <= self.done:
                raise cuda_memory.CudaError("cudaEventElapsedTime failed: cudaErrorNotReady")
            return sum(self.cost[op] for op in range(start["mark"] + 1, end["mark"] + 1)
                       if self.stream_of.get(op) == end["stream"])

    def concurrent(self, op: int, stream: int, memory: object) -> None:
        """What a GPU may do while ``op`` runs: executions queued on other streams, not ordered with it, on
        the same scratch memory run their first half now (writing that scratch under ``op``)."""
        for other, ops in list(self.pending.items()):
            if other == stream or op in self.waited.get(other, set()):
                continue
            for o, mem in list(ops.items()):
                if o in self.writers and mem and memory in mem and o not in self.waited.get(stream, set()):
                    self.writers[o]()

    def destroy_event(self, event: dict) -> None:
        self.events.remove(event["id"])
        self.freed.append("event")

    # -- graphs --------------------------------------------------------------------------------------
    def begin_capture(self, stream: int) -> None:
        assert stream not in self.capturing
        self.capturing.add(stream)
        self.captured[stream] = []
        self.captures += 1

    def capture(self, stream: int, context: FakeContext, touches: frozenset) -> None:
        """An execution recorded (not run) by a capture, with the context's state it bakes in."""
        if self.invalidate_capture:
            self.invalid[stream] = "an operation not permitted under capture"
        self.captured[stream].append({"context": weakref.ref(context), "state": context.state(),
                                      "touches": touches})

    def end_capture(self, stream: int) -> int:
        self.capturing.discard(stream)
        recorded = self.captured.pop(stream)
        if self.invalid.pop(stream, None):
            self.last_error = "cudaErrorStreamCaptureInvalidated"
            raise cuda_memory.CaptureInvalidated("cudaStreamEndCapture failed: cudaErrorStreamCaptureInvalidated")
        if self.fail_instantiate:
            self.last_error = "cudaErrorInvalidValue"
            raise cuda_memory.CudaError("cudaGraphInstantiate failed: cudaErrorInvalidValue")
        g = next(self.ids)
        self.graphs[g] = recorded
        return g

    def launch(self, graph: int, stream: int) -> None:
        assert graph in self.graphs, "launch of a destroyed graph"
        for rec in self.graphs[graph]:
            context = rec["context"]()
            assert context is not None, "a graph replayed after its execution context was destroyed"
            context.on_device()
            if context.state() != rec["state"]:
                raise StaleGraph(f"graph captured with {rec['state']} replayed on a context now at {context.state()}")
            context.enqueue(stream, graph=graph)
        self.launches += 1

    def destroy_graph(self, graph: int) -> None:
        self._busy(f"cudaGraphExecDestroy({graph})", lambda op, mem: self.graph_of.get(op) == graph)
        del self.graphs[graph]
        self.freed.append("graph")


class FakeContext:
    """An execution context with TensorRT's documented contract (see the module docstring). Its enqueue
    computes :func:`expected` of the input it is bound to, through its scratch memory: it writes each
    row's sum there and reads it back, so two contexts on one scratch block running at once give a
    wrong answer (a context running beside an unfinished one on the same memory is also a Race)."""

    def __init__(self, gpu: FakeCuda, engine: object, user_managed: bool, fail_in_capture: bool, rtx: bool,
                 config: object = None) -> None:
        self.gpu, self.engine, self.config = gpu, engine, config
        self.device = gpu.thread_device()
        if self.device is None:
            raise WrongDevice("execution context created with no current CUDA context on this thread")
        self.user_managed, self.rtx, self.fail_in_capture = user_managed, rtx, fail_in_capture
        self.memory: object = None if user_managed else ("own", id(self))
        self.shape: tuple | None = None
        self.addresses: dict[str, int] = {}
        self.profile = 0  # TensorRT selects profile 0 for a new context
        self.changes = 0  # shape, address or profile changes: each one changes the context's internal state
        self.ran: set[tuple] = set()  # shapes whose plain enqueue has run on the device (lazy setup done)
        self.error = engine.error  # TensorRT reports through the runtime's logger

    def on_device(self) -> None:
        here = self.gpu.thread_device()
        if here != self.device:
            raise WrongDevice(f"context of cuda:{self.device} used on a thread whose current device is {here}")

    def state(self) -> tuple:
        """What a captured graph bakes in. Setting a shape back to the captured one does not restore it:
        TensorRT's internal state for the shapes in between has replaced it."""
        return self.shape, tuple(sorted(self.addresses.items())), self.memory, self.profile, self.changes

    def set_device_memory(self, memory: int, size: int) -> None:
        assert self.user_managed, "set_device_memory on a context that allocates its own memory"
        assert memory % 256 == 0 and size >= self.engine.device_memory_size_v2, "scratch too small or misaligned"
        self.memory = memory

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.on_device()
        if not 0 <= index < self.engine.num_optimization_profiles:
            self.error(f"setOptimizationProfileAsync: profile {index} of {self.engine.num_optimization_profiles}")
            return False
        self.changes += index != self.profile
        self.profile = index
        return True

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        shape = tuple(shape)
        if name != "pixel_values" or len(shape) != 4 or shape[1:] != (3, 8, 8) or not 1 <= shape[0] <= MAX_BATCH:
            self.error(f"setInputShape: {shape} is outside the profile")
            return False
        self.changes += shape != self.shape
        self.shape = shape
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if ptr % 256:
            self.error(f"setTensorAddress: {ptr:#x} is not 256-byte aligned")
            return False
        self.changes += self.addresses.get(name) != ptr
        self.addresses[name] = ptr
        return True

    def enqueue(self, stream: int, graph: int | None = None) -> None:
        """Queue this context's kernels on ``stream``, with the shapes and addresses set now."""
        gpu, shape, memory, me = self.gpu, self.shape, self.memory, weakref.ref(self)
        n, in_dtype = shape[0], self.engine.in_dtype
        ptr_in, ptr_out = self.addresses["pixel_values"], self.addresses["logits"]
        holder: dict = {}

        def write() -> None:  # the first half: each row's sum into the scratch memory
            x = gpu.buffer(ptr_in, int(np.prod(shape)) * in_dtype.itemsize).view(in_dtype).reshape(shape)
            gpu.buffer(memory, n * 4).view(np.float32)[:] = expected(x)[:, 0]

        def run() -> None:
            if me() is None:
                raise Busy("an execution context was destroyed while its work was queued")
            write()
            gpu.concurrent(holder["op"], stream, memory)  # whatever runs beside us on this scratch block
            sums = gpu.buffer(memory, n * 4).view(np.float32)
            gpu.buffer(ptr_out, n * 40).view(np.float32).reshape(n, 10)[:] = sums[:, None] + np.arange(10)
            me().ran.add(shape)

        touches = frozenset({memory, ptr_in, ptr_out})
        holder["op"] = gpu.execute(stream, touches, run, (id(self.engine), self.profile), cost=1.0 + n / 100,
                                   graph=graph, writer=write)

    def execute_async_v3(self, stream: int) -> bool:
        self.on_device()
        gpu = self.gpu
        if gpu.last_error:
            self.error(f"an earlier CUDA error: {gpu.last_error}")
            return False
        if self.memory is None or self.shape is None or set(self.addresses) != {"pixel_values", "logits"}:
            return False
        if stream in gpu.capturing:
            touches = frozenset({self.memory, *self.addresses.values()})
            if self.rtx:
                gpu.invalid[stream] = "TensorRT-RTX engine not built with REQUIRE_USER_ALLOCATION"
            elif self.shape not in self.ran:
                gpu.invalid[stream] = "TensorRT's lazy setup inside capture (its first enqueue has not run yet)"
            gpu.capture(stream, self, touches)
            return not self.fail_in_capture
        self.enqueue(stream)
        return True


STRATEGIES = types.SimpleNamespace(STATIC="STATIC", ON_PROFILE_CHANGE="ON_PROFILE_CHANGE", USER_MANAGED="USER_MANAGED")
GRAPH_STRATEGIES = types.SimpleNamespace(DISABLED="DISABLED", WHOLE_GRAPH_CAPTURE="WHOLE_GRAPH_CAPTURE")


class FakeRuntimeCache:
    """TensorRT-RTX's runtime cache: deserialize returns False, and keeps nothing, for a foreign blob."""

    def __init__(self, created: dict) -> None:
        self.loaded = b""
        created["caches"].append(self)

    def deserialize(self, data: bytes) -> bool:
        if not bytes(data).startswith(b"kernels:"):  # another release, GPU or driver: refused, unchanged
            return False
        self.loaded = bytes(data)
        return True

    def serialize(self) -> bytes:
        return b"kernels:" + self.loaded.removeprefix(b"kernels:")


class FakeRuntimeConfig:
    def __init__(self, created: dict) -> None:
        self.created = created
        self.cuda_graph_strategy = GRAPH_STRATEGIES.DISABLED
        self.strategy = STRATEGIES.STATIC
        created["configs"].append(self)

    def create_runtime_cache(self) -> FakeRuntimeCache:
        return FakeRuntimeCache(self.created)

    def set_runtime_cache(self, cache: FakeRuntimeCache) -> None:
        self.cache = cache

    def set_execution_context_allocation_strategy(self, strategy: str) -> None:
        self.strategy = strategy


class FakeInspector:
    """The engine inspector: per-layer information needs every input shape set on its context."""

    execution_context: FakeContext | None = None

    def get_engine_information(self, fmt: str) -> str:
        ctx = self.execution_context
        if ctx is None or ctx.shape is None:
            raise RuntimeError("engine inspector: the context's input shapes are not all specified")
        return json.dumps({"Layers": ["conv", "matmul"], "Bindings": ["pixel_values", "logits"],
                           "shape": list(ctx.shape)})


class OldFakeInspector:
    """TensorRT 10.1-10.9's inspector: the same, its context attribute named ``context``."""

    context: FakeContext | None = None

    def get_engine_information(self, fmt: str) -> str:
        inspector = FakeInspector()
        inspector.execution_context = self.context
        return inspector.get_engine_information(fmt)


class Contexts:
    """The execution contexts an engine created, held weakly as TensorRT's Python objects are by whoever made
    them: a context the runtime drops is destroyed, so its queued work (FakeContext.enqueue) and its graphs
    (FakeCuda.launch) see it gone. ``len``: contexts ever created; iterating: those still alive."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref] = []

    def append(self, ctx: FakeContext) -> None:
        self.refs.append(weakref.ref(ctx))

    def __len__(self) -> int:
        return len(self.refs)

    def __iter__(self):
        return (c for c in (r() for r in self.refs) if c is not None)


def fake_trt(cuda: FakeCuda, flavour: str = "tensorrt_rtx", in_dtype: str = "FLOAT", version: str = "1.7.1.116",
             fail_in_capture: bool = False, profiles: int = 1, old_inspector: bool = False) -> types.SimpleNamespace:
    created: dict = {"runtimes": [], "caches": [], "configs": [], "contexts": Contexts()}
    rtx = flavour == "tensorrt_rtx"
    numpy_in = np.dtype({"HALF": "float16", "UINT8": "uint8"}.get(in_dtype, "float32"))

    class ILogger:
        Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

        def __init__(self) -> None:
            pass

    class Engine:
        num_io_tensors = 2
        device_memory_size_v2 = 1 << 20
        num_optimization_profiles = profiles
        in_dtype = numpy_in

        def __init__(self, logger: object) -> None:
            self.logger = logger

        def error(self, msg: str) -> None:
            self.logger.log(ILogger.Severity.ERROR, msg)

        def get_tensor_name(self, i: int) -> str:
            return ["pixel_values", "logits"][i]

        def get_tensor_mode(self, name: str) -> str:
            return "TensorIOMode.INPUT" if name == "pixel_values" else "TensorIOMode.OUTPUT"

        def get_tensor_profile_shape(self, name: str, profile: int) -> tuple:
            return [1, 3, 8, 8], [2, 3, 8, 8], [MAX_BATCH, 3, 8, 8]

        def get_tensor_dtype(self, name: str) -> str:
            return f"DataType.{in_dtype}" if name == "pixel_values" else "DataType.FLOAT"

        def get_tensor_shape(self, name: str) -> list[int]:
            return [-1, 3, 8, 8] if name == "pixel_values" else [-1, 10]

        def create_runtime_config(self) -> FakeRuntimeConfig:
            return FakeRuntimeConfig(created)

        def create_engine_inspector(self) -> FakeInspector | OldFakeInspector:
            return OldFakeInspector() if old_inspector else FakeInspector()

        def create_execution_context(self, arg: object = None) -> FakeContext:
            config = arg if isinstance(arg, FakeRuntimeConfig) else None
            strategy = config.strategy if config else (arg or STRATEGIES.STATIC)
            ctx = FakeContext(cuda, self, strategy == STRATEGIES.USER_MANAGED, fail_in_capture, rtx, config)
            created["contexts"].append(ctx)
            return ctx

    class Runtime:
        def __init__(self, logger: object) -> None:
            self.engine_host_code_allowed = False
            self.logger = logger
            created["runtimes"].append(self)

        def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
            return Engine(self.logger) if data.startswith(b"fake-engine") else None

    names = dict(__version__=version, ILogger=ILogger, Runtime=Runtime, created=created,
                 ExecutionContextAllocationStrategy=STRATEGIES, LayerInformationFormat=types.SimpleNamespace(JSON="J"))
    if rtx:  # names only TensorRT-RTX has
        names["CudaGraphStrategy"] = GRAPH_STRATEGIES
    return types.SimpleNamespace(**names)


def _sidecar(**over: object) -> EngineSidecar:
    fields = dict(flavour="tensorrt_rtx", trt_version="1.7.1.116", targets=["sm89"], precision="fp32",
                  io=[TensorIO("pixel_values", "input", [-1, 3, 8, 8], "float"),
                      TensorIO("logits", "output", [-1, 10], "float")],
                  profile={"min": [1, 3, 8, 8], "opt": [2, 3, 8, 8], "max": [MAX_BATCH, 3, 8, 8]}, onnx_path="m.onnx")
    fields.update(over)
    return EngineSidecar(**fields)  # type: ignore[arg-type]


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """An engine file + sidecar on disk, and fakes in place of TensorRT, the CUDA layer and the GPU query
    (two RTX 4090s)."""
    state = types.SimpleNamespace(cuda=FakeCuda(), trt_kwargs={}, flavour="tensorrt_rtx")
    state.engine = tmp_path / "m.engine"
    write_engine(state.engine, b"fake-engine-1", _sidecar(), durable=False)

    def import_tensorrt(flavour: str = "auto"):
        state.trt = fake_trt(state.cuda, state.flavour, **state.trt_kwargs)
        return state.trt, state.flavour

    monkeypatch.setattr(tb, "import_tensorrt", import_tensorrt)
    monkeypatch.setattr(tb, "current_gpu", lambda: ("NVIDIA GeForce RTX 4090", "sm89"))
    monkeypatch.setattr(sysinfo, "cuda_devices", lambda: [sysinfo.Gpu(i, "NVIDIA GeForce RTX 4090", "sm89")
                                                          for i in range(2)])
    monkeypatch.setattr(cuda_memory, "device_memory", lambda prefer="auto", device=0: state.cuda.bind(device))
    return state


def _full_trt(fake, version: str = "10.16.1.11") -> None:
    """Make the fixture's engine a full TensorRT one (which the runtime captures graphs for itself)."""
    fake.flavour = "tensorrt"
    fake.trt_kwargs = {**fake.trt_kwargs, "version": version}
    write_engine(fake.engine, b"fake-engine-1", _sidecar(flavour="tensorrt", trt_version=version), durable=False)


def _open(fake, **kw):
    from vitdeploy.engines.tensorrt.runtime import TensorRTRuntime

    return TensorRTRuntime(fake.engine, **kw)


def _x(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 3, 8, 8)).astype(np.float32)


class FakeCudaTensor:
    """Just enough of a torch CUDA tensor for infer_torch (its data lives nowhere)."""

    addresses = itertools.count(0x100000, 0x10000)  # each tensor its own (aligned) memory

    def __init__(self, n: int, dtype: object = None, device: int = 0, ptr: int | None = None,
                 contiguous: bool = True, shape: tuple | None = None) -> None:
        import torch

        self.shape = shape or (n, 3, 8, 8)
        self.dtype = dtype or torch.float32
        self.is_cuda = True
        self.device = torch.device("cuda", device)
        self.layout = torch.strided
        self.ptr = next(self.addresses) if ptr is None else ptr
        self.contiguous_ = contiguous
        nbytes = int(np.prod(self.shape)) * torch.tensor([], dtype=self.dtype).element_size()
        TORCH_MEMORY[self.ptr] = np.zeros(nbytes, np.uint8)  # its device memory

    @classmethod
    def of(cls, x: np.ndarray) -> FakeCudaTensor:
        """A float32 tensor holding ``x`` (as ``torch.from_numpy(x).cuda()`` would)."""
        t = cls(len(x), shape=x.shape)
        TORCH_MEMORY[t.ptr][:] = np.ascontiguousarray(x, np.float32).reshape(-1).view(np.uint8)
        return t

    def numpy(self, gpu: FakeCuda, stream: int = LEGACY_STREAM) -> np.ndarray:
        """Its values, after the work queued on ``stream`` (torch's) so far (as ``.cpu()`` would)."""
        gpu.sync(stream)
        return TORCH_MEMORY[self.ptr].view(np.float32).reshape(self.shape).copy()

    def is_contiguous(self) -> bool:
        return self.contiguous_

    def contiguous(self) -> FakeCudaTensor:  # torch copies a non-contiguous tensor
        return self if self.contiguous_ else FakeCudaTensor(self.shape[0], self.dtype, self.device.index)

    def to(self, dtype: object) -> FakeCudaTensor:  # torch converts (a copy) when the dtype differs
        return self if dtype == self.dtype else FakeCudaTensor(self.shape[0], dtype, self.device.index)

    def data_ptr(self) -> int:
        return self.ptr

    def new_empty(self, shape: tuple, dtype: object) -> FakeCudaTensor:
        return FakeCudaTensor(shape[0], dtype, self.device.index, shape=tuple(shape))


@pytest.fixture
def torch_stream(monkeypatch):
    """torch's current stream: its default stream, CUDA's legacy stream (handle 0), which the runtime must
    order itself with."""
    import torch

    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: types.SimpleNamespace(cuda_stream=LEGACY_STREAM))
    empty = torch.empty

    def cuda_empty(*size, dtype=None, device=None, **kw):  # torch.empty on a CUDA device, without one
        if device is None or torch.device(device).type != "cuda":
            return empty(*size, dtype=dtype, device=device, **kw)
        shape = tuple(size[0]) if len(size) == 1 else size
        return FakeCudaTensor(shape[0], dtype, torch.device(device).index, shape=shape)

    monkeypatch.setattr(torch, "empty", cuda_empty)
    return LEGACY_STREAM


def _threads(*fns) -> None:
    """Run each fn in its own thread, all at once; the first exception (a Race, say) is raised here."""
    errors: list[BaseException] = []

    def run(fn) -> None:
        try:
            fn()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    if errors:
        raise errors[0]


def _in_thread(fn, *args):
    """Run fn in a new thread; its exception (if any) is raised here."""
    out: list = []

    def run() -> None:
        try:
            out.append(("ok", fn(*args)))
        except BaseException as e:
            out.append(("error", e))

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    kind, value = out[0]
    if kind == "error":
        raise value
    return value


# -- ordering of infer and infer_torch ---------------------------------------------------------------
def test_infer_after_infer_torch_is_ordered_on_one_stream(fake, torch_stream):
    rt = _open(fake)
    slot = rt.slots[0]
    producer = fake.cuda.queue(torch_stream)  # a torch kernel still writing the input
    out = rt.infer_torch(FakeCudaTensor(2))
    assert tuple(out.shape) == (2, 10)
    # the context ran on the slot's stream, after the input's producer, and torch's stream waits for it
    (stream, op), = fake.cuda.executions
    assert stream == slot.stream and producer in fake.cuda.waited[slot.stream]
    assert op in fake.cuda.waited[torch_stream]
    # the next host call may not run the context beside the infer_torch execution (a Race otherwise)
    assert rt.infer(_x(3)).shape == (3, 10)
    rt.infer_torch(FakeCudaTensor(4))
    assert rt.infer(_x(1)).shape == (1, 10)
    assert {s for s, _ in fake.cuda.executions} == {slot.stream}
    # the context's addresses are our buffers again after each zero-copy call
    assert slot.context.addresses == {"pixel_values": slot.d_in, "logits": slot.d_out}
    rt.close()


def test_infer_torch_reads_its_input_after_torch_has_written_it(fake, torch_stream):
    """torch's kernel that writes the input is still queued on torch's stream when infer_torch is called: the
    engine must read the input after it (the slot's stream waits for an event on torch's stream), even when
    the slot's stream is synchronized first (close does that). The race check is off: the answer tells."""
    _full_trt(fake)
    rt = _open(fake)
    fake.cuda.check_races = False
    x, t = _x(3), FakeCudaTensor(3)

    def write() -> None:
        TORCH_MEMORY[t.ptr][:] = x.reshape(-1).view(np.uint8)

    fake.cuda.queue(torch_stream, frozenset({t.ptr}), write)  # e.g. torch.from_numpy(x).cuda(), not yet run
    out = rt.infer_torch(t)
    rt.close()  # synchronizes the slot's stream before torch's
    np.testing.assert_allclose(out.numpy(fake.cuda), expected(x), rtol=1e-5)


def test_infer_torch_and_infer_from_threads_never_overlap(fake, torch_stream):
    rt = _open(fake)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(20):
                rt.infer_torch(FakeCudaTensor(2)) if i % 2 else rt.infer(_x(2))
        except BaseException as e:  # a Race
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(fake.cuda.executions) == 80
    rt.close()


# -- CUDA graphs: one context per captured size (issue 17, item 1) -----------------------------------
def test_graphs_replay_only_on_the_shapes_they_were_captured_with(fake, torch_stream):
    """The batcher's sizes change every batch: a graph must never replay after its context ran another
    shape (8, 3, 4, 3, 8; infer splitting 11 rows into 8 + 3; zero-copy calls between), and every
    answer is the engine's."""
    _full_trt(fake)
    rt = _open(fake, cuda_graph=True)
    for n in (8, 3, 4, 3, 8, 11):
        x = _x(n)
        np.testing.assert_allclose(rt.infer(x), expected(x), rtol=1e-5)  # 11: 8 + 3, both replayed
    t = FakeCudaTensor.of(_x(3))
    np.testing.assert_allclose(rt.infer_torch(t).numpy(fake.cuda), expected(_x(3)), rtol=1e-5)
    rt.run_device(0x10000, 0x20000, (5, 3, 8, 8), torch_stream)
    for n in (3, 8, 4):
        np.testing.assert_allclose(rt.infer(_x(n)), expected(_x(n)), rtol=1e-5)
    slot = rt.slots[0]
    assert sorted(slot.graphs) == [3, 4, 8]
    assert fake.cuda.captures == 3 and fake.cuda.launches == 7  # 3, 8; 8 + 3; 3, 8, 4
    # each captured size has its own context, all on the slot's one scratch block
    contexts = [ctx for ctx, _ in slot.graphs.values()] + [slot.context]
    assert len({id(c) for c in contexts}) == 4 and {c.memory for c in contexts} == {slot.scratch}
    assert sorted(c.shape for c, _ in slot.graphs.values()) == [(3, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8)]
    rt.close()
    assert fake.cuda.graphs == {}


def test_a_slot_captures_its_first_max_graphs_sizes_and_runs_others_plainly(fake):
    """No eviction: once a slot holds max_graphs graphs, other sizes run on its plain context (no new
    context, no capture, no host sync while serving), and the captured ones keep replaying."""
    _full_trt(fake)
    rt = _open(fake, cuda_graph=True, max_graphs=2)
    for n in (1, 2, 1, 3, 2, 3, 5):
        np.testing.assert_allclose(rt.infer(_x(n)), expected(_x(n)), rtol=1e-5)
    assert sorted(rt.slots[0].graphs) == [1, 2] and fake.cuda.captures == 2
    assert fake.cuda.launches == 2 and len(fake.trt.created["contexts"]) == 3  # plain + one per graph
    assert len(fake.cuda.graphs) == 2 and "graph" not in fake.cuda.freed
    rt.close()


def test_capture_beside_infer_torch_on_the_legacy_stream(fake, torch_stream):
    """One thread captures (a new size) while another orders its call with torch's default stream, the
    legacy stream: the slot streams do not block on it (cuda_memory makes them non-blocking; checked
    against cudart's rules in test_cuda_python_streams_leave_the_legacy_stream_usable_during_a_capture),
    so neither call fails and no size loses its graph."""
    _full_trt(fake)
    fake.trt_kwargs["profiles"] = 2
    rt = _open(fake, instances=2, cuda_graph=True)
    begin, capturing, go_on = fake.cuda.begin_capture, threading.Event(), threading.Event()

    def begin_and_wait(stream: int) -> None:
        begin(stream)
        capturing.set()
        assert go_on.wait(5)

    fake.cuda.begin_capture = begin_and_wait
    x = _x(4)

    def torch_call() -> None:
        assert capturing.wait(5)
        try:
            np.testing.assert_allclose(rt.infer_torch(FakeCudaTensor.of(x)).numpy(fake.cuda), expected(x), rtol=1e-5)
        finally:
            go_on.set()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a lost capture would warn
        _threads(lambda: np.testing.assert_allclose(rt.infer(_x(3)), expected(_x(3)), rtol=1e-5), torch_call)
    assert rt._no_graph == set() and 3 in (rt.slots[0].graphs | rt.slots[1].graphs)
    rt.close()


def test_the_fake_fails_a_legacy_stream_call_during_a_blocking_capture(fake, torch_stream):
    """What the test above guards against, shown on the fake: blocking streams make that call fail (906)."""
    _full_trt(fake)
    fake.cuda.blocking_streams = True
    rt = _open(fake, cuda_graph=True)
    fake.cuda.begin_capture(rt.slots[0].stream)
    with pytest.raises(cuda_memory.CudaError, match="cudaErrorStreamCaptureImplicit"):
        fake.cuda.record(rt.slots[0].events[4], torch_stream)
    with pytest.raises(cuda_memory.CaptureInvalidated):
        fake.cuda.end_capture(rt.slots[0].stream)


def test_answers_are_read_after_their_copies_and_timing_per_call(fake):
    """Every answer is the engine's function of its own input (a host read before the copy back ends
    sees a stale buffer), and each thread's last_timing is its own call's."""
    _full_trt(fake)
    fake.trt_kwargs["profiles"] = 2
    rt = _open(fake, instances=2)
    assert rt.last_timing == {}
    for n in (1, 8, 2, 2, 5):
        x = _x(n) + n
        np.testing.assert_allclose(rt.infer(x), expected(x), rtol=1e-5)
    rt.close()
    rt = _open(fake)  # one instance: the two calls below take turns on it
    small, big = threading.Barrier(2, timeout=5), {}

    def call(n: int) -> None:
        rt.infer(_x(n))
        small.wait()  # the other thread's call has ended too
        big[n] = dict(rt.last_timing)

    _threads(lambda: call(1), lambda: call(8))
    assert big[1]["h2d_ms"] == pytest.approx(1 * 192 * 4 / 1e4) and big[8]["h2d_ms"] == pytest.approx(8 * 192 * 4 / 1e4)
    assert big[1]["compute_ms"] == pytest.approx(1.01) and big[8]["d2h_ms"] == pytest.approx(8 * 40 / 1e4)
    rt.close()


def test_a_failed_call_leaves_no_timing(fake):
    """last_timing after a call that failed is empty, not the previous call's (bench would report it)."""
    from vitdeploy.engines.base import InputError

    _full_trt(fake)
    rt = _open(fake)
    rt.infer(_x(2))
    assert rt.last_timing["h2d_ms"] > 0
    rt.slots[0].context.execute_async_v3 = lambda stream: False  # TensorRT refuses the enqueue
    with pytest.raises(VitDeployError, match="TensorRT enqueue failed"):
        rt.infer(_x(3))
    assert rt.last_timing == {}
    del rt.slots[0].context.execute_async_v3
    rt.infer(_x(2))
    assert rt.last_timing["h2d_ms"] > 0
    with pytest.raises(InputError, match="does not match"):
        rt.infer(np.zeros((2, 3, 4, 4), np.float32))
    assert rt.last_timing == {}
    rt.close()


def test_close_right_after_a_zero_copy_call_waits_for_it(fake, torch_stream):
    """infer_torch returns before the device has run (ordered by events only): close must let that work
    finish before it frees the scratch memory and destroys the context and stream it uses."""
    _full_trt(fake)
    rt = _open(fake)
    x = _x(3)
    out = rt.infer_torch(FakeCudaTensor.of(x))
    assert fake.cuda.pending[rt.slots[0].stream]  # queued, not run
    rt.close()
    np.testing.assert_allclose(out.numpy(fake.cuda), expected(x), rtol=1e-5)


def test_warm_runs_every_size_on_every_instance_and_serving_then_captures_nothing(fake, torch_stream):
    """verify's warm-up (via Runtime.warm) runs each size on each slot: afterwards no size the warm-up ran
    creates a context or captures while serving, whichever slot a call gets."""
    from vitdeploy.serving.readiness import warm_sizes
    from vitdeploy.verify import warm_up

    _full_trt(fake)
    fake.trt_kwargs["profiles"] = 2
    rt = _open(fake, instances=2, cuda_graph=True)
    sizes = warm_sizes(6, rt)
    warm_up(rt, sizes)
    assert [sorted(s.graphs) for s in rt.slots] == [sizes, sizes]
    contexts, captures = len(fake.trt.created["contexts"]), fake.cuda.captures
    _mixed_load(rt, fake, rounds=3, threads=4)
    for n in sizes:
        np.testing.assert_allclose(rt.infer(_x(n)), expected(_x(n)), rtol=1e-5)
    assert len(fake.trt.created["contexts"]) == contexts and fake.cuda.captures == captures
    rt.close()


@pytest.mark.parametrize("captures_fail", [False, True])
def test_after_warm_up_a_size_not_warmed_never_captures_or_creates_a_context(fake, torch_stream, monkeypatch,
                                                                             captures_fail):
    """With a max batch past WARM_EVERY_SIZE_UP_TO, serve warms 1, the powers of two and the max: fewer sizes
    than the graphs a slot keeps (and fewer still where a warm-up capture failed). Once warmed, a slot
    captures only warmed sizes, so the sizes in between run on its plain context: no capture and no new
    context while serving, and every answer right. Old code: the slots captured 3, 5, 6 and 7 while serving."""
    from vitdeploy.serving import readiness
    from vitdeploy.verify import warm_up

    _full_trt(fake)
    fake.trt_kwargs["profiles"] = 2
    fake.cuda.fail_instantiate = captures_fail
    monkeypatch.setattr(readiness, "WARM_EVERY_SIZE_UP_TO", 2)  # what a max batch above 16 gets, at MAX_BATCH 8
    rt = _open(fake, instances=2, cuda_graph=True)
    sizes = readiness.warm_sizes(MAX_BATCH, rt)
    assert sizes == [1, 2, 4, 8] and len(sizes) < rt.max_graphs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the failed captures' one warning
        warm_up(rt, sizes)
    assert [sorted(s.graphs) for s in rt.slots] == ([[], []] if captures_fail else [sizes, sizes])
    contexts, captures = len(fake.trt.created["contexts"]), fake.cuda.captures
    _mixed_load(rt, fake, rounds=2, threads=4)  # 2..5 from the host, 1..4 zero-copy, on both slots
    for n in range(1, MAX_BATCH + 1):
        np.testing.assert_allclose(rt.infer(_x(n)), expected(_x(n)), rtol=1e-5)
    assert len(fake.trt.created["contexts"]) == contexts and fake.cuda.captures == captures
    rt.close()


class SlotGate:
    """The runtime's queue of free slots, where a thread that has taken its first slot waits (up to 1 s) for a
    second thread to take one too before it goes on: the interleaving in which two callers that each take
    every slot (warm, close) would each hold one and wait forever. A get that finds nothing in 3 s raises
    (queue.Empty) instead of hanging the test."""

    def __init__(self, free) -> None:
        self.free, self.taken, self.both = free, {}, threading.Barrier(2, timeout=1)

    def get(self):
        slot = self.free.get(timeout=3)
        me = threading.get_ident()
        self.taken[me] = self.taken.get(me, 0) + 1
        if self.taken[me] == 1:
            with suppress(threading.BrokenBarrierError):
                self.both.wait()
        return slot

    def put(self, slot) -> None:
        self.free.put(slot)


def test_warm_beside_close_never_holds_half_the_slots(fake):
    """warm and close both take every slot; at once they must not each take some and wait for the rest."""
    _full_trt(fake)
    fake.trt_kwargs["profiles"] = 2
    rt = _open(fake, instances=2)
    rt._free = SlotGate(rt._free)
    outcomes: list[str] = []

    def warm() -> None:
        try:
            rt.warm(_x(2))
            outcomes.append("warmed")
        except VitDeployError as e:  # close went first
            assert "is closed" in str(e)
            outcomes.append("closed before warm")

    def close() -> None:  # once warm has taken a slot
        deadline = time.monotonic() + 5
        while not rt._free.taken and time.monotonic() < deadline:
            time.sleep(0.005)
        rt.close()

    _threads(warm, close)
    assert rt.closed and len(outcomes) == 1 and fake.cuda.allocs == {}


@pytest.mark.parametrize("how", ["instantiate", "begin"])
def test_any_capture_failure_falls_back_once_per_size(fake, how):
    """cudaGraphInstantiate refusing the graph (or any other error of the capture) is a failed capture: that
    size runs without a graph from then on, and is never captured again."""
    _full_trt(fake)
    if how == "instantiate":
        fake.cuda.fail_instantiate = True
    else:
        def refuse(stream: int) -> None:
            fake.cuda.captures += 1
            raise cuda_memory.CudaError("cudaStreamBeginCapture failed: cudaErrorIllegalState")

        fake.cuda.begin_capture = refuse
    rt = _open(fake, cuda_graph=True)
    with pytest.warns(UserWarning, match="CUDA graph capture failed for batch 2 .*(cudaGraphInstantiate|BeginCapture)"):
        for n in (2, 2, 3, 2, 3):
            np.testing.assert_allclose(rt.infer(_x(n)), expected(_x(n)), rtol=1e-5)
    assert fake.cuda.captures == 2 and fake.cuda.capturing == set() and fake.cuda.last_error is None
    assert rt._no_graph == {2, 3} and rt.slots[0].graphs == {} and fake.cuda.graphs == {}
    rt.close()


# -- checked results (item 2) --------------------------------------------------------------------------
def test_shape_outside_the_profile_is_an_error_not_ignored(fake, torch_stream):
    rt = _open(fake)
    assert rt.infer(_x(2)).shape == (2, 10)  # the context now holds shape 2: ignoring the refusal runs that
    with pytest.raises(VitDeployError, match=r"TensorRT refused input shape \(9, 3, 8, 8\) for pixel_values "
                                             r"\(the engine takes \[1\.\.8, 3, 8, 8\]\): setInputShape"):
        rt.run_device(0x10000, 0x20000, (9, 3, 8, 8), torch_stream)
    assert len(fake.cuda.executions) == 1
    assert rt.infer(_x(3)).shape == (3, 10)  # the runtime still works
    rt.close()


def test_misaligned_addresses_are_refused(fake, torch_stream):
    rt = _open(fake)
    for ptrs in ((0x10010, 0x20000), (0x10000, 0x20080)):
        with pytest.raises(VitDeployError, match=r"\(0x[12]\d+\) is not 256-byte aligned, as TensorRT requires"):
            rt.run_device(*ptrs, (2, 3, 8, 8), torch_stream)
    assert fake.cuda.executions == []
    slot = rt.slots[0]
    assert slot.context.addresses == {"pixel_values": slot.d_in, "logits": slot.d_out}
    rt.close()


@pytest.mark.parametrize(("tensor", "message"), [
    (lambda torch: FakeCudaTensor(2, dtype=torch.float16), r"is torch\.float16; the engine takes torch\.float32"),
    (lambda torch: FakeCudaTensor(2, device=1), r"tensor is on cuda:1; this runtime runs on cuda:0"),
    (lambda torch: FakeCudaTensor(2, contiguous=False), r"not a dense contiguous tensor: pass x\.contiguous\(\)"),
    (lambda torch: FakeCudaTensor(2, ptr=0xD010), r"not 256-byte aligned, as TensorRT requires .*x\.clone\(\)"),
    (lambda torch: FakeCudaTensor(2, shape=(2, 3, 8, 9)), r"input shape \(2, 3, 8, 9\) does not match"),
    (lambda torch: FakeCudaTensor(9), r"batch 9 is outside the engine's profile 1\.\.8"),
])
def test_infer_torch_refuses_what_tensorrt_cannot_take(fake, torch_stream, tensor, message):
    import torch

    from vitdeploy.engines.base import InputError

    rt = _open(fake)
    with pytest.raises(InputError, match=message):
        rt.infer_torch(tensor(torch))
    assert fake.cuda.executions == []
    rt.close()


# -- failed capture (item 3) ------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["invalidated", "enqueue refused"])
def test_failed_capture_falls_back_to_plain_enqueue_with_one_warning(fake, how):
    _full_trt(fake)
    if how == "invalidated":
        fake.cuda.invalidate_capture = True
    else:
        fake.trt_kwargs["fail_in_capture"] = True
    rt = _open(fake, cuda_graph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in (2, 2, 3, 2, 3):
            assert rt.infer(_x(n)).shape == (n, 10)
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert "CUDA graph capture failed for batch 2" in str(caught[0].message)
    assert fake.cuda.captures == 2 and fake.cuda.capturing == set()  # each size tried once
    assert fake.cuda.graphs == {} and fake.cuda.last_error is None  # CUDA's error cleared
    assert len(fake.cuda.executions) == 5 and rt.slots[0].graphs == {}
    rt.close()


# -- TensorRT-RTX and graphs (item 4) ---------------------------------------------------------------------
def test_rtx_uses_its_built_in_graphs_instead_of_stream_capture(fake):
    rt = _open(fake, cuda_graph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n in (8, 3, 4, 3, 8):
            rt.infer(_x(n))
    (config,) = fake.trt.created["configs"]
    assert config.cuda_graph_strategy == fake.trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
    assert rt.slots[0].context.config is config and fake.cuda.captures == 0
    rt.close()
    fake.trt_kwargs = {}
    with _open(fake):  # without cuda_graph the strategy stays DISABLED
        pass
    assert fake.trt.created["configs"][0].cuda_graph_strategy == "DISABLED"


def test_rtx_names_the_runtime_uses_exist_in_the_installed_bindings():
    """The fakes model these TensorRT-RTX calls; the installed bindings must have them, with these results."""
    trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX not installed")
    assert trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE != trt.CudaGraphStrategy.DISABLED
    assert isinstance(trt.IRuntimeConfig.cuda_graph_strategy, property)
    assert trt.ExecutionContextAllocationStrategy.USER_MANAGED
    assert hasattr(trt.IExecutionContext, "is_stream_capturable")  # the other way, not taken: see the runtime
    for cls, method in ((trt.IRuntimeCache, "deserialize"), (trt.IExecutionContext, "set_input_shape"),
                        (trt.IExecutionContext, "set_tensor_address")):
        assert "-> bool" in getattr(cls, method).__doc__, f"{cls.__name__}.{method} no longer returns bool"
    assert "256-byte aligned" in trt.IExecutionContext.set_device_memory.__doc__


# -- pycuda (item 5) ----------------------------------------------------------------------------------------
class PyCudaThreads:
    """pycuda's thread rule: a context is current only on the thread that pushed it (a stack per thread)."""

    class LogicError(RuntimeError):
        pass

    def __init__(self, gpu: FakeCuda) -> None:
        self.gpu, self.tls = gpu, threading.local()

    def stack(self) -> list:
        return self.tls.__dict__.setdefault("stack", [])

    def need(self, what: str) -> None:
        if not self.stack():
            raise self.LogicError(f"{what} failed: invalid device context - no currently active context?")


def _pycuda_contexts(threads: PyCudaThreads) -> dict[str, object]:
    class Ctx:
        def __init__(self, dev: int) -> None:
            self.dev = dev

        def push(self) -> None:
            threads.stack().append(self)

    class Context:
        @staticmethod
        def pop() -> None:
            threads.need("cuCtxPopCurrent")
            threads.stack().pop()

    class Device:
        def __init__(self, n: int) -> None:
            self.n = n

        @staticmethod
        def count() -> int:
            return 2

        def retain_primary_context(self) -> Ctx:
            return Ctx(self.n)

        def make_context(self) -> Ctx:
            c = Ctx(self.n)
            c.push()
            return c

    return dict(init=lambda: None, Device=Device, Context=Context, LogicError=threads.LogicError)


def _pycuda_memory(threads: PyCudaThreads) -> dict[str, object]:
    gpu, need = threads.gpu, threads.need

    class Alloc(int):
        def free(self) -> None:
            need("cuMemFree")
            gpu.free(int(self))

    class Stream:
        def __init__(self, flags: int = 0) -> None:
            need("cuStreamCreate")
            self.handle = gpu.stream()

        def synchronize(self) -> None:
            need("cuStreamSynchronize")
            gpu.sync(self.handle)

        def wait_for_event(self, event: Event) -> None:
            need("cuStreamWaitEvent")
            gpu.wait_event(self.handle, event.ev)

    class Event:
        def __init__(self) -> None:
            need("cuEventCreate")
            self.ev = gpu.event()

        def record(self, stream: Stream) -> None:
            need("cuEventRecord")
            gpu.record(self.ev, stream.handle)

        def synchronize(self) -> None:
            need("cuEventSynchronize")
            gpu._complete(self.ev["ops"])

        def time_till(self, other: Event) -> float:
            need("cuEventElapsedTime")
            if not (self.ev["ops"] | other.ev["ops"]) <= gpu.done:  # both events must have completed
                raise threads.LogicError("cuEventElapsedTime failed: device not ready")
            return 0.25

    def mem_alloc(n: int) -> Alloc:
        need("cuMemAlloc")
        return Alloc(gpu.malloc(n))

    def pagelocked_empty(shape: tuple, dtype: object) -> np.ndarray:
        need("cuMemHostAlloc")
        return np.zeros(shape, dtype)

    def memcpy_htod_async(dst: int, src: np.ndarray, stream: Stream) -> None:
        need("cuMemcpyHtoDAsync")
        gpu.htod(int(dst), src, stream.handle)

    def memcpy_dtoh_async(dst: np.ndarray, src: int, stream: Stream) -> None:
        need("cuMemcpyDtoHAsync")
        gpu.dtoh(dst, int(src), stream.handle)

    return dict(mem_alloc=mem_alloc, pagelocked_empty=pagelocked_empty, Stream=Stream, Event=Event,
                memcpy_htod_async=memcpy_htod_async, memcpy_dtoh_async=memcpy_dtoh_async)


def _fake_pycuda(gpu: FakeCuda) -> dict[str, types.ModuleType]:
    """pycuda.driver with its thread rule; ``pycuda.autoinit`` makes a context current on the importing
    thread only. TensorRT, too, needs a current context on the calling thread."""
    threads = PyCudaThreads(gpu)
    driver = types.ModuleType("pycuda.driver")
    for name, value in {**_pycuda_contexts(threads), **_pycuda_memory(threads)}.items():
        setattr(driver, name, value)
    autoinit = types.ModuleType("pycuda.autoinit")
    autoinit.context = driver.Device(0).make_context()
    package = types.ModuleType("pycuda")
    package.driver, package.autoinit = driver, autoinit
    gpu.thread_device = lambda: threads.stack()[-1].dev if threads.stack() else None
    return {"pycuda": package, "pycuda.driver": driver, "pycuda.autoinit": autoinit}


@pytest.fixture
def pycuda(fake, monkeypatch):
    """The real PyCuda layer over a fake pycuda that enforces its per-thread context."""
    _full_trt(fake)
    for name, module in _fake_pycuda(fake.cuda).items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(cuda_memory, "device_memory", REAL_DEVICE_MEMORY)
    return fake


def test_pycuda_runs_calls_from_any_thread(pycuda):
    rt = _open(pycuda, memory="pycuda")
    assert rt.cuda.name == "pycuda"
    for n in (3, 1):  # from the batcher's worker thread, then this one; each answer the engine's
        np.testing.assert_allclose(_in_thread(rt.infer, _x(n)), expected(_x(n)), rtol=1e-5)
        np.testing.assert_allclose(rt.infer(_x(n + 1)), expected(_x(n + 1)), rtol=1e-5)
    _in_thread(rt.close)
    assert pycuda.cuda.allocs == {}


def test_pycuda_close_after_a_failed_call_waits_for_its_copy(pycuda):
    """A call whose enqueue fails leaves its copy in queued on the slot's stream (nothing synchronized it):
    close must let it finish before it frees the buffer it writes."""
    rt = _open(pycuda, memory="pycuda")
    pycuda.cuda.last_error = "cudaErrorLaunchFailure"  # TensorRT's enqueue fails (a sticky CUDA error, say)
    with pytest.raises(VitDeployError, match="TensorRT enqueue failed"):
        rt.infer(_x(2))
    pycuda.cuda.last_error = None
    assert pycuda.cuda.pending[rt.slots[0].stream]  # the copy in, queued
    rt.close()
    assert pycuda.cuda.allocs == {}


def test_pycuda_refuses_cuda_graphs_when_the_runtime_opens(pycuda):
    with pytest.raises(VitDeployError, match=r"--cuda-graph needs CUDA stream capture, which pycuda does not have: "
                                             r"pip install 'vitdeploy\[cuda\]'"):
        _open(pycuda, memory="pycuda", cuda_graph=True)
    assert pycuda.cuda.allocs == {}


# -- devices (item 6) -----------------------------------------------------------------------------------------
def test_engine_runs_on_the_device_asked_for_in_every_thread(fake):
    from vitdeploy.engines import open_runtime

    rt = open_runtime(fake.engine, device="cuda:1")
    assert {c.device for c in fake.trt.created["contexts"]} == {1}
    assert rt.device == 1 and "cuda:1" in rt.describe()

    def from_a_thread_on_device_0() -> np.ndarray:
        fake.cuda.tls.device = 0  # this thread last worked on cuda:0
        return rt.infer(_x(2))

    assert _in_thread(from_a_thread_on_device_0).shape == (2, 10)
    assert rt.infer(_x(3)).shape == (3, 10)
    _in_thread(rt.close)
    assert fake.cuda.allocs == {}


@pytest.mark.parametrize(("device", "message"), [
    ("cpu", r"a TensorRT engine runs on an NVIDIA GPU, not on --device cpu: use --device cuda"),
    ("cuda:2", r"--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0\.\.cuda:1"),
    ("tpu", r"--device 'tpu': a TensorRT engine runs on cuda or cuda:N"),
])
def test_devices_an_engine_cannot_run_on_are_refused(fake, device, message):
    from vitdeploy.engines import open_runtime

    with pytest.raises(VitDeployError, match=message):
        open_runtime(fake.engine, device=device)
    assert fake.cuda.allocs == {}


class OwnContexts:
    """``create_context`` for the fake cuda-python layers: each keeps ``device_of`` (context handle -> device)
    and ``cuCtxSetCurrent``."""

    device_of: dict[int, int]

    def cuCtxSetCurrent(self, ctx: int) -> tuple:
        raise NotImplementedError

    def create_context(self, device: int) -> int:
        """A non-primary context on ``device``, current on this thread (cuCtxCreate; pycuda.autoinit)."""
        ctx = 0x1000 + len(self.device_of)
        self.device_of[ctx] = device
        self.cuCtxSetCurrent(ctx)
        return ctx


class FakeCudart(OwnContexts):
    """cuda-python's runtime and driver modules over CUDA's per-thread rules: a thread has no current
    context until ``cudaSetDevice`` (which creates, once, the device's primary context, handle device + 1:
    each is recorded in ``contexts``) or ``cuCtxSetCurrent``; :meth:`create_context` makes a non-primary one
    current, as ``cuCtxCreate`` (or ``pycuda.autoinit``) does; ``cudaGetDevice`` says the current context's
    device, 0 on a thread without one; streams are blocking unless made
    with ``cudaStreamNonBlocking``; while a blocking stream captures, a call on the legacy stream (0)
    fails with cudaErrorStreamCaptureImplicit (906) and invalidates that capture."""

    cudaStreamNonBlocking = 1

    def __init__(self, count: int = 2) -> None:
        self.count, self.tls = count, threading.local()
        self.contexts: set[int] = set()
        self.blocking: dict[int, bool] = {}
        self.capturing: dict[int, bool] = {}  # stream -> still valid
        self.handles = itertools.count(1)
        self.calls: list[tuple[str, int]] = []
        self.runtime, self.driver = types.ModuleType("cuda.bindings.runtime"), types.ModuleType("cuda.bindings.driver")
        for name in ("cudaGetDeviceCount", "cudaGetDevice", "cudaSetDevice", "cudaStreamCreate",
                     "cudaStreamCreateWithFlags", "cudaStreamBeginCapture", "cudaStreamEndCapture", "cudaEventRecord",
                     "cudaEventCreate", "cudaGraphInstantiate"):
            setattr(self.runtime, name, getattr(self, name))
        self.runtime.cudaStreamNonBlocking = self.cudaStreamNonBlocking
        self.runtime.cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=2)
        self.device_of: dict[int, int] = {d + 1: d for d in range(count)}  # context handle -> its device
        self.driver.cuCtxGetCurrent = lambda: (0, getattr(self.tls, "ctx", 0))  # NULL: 0
        self.driver.cuCtxSetCurrent = self.cuCtxSetCurrent

    def install(self, monkeypatch) -> None:
        bindings = types.ModuleType("cuda.bindings")
        bindings.runtime, bindings.driver = self.runtime, self.driver
        monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", self.runtime)
        monkeypatch.setitem(sys.modules, "cuda.bindings.driver", self.driver)

    def cudaGetDeviceCount(self) -> tuple:
        return 0, self.count

    def cudaGetDevice(self) -> tuple:
        return 0, getattr(self.tls, "device", 0)

    def cudaSetDevice(self, d: int) -> tuple:
        self.calls.append((threading.current_thread().name, d))
        self.contexts.add(d)  # the primary context is created (CUDA 12 and later) and made current
        return self.cuCtxSetCurrent(d + 1)

    def cuCtxSetCurrent(self, ctx: int) -> tuple:
        self.tls.ctx = int(ctx)
        if ctx:
            self.tls.device = self.device_of[int(ctx)]
        elif hasattr(self.tls, "device"):
            del self.tls.device
        return (0,)

    def cudaStreamCreate(self) -> tuple:
        return self.cudaStreamCreateWithFlags(0)

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple:
        s = next(self.handles)
        self.blocking[s] = not flags & self.cudaStreamNonBlocking
        return 0, s

    def cudaEventCreate(self) -> tuple:
        return 0, next(self.handles)

    def cudaStreamBeginCapture(self, stream: int, mode: int) -> tuple:
        self.capturing[stream] = True
        return (0,)

    def cudaStreamEndCapture(self, stream: int) -> tuple:
        return (0, "graph") if self.capturing.pop(stream) else (901, None)

    def cudaGraphInstantiate(self, graph: object, flags: int) -> tuple:
        return 0, "exec"

    def cudaEventRecord(self, event: int, stream: int) -> tuple:
        if stream == 0 and any(self.blocking[s] for s in self.capturing):
            for s in self.capturing:
                self.capturing[s] = not self.blocking[s]
            return (906,)  # cudaErrorStreamCaptureImplicit
        return (0,)


def test_cuda_python_layer_on_a_new_thread_touches_only_its_device(monkeypatch):
    """A cuda:1 layer used from threads that never chose a device: only cuda:1's context is created (setting
    0 "back" would create cuda:0's, pytorch/pytorch#94864) and the thread has no current context again after
    each call; a thread that works on cuda:0 (torch's) gets cuda:0's context back after each call."""
    cudart = FakeCudart()
    cudart.install(monkeypatch)
    layer = REAL_DEVICE_MEMORY("cuda-python", device=1)

    def use() -> None:
        for _ in range(2):
            with layer.activate():
                assert cudart.tls.device == 1
                with layer.activate():  # already current: no switch
                    assert cudart.tls.device == 1
                assert cudart.tls.device == 1

    def new_thread() -> None:
        use()
        assert cudart.driver.cuCtxGetCurrent() == (0, 0)

    _in_thread(new_thread)
    t = threading.Thread(target=new_thread, name="worker")
    t.start()
    t.join()
    assert cudart.contexts == {1}
    assert [d for _, d in cudart.calls] == [1, 1, 1, 1]  # once per outer call: none is left current between

    def torch_thread() -> None:
        cudart.cudaSetDevice(0)  # this thread works on cuda:0
        use()
        assert cudart.tls.device == 0 and cudart.driver.cuCtxGetCurrent() == (0, 1)

    _in_thread(torch_thread)
    assert cudart.contexts == {0, 1}
    with pytest.raises(cuda_memory.CudaError, match=r"cuda:2 does not exist: this machine has 2 CUDA device"):
        REAL_DEVICE_MEMORY("cuda-python", device=2)


def test_cuda_python_layer_gives_a_thread_its_own_non_primary_context_back(monkeypatch):
    """A thread with a context of its own on cuda:1 (cuCtxCreate, pycuda.autoinit) uses a cuda:0 layer: inside,
    cuda:0's primary context is current; afterwards that same context is, and cuda:1's primary context was never
    created. Old code: cudaSetDevice(1) "back" made cuda:1's primary context current (creating it)."""
    cudart = FakeCudart()
    cudart.install(monkeypatch)
    layer = REAL_DEVICE_MEMORY("cuda-python", device=0)

    def own_context() -> None:
        ctx = cudart.create_context(1)
        for _ in range(2):
            with layer.activate():
                assert cudart.driver.cuCtxGetCurrent() == (0, 1) and cudart.cudaGetDevice() == (0, 0)
            assert cudart.driver.cuCtxGetCurrent() == (0, ctx) and cudart.cudaGetDevice() == (0, 1)

    _in_thread(own_context)
    assert cudart.contexts == {0}


def test_cuda_python_streams_leave_the_legacy_stream_usable_during_a_capture(monkeypatch):
    """One thread captures on a slot's stream while another orders its work with torch's default stream
    (the legacy stream, 0): with blocking streams that call fails (906) and the capture is lost."""
    cudart = FakeCudart()
    cudart.install(monkeypatch)
    layer = REAL_DEVICE_MEMORY("cuda-python", device=0)
    capturing, other = layer.stream(), layer.stream()
    layer.begin_capture(capturing)
    layer.record(layer.event(), 0)  # run_device: the caller's stream is torch's default
    layer.record(layer.event(), other)
    assert layer.end_capture(capturing) == cuda_memory.CudaGraph("graph", "exec")
    # what the fake does with a blocking stream (cudaStreamCreate), as the layer made them before
    blocking = int(cudart.cudaStreamCreate()[1])
    layer.begin_capture(blocking)
    with pytest.raises(cuda_memory.CudaError, match="cudaEventRecord failed: 906"):
        layer.record(layer.event(), 0)
    with pytest.raises(cuda_memory.CaptureInvalidated):
        layer.end_capture(blocking)


def test_cuda_python_layer_reports_an_invalidated_capture_and_clears_the_error(monkeypatch):
    last = {"error": 0}
    rt = types.ModuleType("cuda.bindings.runtime")
    rt.cudaGetDeviceCount = lambda: (0, 1)

    def end_capture(stream: int) -> tuple:
        last["error"] = 901
        return 901, None

    def get_last_error() -> tuple:
        err, last["error"] = last["error"], 0
        return (err,)

    rt.cudaStreamEndCapture = end_capture
    rt.cudaGetLastError = get_last_error
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = rt
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", rt)
    layer = REAL_DEVICE_MEMORY("cuda-python")
    with pytest.raises(cuda_memory.CaptureInvalidated, match="cudaErrorStreamCaptureInvalidated"):
        layer.end_capture(5)
    layer.clear_error()
    assert last["error"] == 0


class CudartOverFake(OwnContexts):
    """cuda-python's runtime and driver modules over the computing fake device: the real CudaPython layer's
    calls (cudaMemcpyAsync from pinned host memory, cudaStreamSynchronize, cudaEventRecord,
    cudaStreamWaitEvent, capture, ...) become FakeCuda's queued ops, so a sync or a wait the layer leaves out
    gives a stale answer, a Race or cudaErrorNotReady, as on a GPU. Each thread's current context is a handle
    (device d's primary: d + 1; :meth:`create_context` makes others) whose device is FakeCuda's thread device;
    ``primaries`` records (thread, device) for each primary context ``cudaSetDevice`` made current."""

    def __init__(self, gpu: FakeCuda) -> None:
        self.gpu, self.host = gpu, {}  # pinned address -> the array that owns it
        self.device_of: dict[int, int] = {1: 0, 2: 1}  # context handle -> its device
        self.primaries: set[tuple[str, int]] = set()
        rt = self.runtime = types.ModuleType("cuda.bindings.runtime")
        rt.cudaStreamNonBlocking = 1
        rt.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
        rt.cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=2)
        for name in dir(self):
            if name.startswith("cuda"):
                setattr(rt, name, getattr(self, name))
        self.driver = types.ModuleType("cuda.bindings.driver")
        self.driver.cuCtxGetCurrent = self.cuCtxGetCurrent
        self.driver.cuCtxSetCurrent = self.cuCtxSetCurrent

    def cuCtxGetCurrent(self) -> tuple:
        tls = self.gpu.tls
        return 0, getattr(tls, "ctx", tls.device + 1 if hasattr(tls, "device") else 0)

    def cuCtxSetCurrent(self, ctx: int) -> tuple:
        tls = self.gpu.tls
        if ctx:
            tls.ctx, tls.device = int(ctx), self.device_of[int(ctx)]
        else:
            for name in ("ctx", "device"):
                if hasattr(tls, name):
                    delattr(tls, name)
        return (0,)

    def install(self, monkeypatch) -> None:
        bindings = types.ModuleType("cuda.bindings")
        bindings.runtime, bindings.driver = self.runtime, self.driver
        for name, module in (("cuda.bindings", bindings), ("cuda.bindings.runtime", self.runtime),
                             ("cuda.bindings.driver", self.driver)):
            monkeypatch.setitem(sys.modules, name, module)
        monkeypatch.setattr(cuda_memory, "device_memory", REAL_DEVICE_MEMORY)

    def _view(self, address: int, nbytes: int) -> np.ndarray:
        import ctypes

        return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(address))

    def cudaGetDeviceCount(self) -> tuple:
        return 0, 2

    def cudaGetDevice(self) -> tuple:
        return 0, self.gpu.thread_device()

    def cudaSetDevice(self, device: int) -> tuple:
        self.primaries.add((threading.current_thread().name, device))
        return self.cuCtxSetCurrent(device + 1)

    def cudaGetLastError(self) -> tuple:
        self.gpu.clear_error()
        return (0,)

    def cudaMalloc(self, nbytes: int) -> tuple:
        return 0, self.gpu.malloc(nbytes)

    def cudaFree(self, ptr: int) -> tuple:
        self.gpu.free(ptr)
        return (0,)

    def cudaMallocHost(self, nbytes: int) -> tuple:
        owner = np.zeros(nbytes + 256, np.uint8)
        address = owner.ctypes.data + (-owner.ctypes.data % 256)
        self.host[address] = owner
        return 0, address

    def cudaFreeHost(self, address: int) -> tuple:
        self.gpu._busy("cudaFreeHost", lambda op, mem: op in self.gpu.copies)
        del self.host[address]
        return (0,)

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple:
        s = self.gpu.stream()
        self.gpu.streams[s] = not flags & 1
        return 0, s

    def cudaStreamDestroy(self, stream: int) -> tuple:
        self.gpu.destroy_stream(stream)
        return (0,)

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> tuple:
        if kind == 1:
            self.gpu.htod(dst, self._view(src, nbytes), stream)
        else:
            self.gpu.dtoh(self._view(dst, nbytes), src, stream)
        return (0,)

    def cudaStreamSynchronize(self, stream: int) -> tuple:
        self.gpu.sync(stream)
        return (0,)

    def cudaEventCreate(self) -> tuple:
        return 0, self.gpu.event()

    def cudaEventRecord(self, event: dict, stream: int) -> tuple:
        self.gpu.record(event, stream)
        return (0,)

    def cudaEventElapsedTime(self, start: dict, end: dict) -> tuple:
        return 0, self.gpu.elapsed_ms(start, end)

    def cudaStreamWaitEvent(self, stream: int, event: dict, flags: int) -> tuple:
        self.gpu.wait_event(stream, event)
        return (0,)

    def cudaEventDestroy(self, event: dict) -> tuple:
        self.gpu.destroy_event(event)
        return (0,)

    def cudaStreamBeginCapture(self, stream: int, mode: int) -> tuple:
        self.gpu.begin_capture(stream)
        return (0,)

    def cudaStreamEndCapture(self, stream: int) -> tuple:
        try:
            return 0, self.gpu.end_capture(stream)
        except cuda_memory.CaptureInvalidated:
            return 901, None

    def cudaGraphInstantiate(self, graph: int, flags: int) -> tuple:
        return 0, graph

    def cudaGraphLaunch(self, graph: int, stream: int) -> tuple:
        self.gpu.launch(graph, stream)
        return (0,)

    def cudaGraphExecDestroy(self, graph: int) -> tuple:
        self.gpu.destroy_graph(graph)
        return (0,)

    def cudaGraphDestroy(self, graph: int) -> tuple:
        return (0,)


def test_the_cuda_python_layer_syncs_and_orders_on_a_computing_device(fake, torch_stream, monkeypatch):
    """The runtime through the real CudaPython layer (the default), over cudart calls that queue on the fake
    device: graphs on, two instances, infer and infer_torch from several threads, and every answer is the
    engine's. A stream sync, event record or stream wait the layer dropped would fail here (the other tests
    replace the whole layer with FakeCuda)."""
    _full_trt(fake)
    fake.trt_kwargs["profiles"] = 2
    cudart = CudartOverFake(fake.cuda)
    cudart.install(monkeypatch)
    rt = _open(fake, instances=2, cuda_graph=True, memory="cuda-python")
    assert rt.cuda.name == "cuda-python" and set(fake.cuda.streams.values()) == {False}  # non-blocking
    for n in (3, 8, 3, 1):  # each answer read on the host right after its call: after its copy back
        x = _x(n) + n
        np.testing.assert_allclose(rt.infer(x), expected(x), rtol=1e-5)
        assert rt.last_timing["d2h_ms"] == pytest.approx(n * 40 / 1e4)
    x = _x(2)
    out = rt.infer_torch(FakeCudaTensor.of(x))
    np.testing.assert_allclose(out.numpy(fake.cuda), expected(x), rtol=1e-5)  # torch's stream waited for it
    _mixed_load(rt, fake, rounds=2)
    assert fake.cuda.launches and not rt._no_graph
    out = rt.infer_torch(FakeCudaTensor.of(x))
    rt.close()  # right after a zero-copy call: close waits for its work before freeing what it uses
    np.testing.assert_allclose(out.numpy(fake.cuda), expected(x), rtol=1e-5)
    assert fake.cuda.allocs == {} and fake.cuda.streams == {} and cudart.host == {} and fake.cuda.graphs == {}


def test_a_thread_s_own_cuda_context_is_current_again_after_each_call(fake, torch_stream, monkeypatch):
    """Through the real CudaPython layer: a thread with a non-primary context on cuda:1 (pycuda.autoinit's, or
    cuCtxCreate's) calls a cuda:0 runtime and has that same context current after every call, with right
    answers; a thread with none calls a cuda:1 runtime and only cuda:1 is touched, no context left current.
    Old code: cudaSetDevice(1) "back" left cuda:1's primary context current (creating it)."""
    _full_trt(fake)
    cudart = CudartOverFake(fake.cuda)
    cudart.install(monkeypatch)
    rt = _open(fake, cuda_graph=True, memory="cuda-python")

    def own_context() -> None:
        ctx = cudart.create_context(1)
        for n in (3, 3, 5):
            x = _x(n) + n
            np.testing.assert_allclose(rt.infer(x), expected(x), rtol=1e-5)
            assert cudart.cuCtxGetCurrent() == (0, ctx)
        out = rt.infer_torch(FakeCudaTensor.of(_x(2)))
        assert cudart.cuCtxGetCurrent() == (0, ctx)
        np.testing.assert_allclose(out.numpy(fake.cuda), expected(_x(2)), rtol=1e-5)

    _in_thread(own_context)
    assert fake.cuda.launches == 1 and {d for _, d in cudart.primaries} == {0}
    rt.close()
    cudart.primaries.clear()
    rt = _open(fake, memory="cuda-python", device="cuda:1")

    def no_context() -> None:
        np.testing.assert_allclose(rt.infer(_x(2)), expected(_x(2)), rtol=1e-5)
        assert cudart.cuCtxGetCurrent() == (0, 0)

    _in_thread(no_context)
    rt.close()
    assert {d for _, d in cudart.primaries} == {1}


# -- several contexts on one engine ----------------------------------------------------------------------
def _mixed_load(rt, fake, rounds: int = 5, threads: int = 4) -> None:
    """infer and infer_torch from several threads at once; every answer checked."""
    def host(i: int) -> None:
        x = _x(i + 2)
        np.testing.assert_allclose(rt.infer(x), expected(x), rtol=1e-5)

    def device(i: int) -> None:
        x = _x(i + 1)
        out = rt.infer_torch(FakeCudaTensor.of(x))
        np.testing.assert_allclose(out.numpy(fake.cuda), expected(x), rtol=1e-5)

    for _ in range(rounds):
        _threads(*[(lambda i=i: device(i)) if i % 2 else (lambda i=i: host(i)) for i in range(threads)])


def test_instances_keep_several_batches_in_flight(fake, torch_stream):
    """Two threads, two instances: both calls are on the GPU at once (each waits in sync for the other),
    on two streams with their own buffers, scratch and optimization profile, and nothing races."""
    _full_trt(fake)
    fake.trt_kwargs["profiles"] = 2
    rt = _open(fake, instances=2, cuda_graph=True)
    assert rt.instances == 2 and "2 instances" in rt.describe()
    both_in_flight = threading.Barrier(2, timeout=5)
    sync = fake.cuda.sync

    def sync_when_both_are_in_flight(stream: int) -> None:
        if stream not in fake.cuda.capturing and fake.cuda.pending.get(stream):
            both_in_flight.wait()
        sync(stream)

    fake.cuda.sync = sync_when_both_are_in_flight
    outs = {}
    threads = [threading.Thread(target=lambda n=n: outs.__setitem__(n, rt.infer(_x(n)))) for n in (3, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outs) == [3, 5] and not both_in_flight.broken
    for n, out in outs.items():
        np.testing.assert_allclose(out, expected(_x(n)), rtol=1e-5)
    fake.cuda.sync = sync
    a, b = rt.slots
    assert len({a.stream, b.stream}) == 2 and not {a.d_in, a.d_out, a.scratch} & {b.d_in, b.d_out, b.scratch}
    _mixed_load(rt, fake)  # no Race, no stale graph, no two contexts on one profile at once
    contexts = fake.trt.created["contexts"]
    assert {c.profile for c in contexts if c.memory == a.scratch} == {0}
    assert {c.profile for c in contexts if c.memory == b.scratch} == {1}  # its graph contexts too
    rt.close()
    assert fake.cuda.allocs == {} and fake.cuda.streams == {}


def test_more_instances_than_profiles_is_refused_with_the_rebuild(fake):
    _full_trt(fake)
    with pytest.raises(VitDeployError, match=r"m\.engine has 1 optimization profile\(s\); 2 instances need one each "
                                             r".*rebuild with `vitdeploy build m\.onnx --instances 2`"):
        _open(fake, instances=2)
    assert fake.cuda.allocs == {}


def test_serve_instances_on_an_engine_with_fewer_profiles_is_one_line_with_the_rebuild(fake):
    """`serve --instances 2` on a dynamic-batch engine built with one profile: exit 1, one line, the rebuild."""
    import socket

    from click.testing import CliRunner

    from vitdeploy.cli import main

    _full_trt(fake)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = CliRunner().invoke(main, ["serve", "-m", str(fake.engine), "--instances", "2", "--no-verify",
                                  "--port", str(port)])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert "1 optimization profile(s); 2 instances need one each" in r.output
    assert "rebuild with `vitdeploy build m.onnx --instances 2`" in r.output and "Traceback" not in r.output
    assert fake.cuda.allocs == {}


def test_two_contexts_on_one_profile_in_flight_are_caught(fake):
    """The fake's check itself: an engine with one profile and two slots forced onto it."""
    _full_trt(fake)
    fake.trt_kwargs["profiles"] = 2
    rt = _open(fake, instances=2)
    rt.slots[1].context.set_optimization_profile_async(0, rt.slots[1].stream)
    a, b = rt.slots
    for slot in (a, b):
        rt._bind(slot.context, slot.d_in, slot.d_out)
        rt._set_shape(slot.context, (2, 3, 8, 8))
    with fake.cuda.activate():
        rt._execute(a.context, a.stream)
        with pytest.raises(ProfileClash, match="two contexts on optimization profile 0 run at once"):
            rt._execute(b.context, b.stream)
    rt.close()


def test_two_contexts_sharing_scratch_at_once_give_a_wrong_answer(fake):
    """The fake's value model: without the race check, two contexts on one scratch block running at once
    (two streams, nothing ordering them) corrupt each other's result."""
    _full_trt(fake)
    fake.trt_kwargs["profiles"] = 2
    rt = _open(fake, instances=2)
    fake.cuda.check_races = False
    a, b = rt.slots
    b.context.set_device_memory(a.scratch, 1 << 20)  # b shares a's scratch
    xa, xb = _x(2), 2 * _x(2) + 1
    with fake.cuda.activate():
        for slot, x in ((a, xa), (b, xb)):
            slot.h_in[:2] = x
            fake.cuda.htod(slot.d_in, slot.h_in[:2], slot.stream)
            rt._set_shape(slot.context, (2, 3, 8, 8))
            rt._execute(slot.context, slot.stream)
            fake.cuda.dtoh(slot.h_out[:2], slot.d_out, slot.stream)
        fake.cuda.sync(a.stream)
        fake.cuda.sync(b.stream)
    assert not np.allclose(a.h_out[:2], expected(xa))  # a read b's sums from the shared scratch
    rt.close()


def test_the_fake_catches_a_context_dropped_with_its_work_queued(fake):
    """The fake's check itself: TensorRT destroys a context whose Python object goes; work it queued then runs
    on a destroyed context (Busy), and a graph captured from it cannot be replayed."""
    _full_trt(fake)
    rt = _open(fake)
    slot = rt.slots[0]
    with fake.cuda.activate():
        ctx = rt._new_context(slot)
        rt._set_shape(ctx, (2, 3, 8, 8))
        rt._execute(ctx, slot.stream)
        del ctx
        with pytest.raises(Busy, match="execution context was destroyed while its work was queued"):
            fake.cuda.sync(slot.stream)
        fake.cuda.sync(slot.stream)  # that op is gone: the stream is idle again
    rt.close()


# -- close -------------------------------------------------------------------------------------------
def test_close_frees_everything_once_and_later_calls_fail_clearly(fake, torch_stream):
    _full_trt(fake)
    rt = _open(fake, cuda_graph=True)
    rt.infer(_x(2))
    rt.infer(_x(3))  # two captured graphs
    assert len(fake.cuda.graphs) == 2
    rt.close()
    rt.close()  # idempotent
    assert fake.cuda.allocs == {} and fake.cuda.streams == {} and fake.cuda.events == set()
    assert fake.cuda.graphs == {} and fake.cuda.pinned_arrays == []
    assert sorted(fake.cuda.freed) == sorted(["graph"] * 2 + ["event"] * 6 + ["stream"] + ["device"] * 3 + ["pinned"])
    assert rt.engine is None and rt.runtime is None and rt.slots[0].context is None
    for call in (lambda: rt.infer(_x(1)), lambda: rt.infer_torch(FakeCudaTensor(1))):
        with pytest.raises(VitDeployError, match=r"runtime for m\.engine is closed"):
            call()


def test_close_waits_for_a_call_in_flight(fake):
    rt = _open(fake)
    slot = rt._free.get()  # a call in flight holds the slot
    closer = threading.Thread(target=rt.close)
    closer.start()
    time.sleep(0.1)
    assert closer.is_alive() and fake.cuda.freed == []  # nothing freed under the running call
    rt._free.put(slot)
    closer.join(5)
    assert not closer.is_alive() and "device" in fake.cuda.freed


def test_context_manager_saves_runtime_cache_atomically(fake, tmp_path):
    (tmp_path / "m.rtcache").write_bytes(b"kernels:old")
    with _open(fake) as rt:
        assert fake.trt.created["caches"][0].loaded == b"kernels:old"
        rt.infer(_x(1))
    assert (tmp_path / "m.rtcache").read_bytes() == b"kernels:old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "m.json", "m.rtcache"]  # no temp files
    # a runtime whose engine was rebuilt meanwhile does not write its (old engine's) cache over
    rt = _open(fake)
    write_engine(fake.engine, b"fake-engine-2", _sidecar(), durable=False)
    assert not (tmp_path / "m.rtcache").exists()  # the rebuild dropped the old cache
    rt.close()
    assert not (tmp_path / "m.rtcache").exists()


def test_runtime_cache_another_release_made_is_reported_and_replaced(fake, tmp_path):
    (tmp_path / "m.rtcache").write_bytes(b"from another driver")
    with pytest.warns(UserWarning, match=r"ignoring runtime cache m\.rtcache \(made by another TensorRT-RTX, GPU "
                                         r"or driver\): kernels compile again"):
        rt = _open(fake)
    rt.close()
    assert (tmp_path / "m.rtcache").read_bytes() == b"kernels:"


def test_runtime_cache_only_for_tensorrt_rtx(fake, tmp_path):
    _full_trt(fake)
    with _open(fake):
        pass
    assert not (tmp_path / "m.rtcache").exists() and fake.trt.created["caches"] == []


@pytest.mark.parametrize("old_inspector", [False, True])
def test_engine_layers_sets_the_input_shape_before_inspecting(fake, old_inspector):
    """Also with TensorRT before 10.10 (the floor is 10.1), whose inspector names its context ``context``."""
    from vitdeploy.engines.tensorrt.runtime import engine_layers

    fake.trt_kwargs["old_inspector"] = old_inspector
    info = engine_layers(fake.engine)
    assert info["Layers"] == ["conv", "matmul"] and info["shape"] == [2, 3, 8, 8]  # the profile's opt
    assert fake.cuda.allocs == {}


# -- failures ----------------------------------------------------------------------------------------
def test_failing_init_frees_what_it_allocated(fake):
    fake.cuda.fail_malloc_at = 2  # d_in allocated, d_out fails
    with pytest.raises(cuda_memory.CudaError, match="cudaErrorMemoryAllocation"):
        _open(fake)
    assert fake.cuda.mallocs == 2 and fake.cuda.allocs == {} and fake.cuda.streams == {}


def test_corrupt_engine_is_refused_and_nothing_leaks(fake):
    write_engine(fake.engine, b"not an engine", _sidecar(), durable=False)
    with pytest.raises(VitDeployError, match=r"TensorRT could not load .*rebuild it with `vitdeploy build`"):
        _open(fake)
    assert fake.cuda.allocs == {} and fake.cuda.streams == {}


def test_bf16_io_is_refused_by_name(fake):
    fake.trt_kwargs = {"in_dtype": "BF16"}
    with pytest.raises(VitDeployError, match=r"'pixel_values' is bf16: .*export with float32"):
        _open(fake)
    assert fake.cuda.allocs == {}


def test_engine_from_another_build_is_refused(fake, tmp_path):
    fake.engine.write_bytes(b"fake-engine-from-elsewhere")  # same name, another build's engine
    with pytest.raises(VitDeployError, match=r"m\.engine does not match its sidecar m\.json .*different builds"):
        _open(fake)


def test_reader_completes_a_publish_killed_between_its_renames(tmp_path):
    engine = tmp_path / "m.engine"
    write_engine(engine, b"fake-engine-1", _sidecar(), durable=False)
    old_json = (tmp_path / "m.json").read_text()
    # what a build killed after renaming its engine leaves: the new engine, the old sidecar, the new one staged
    staged = tmp_path / ".vitdeploy-m.engine.abc123"
    staged.mkdir()
    new = write_engine(staged / "m.engine", b"fake-engine-2", _sidecar(precision="fp16"), durable=False)
    os.replace(staged / "m.engine", engine)
    assert (tmp_path / "m.json").read_text() == old_json
    side = EngineSidecar.read(engine)
    assert side == new and side.precision == "fp16"
    assert EngineSidecar.read(engine, verify=False) == new  # completed on disk, not only in memory
    # a staged sidecar for another engine is never taken
    engine.write_bytes(b"fake-engine-3")
    with pytest.raises(VitDeployError, match="does not match its sidecar"):
        EngineSidecar.read(engine)


def test_publish_removes_only_old_leftovers_of_killed_builds(tmp_path):
    engine = tmp_path / "m.engine"
    old, fresh = tmp_path / ".vitdeploy-m.engine.old1", tmp_path / ".vitdeploy-m.engine.new1"
    for folder in (old, fresh):
        folder.mkdir()
        (folder / "m.engine").write_bytes(b"x" * 100)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    write_engine(engine, b"fake-engine-1", _sidecar(), durable=False)
    assert not old.exists() and fresh.exists()  # a build publishing beside us keeps its folder


# -- version rules (item 8) ----------------------------------------------------------------------------
@pytest.mark.parametrize(("built", "here", "compatible", "ok"), [
    ("10.9.0.34", "10.16.1.11", True, True),  # a later runtime (as strings, "10.16" < "10.9")
    ("10.16.1.11", "11.4.0.106", True, True),  # 10 -> 11
    ("8.6.1.6", "10.16.1.11", True, True),  # 8 -> 10
    ("11.1.0.1", "11.4.0.106", True, True),  # later 11.x
    ("8.6.1.6", "11.4.0.106", True, False),  # 8 -> 11: not supported
    ("9.3.0.1", "10.16.1.11", True, False),  # 9 -> 10: not supported
    ("10.16.1.11", "12.0.0.1", True, False),  # two majors on, or a major TensorRT has not promised
    ("11.4.0.106", "10.16.1.11", True, False),  # an older major
    ("10.16.1.11", "10.9.0.34", True, False),  # an older runtime (as strings, "10.9" > "10.16")
    ("10.16.1.11", "10.16.1.11", False, True),
    ("10.16.1", "10.16.1.0", False, True),  # the same version, written two ways
    ("10.9.0.34", "10.16.1.11", False, False),  # not version-compatible: exactly this version
])
def test_version_rules(built, here, compatible, ok):
    from vitdeploy.engines.tensorrt.runtime import check_compatible

    side = _sidecar(flavour="tensorrt", trt_version=built, options={"version_compatible": compatible})
    if ok:
        check_compatible(side, "tensorrt", here, ("NVIDIA L4", "sm89"))
    else:
        with pytest.raises(VitDeployError, match=f"built with tensorrt {built}.*this is {here}: rebuild"):
            check_compatible(side, "tensorrt", here, ("NVIDIA L4", "sm89"))


@pytest.mark.parametrize("compatible", [False, True])
def test_rtx_engines_run_only_on_the_release_that_built_them(compatible):
    from vitdeploy.engines.tensorrt.runtime import check_compatible

    side = _sidecar(trt_version="1.7.1.116", options={"version_compatible": compatible})
    check_compatible(side, "tensorrt_rtx", "1.7.1.116", ("NVIDIA GeForce RTX 4090", "sm89"))
    with pytest.raises(VitDeployError, match=r"built with tensorrt_rtx 1\.7\.1\.116; this is 1\.8\.0\.12: TensorRT-RTX "
                                             r"engines run only on the release that built them: rebuild"):
        check_compatible(side, "tensorrt_rtx", "1.8.0.12", ("NVIDIA GeForce RTX 4090", "sm89"))


@pytest.mark.parametrize("compatible", [False, True])
def test_host_code_allowed_only_for_version_compatible_engines(fake, compatible):
    write_engine(fake.engine, b"fake-engine-1", _sidecar(options={"version_compatible": compatible}), durable=False)
    with _open(fake):
        pass
    assert fake.trt.created["runtimes"][0].engine_host_code_allowed is compatible


# -- GPU flavour and refusal texts (issue 11: a stubbed GPU) -------------------------------------------
def test_rtx_engine_on_hopper_says_full_tensorrt_not_a_rebuild_that_cannot_work():
    from vitdeploy.engines.tensorrt.runtime import check_compatible

    for gpu in (("NVIDIA H200", "sm90"), ("NVIDIA B200", "sm100"), ("NVIDIA GB300", "sm103")):
        with pytest.raises(VitDeployError) as e:
            check_compatible(_sidecar(), "tensorrt_rtx", "1.7.1.116", gpu)
        msg = str(e.value)
        assert f"TensorRT-RTX cannot run on {gpu[1]} ({gpu[0]}); build with full TensorRT" in msg
        assert "--trt tensorrt" in msg and "--compute-capability" not in msg


def test_refusals_advise_a_rebuild_that_works():
    from vitdeploy.engines.tensorrt.runtime import check_compatible

    check_compatible(_sidecar(), "tensorrt_rtx", "1.7.1.116", ("NVIDIA GeForce RTX 4090", "sm89"))
    with pytest.raises(VitDeployError, match=r"built for sm89; this GPU is RTX A6000 \(sm86\): rebuild with "
                                             r"`vitdeploy build m\.onnx` --trt rtx --compute-capability sm86"):
        check_compatible(_sidecar(), "tensorrt_rtx", "1.7.1.116", ("RTX A6000", "sm86"))
    full = _sidecar(flavour="tensorrt", trt_version="10.16.1.11", targets=["sm89"])
    with pytest.raises(VitDeployError, match=r"this GPU is NVIDIA H100 \(sm90\): .*--trt tensorrt on this GPU"):
        check_compatible(full, "tensorrt", "10.16.1.11", ("NVIDIA H100", "sm90"))
    check_compatible(_sidecar(flavour="tensorrt", trt_version="10.16.1.11", options={"hardware_compat": "ampere+"}),
                     "tensorrt", "10.16.1.11", ("NVIDIA H100", "sm90"))
    with pytest.raises(VitDeployError, match=r"this machine has tensorrt 10\.16"):
        check_compatible(_sidecar(), "tensorrt", "10.16.1.11", ("NVIDIA L4", "sm89"))
    with pytest.raises(VitDeployError, match="needs an NVIDIA GPU"):
        check_compatible(_sidecar(), "tensorrt_rtx", "1.7.1.116", None)


def test_the_declared_tensorrt_floor_has_what_the_runtime_calls():
    """device_memory_size_v2 and set_device_memory(ptr, size) arrived in TensorRT 10.1 (NvInferRuntime.h; the
    10.0.1 bindings lack both, the 10.1.0 ones have them: ../shared/tools/trt_api_check.py's wheels), and the
    runtime calls both for every full-TensorRT engine: the `tensorrt` extra must not promise 10.0."""
    from pathlib import Path

    import tomllib
    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    (req,) = [Requirement(r) for r in project["optional-dependencies"]["tensorrt"] if r.startswith("tensorrt")]
    assert not req.specifier.contains(Version("10.0.1")) and req.specifier.contains(Version("10.1.0")), req


def _fake_cudart(count: int = 1, name: bytes = b"NVIDIA H200\x00\x00", cc: tuple[int, int] = (9, 0)):
    mod = types.ModuleType("cuda.cudart")
    mod.cudaGetDeviceCount = lambda: (0, count)
    mod.cudaGetDeviceProperties = lambda i: (0, types.SimpleNamespace(name=name, major=cc[0], minor=cc[1]))
    return mod


def test_current_gpu_through_the_old_cuda_python_layout(monkeypatch):
    """cuda-python before 12.6 has ``cuda.cudart`` and no ``cuda.bindings``: device_memory takes it, and so
    must the GPU query."""
    cuda_pkg = types.ModuleType("cuda")
    cuda_pkg.cudart = _fake_cudart()
    cuda_pkg.cuda = types.ModuleType("cuda.cuda")  # the driver module of that layout
    monkeypatch.setitem(sys.modules, "cuda", cuda_pkg)
    monkeypatch.setitem(sys.modules, "cuda.cudart", cuda_pkg.cudart)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "torch", None)  # no fallback to torch
    assert tb.current_gpu() == ("NVIDIA H200", "sm90")
    assert cuda_memory.device_memory("cuda-python").rt is cuda_pkg.cudart


def test_current_gpu_through_cuda_bindings(monkeypatch):
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = _fake_cudart(name=b"NVIDIA GeForce RTX 5090", cc=(12, 0))
    cuda_pkg = types.ModuleType("cuda")
    cuda_pkg.bindings = bindings
    monkeypatch.setitem(sys.modules, "cuda", cuda_pkg)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", bindings.runtime)
    assert tb.current_gpu() == ("NVIDIA GeForce RTX 5090", "sm120")


# -- on a GPU --------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_tensorrt_engine_matches_onnxruntime_on_gpu(request, tmp_path):
    """Build with a flavour that runs on this GPU (by compute capability), two profiles (--instances 2),
    then, with graphs off and on and one or two instances, alternate batch sizes (8, 3, 4, 3, 8, and
    11 = 8 + 3) and call infer and infer_torch from two threads at once: every answer matches ONNX
    Runtime's."""
    import importlib.util

    from vitdeploy.engines import open_runtime
    from vitdeploy.sysinfo import TRT_FLAVOURS, trt_flavours_for

    gpu = tb.current_gpu()
    if gpu is None:
        pytest.skip("needs an NVIDIA GPU to run an engine (none visible: no driver or no device)")
    runnable = [f for f in trt_flavours_for(gpu[1]) if importlib.util.find_spec(f)]
    if not runnable:
        wanted = " or ".join(TRT_FLAVOURS[f] for f in trt_flavours_for(gpu[1]))
        pytest.skip(f"{gpu[0]} ({gpu[1]}) runs engines of {wanted}, which is not installed here")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("infer_torch needs torch with CUDA")
    digits_onnx = request.getfixturevalue("digits_onnx")  # after the skips: exporting takes a while
    flavour = {"tensorrt": "tensorrt", "tensorrt_rtx": "rtx"}[runnable[0]]
    tb.build_engine(digits_onnx["fp16"], tmp_path / "m.engine", tb.BuildOptions(flavour=flavour, max_batch=8,
                                                                              instances=2))
    with open_runtime(digits_onnx["fp16"]) as ort:
        x = np.random.default_rng(0).standard_normal((11, *ort.spec.shape)).astype(np.float32)
        ref = ort.infer(x)
    sizes = (8, 3, 4, 3, 8, 11)
    for graph, instances in ((False, 1), (True, 1), (False, 2), (True, 2)):
        with open_runtime(tmp_path / "m.engine", cuda_graph=graph, instances=instances) as rt:
            def host(rt=rt) -> list[float]:
                return [float(np.abs(rt.infer(x[:n]) - ref[:n]).max()) for n in sizes]

            def device(rt=rt) -> list[float]:
                errs = []
                for n in sizes[:-1]:
                    out = rt.infer_torch(torch.from_numpy(x[:n]).cuda().to(getattr(torch, rt.spec.dtype)))
                    assert out.is_cuda and out.shape == (n, 10)
                    errs.append(float(np.abs(out.float().cpu().numpy() - ref[:n]).max()))
                return errs

            results: dict[str, list[float]] = {}
            threads = [threading.Thread(target=lambda f=f, k=k, r=results: r.__setitem__(k, f()))
                       for k, f in (("host", host), ("device", device))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert set(results) == {"host", "device"}, "a thread failed (see its traceback above)"
            assert max(results["host"] + results["device"]) < 5e-2, (graph, instances, results)
            assert max(host()) < 5e-2  # and once more from this thread, after the zero-copy calls
        with pytest.raises(VitDeployError, match="is closed"):
            rt.infer(x[:1])
    if runnable[0] == "tensorrt_rtx":
        assert (tmp_path / "m.rtcache").is_file()


NEW_THREAD_ON_LAST_GPU = r"""
import sys, threading
import numpy as np
from cuda.bindings import driver
from vitdeploy.engines import open_runtime

engine, x_path, ref_path, last = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
x, ref = np.load(x_path), np.load(ref_path)
out = {}

def work():
    with open_runtime(engine, device=f"cuda:{last}", instances=2, cuda_graph=True) as rt:
        out["err"] = max(float(np.abs(rt.infer(x[:n]) - ref[:n]).max()) for n in (1, 3, 8, 3))
    err, ctx = driver.cuCtxGetCurrent()
    out["current"] = int(ctx)  # NULL: the thread had no context before its calls, and has none after

t = threading.Thread(target=work)
t.start()
t.join()
driver.cuInit(0)
active = {}
for i in range(last + 1):
    err, flags, state = driver.cuDevicePrimaryCtxGetState(i)
    active[i] = bool(state)
print(out["err"], out["current"], sorted(i for i, a in active.items() if a))
"""


@pytest.mark.gpu
def test_a_runtime_on_the_last_gpu_from_a_new_thread_touches_only_that_gpu(request, tmp_path):
    """In a fresh process, a runtime on the last GPU opened and used from a new thread (graphs on, two
    instances): its answers match ONNX Runtime's, the only primary context created is that GPU's (a
    switch "back" to cuda:0 would create cuda:0's; on a one-GPU machine that is the same device), and the
    thread has no current context afterwards, as before its calls."""
    import importlib.util
    import subprocess

    from vitdeploy.engines import open_runtime

    gpu = tb.current_gpu()
    if gpu is None:
        pytest.skip("needs an NVIDIA GPU to run an engine (none visible: no driver or no device)")
    if importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("cuda.bindings") is None:
        pytest.skip("needs full TensorRT and cuda-python (cuda.bindings) installed")
    last = len(sysinfo.cuda_devices()) - 1
    digits_onnx = request.getfixturevalue("digits_onnx")
    tb.build_engine(digits_onnx["fp16"], tmp_path / "m.engine",
                    tb.BuildOptions(flavour="tensorrt", max_batch=8, instances=2))  # built on cuda:0: same model
    with open_runtime(digits_onnx["fp16"]) as ort:
        x = np.random.default_rng(1).standard_normal((8, *ort.spec.shape)).astype(np.float32)
        np.save(tmp_path / "x.npy", x)
        np.save(tmp_path / "ref.npy", ort.infer(x))
    (tmp_path / "child.py").write_text(NEW_THREAD_ON_LAST_GPU)
    done = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "m.engine"),
                           str(tmp_path / "x.npy"), str(tmp_path / "ref.npy"), str(last)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    err, current, active = done.stdout.split(maxsplit=2)
    assert float(err) < 5e-2 and int(current) == 0, done.stdout
    assert active.strip() == str([last]), f"primary contexts created: {active} (only cuda:{last} expected)"
