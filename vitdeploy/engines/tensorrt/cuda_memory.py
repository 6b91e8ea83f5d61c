"""A small device-memory layer for the TensorRT runtime: cuda-python (default) or pycuda.

Only what the runtime needs: device and pinned host buffers, a stream, async copies, events for
timing and for ordering two streams, and CUDA-graph capture; and the matching destroy call for each
thing it creates. Both implementations raise :class:`CudaError` with the CUDA error name, so a
machine without a driver fails with one clear line.

A layer is bound to one device (``cuda:N``). CUDA's current device and pycuda's current context
belong to a thread, so every call into the layer or into TensorRT runs inside ``with
layer.activate():``, on whichever thread makes it: cuda-python selects the device there
(``cudaSetDevice``, per thread, then the thread's own context again, through the driver API), pycuda
pushes its context there and pops it after. Streams are non-blocking (ordered with others by events). pycuda has no
stream capture (``can_capture`` is False): its runtime refuses ``--cuda-graph``.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitdeploy.errors import VitDeployError


class CudaError(VitDeployError):
    pass


class CaptureInvalidated(CudaError):
    """cudaStreamEndCapture reported cudaErrorStreamCaptureInvalidated: the capture ended, no graph."""


_CAPTURE_INVALIDATED = 901  # cudaErrorStreamCaptureInvalidated


@dataclass
class CudaGraph:
    """A captured graph and its executable instance (both destroyed by ``destroy_graph``)."""

    graph: Any
    exec: Any


def _driver() -> Any:
    """cuda-python's driver module in either layout (``cuda.bindings.driver``, or ``cuda.cuda`` before 12.6)."""
    try:
        from cuda.bindings import driver  # type: ignore[import-not-found]
    except ImportError:
        from cuda import cuda as driver  # type: ignore[import-not-found,no-redef]
    return driver


class CudaPython:
    """NVIDIA's cuda-python runtime bindings (``cuda.bindings.runtime``, or ``cuda.cudart``)."""

    name = "cuda-python"
    can_capture = True

    def __init__(self, device: int = 0) -> None:
        from vitdeploy.sysinfo import cudart as find_cudart

        cudart = find_cudart()
        if cudart is None:
            raise ImportError("cuda-python is not installed")
        self.rt = cudart
        self.driver = _driver()
        self.device = device
        self._primary: int | None = None  # the handle of this device's primary context, once seen
        self._pinned: list[int] = []
        err, count = cudart.cudaGetDeviceCount()
        self._check(err, "cudaGetDeviceCount")
        if count == 0:
            raise CudaError("no CUDA device found")
        if not 0 <= device < count:
            raise CudaError(f"cuda:{device} does not exist: this machine has {count} CUDA device(s)")

    @contextmanager
    def activate(self) -> Iterator[None]:
        """For the block, make this device's primary context (the one TensorRT and our buffers live in)
        current on the calling thread (``cudaSetDevice``); afterwards make the thread's own context current
        again, exactly as it was (the driver's ``cuCtxGetCurrent``/``cuCtxSetCurrent``): a non-primary one
        (``pycuda.autoinit``'s, a ``cuCtxCreate``'d one) or another device's stays the thread's own, and a
        thread that had none is left with none. ``cudaSetDevice`` "back" instead would make the previous
        device's primary context current (creating it, on a new thread: hundreds of MB, and an error where
        that device is exclusive or prohibited; pytorch/pytorch#94864). No switch where ours is current."""
        saved = self._current()
        switch = self._primary is None or int(saved or 0) != self._primary
        if switch:
            self._call("cudaSetDevice", self.device)
            self._primary = int(self._current() or 0)
        try:
            yield
        finally:
            if switch:
                self._check(self.driver.cuCtxSetCurrent(saved)[0], "cuCtxSetCurrent")

    def _current(self) -> Any:
        """The thread's current CUDA context, a NULL handle when none (the driver API; it creates none)."""
        err, ctx = self.driver.cuCtxGetCurrent()
        self._check(err, "cuCtxGetCurrent")
        return ctx

    def clear_error(self) -> None:
        """Read and reset CUDA's last error (cudaGetLastError), so it does not fail a later call."""
        self.rt.cudaGetLastError()

    def _check(self, err: Any, what: str) -> None:
        if int(err) != 0:
            name = getattr(err, "name", str(err))
            raise CudaError(f"{what} failed: {name}")

    def _call(self, fn: str, *args: Any) -> Any:
        out = getattr(self.rt, fn)(*args)
        err, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
        self._check(err, fn)
        return rest[0] if len(rest) == 1 else (rest or None)

    # memory
    def malloc(self, nbytes: int) -> int:
        return int(self._call("cudaMalloc", nbytes))

    def free(self, ptr: int) -> None:
        self._call("cudaFree", ptr)

    def pinned(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        ptr = int(self._call("cudaMallocHost", nbytes))
        raw = (ctypes.c_byte * nbytes).from_address(ptr)
        arr = np.frombuffer(raw, dtype=np.uint8).view(dtype).reshape(shape)
        self._pinned.append(ptr)
        return arr

    def free_pinned(self) -> None:
        """Free every pinned buffer this layer allocated (drop the arrays that view them first)."""
        while self._pinned:
            self._call("cudaFreeHost", self._pinned.pop())

    # streams and copies
    def stream(self) -> int:
        """A non-blocking stream: it never synchronizes with the legacy default stream (handle 0, torch's
        default), so a capture on it leaves stream 0 usable by other threads (with a blocking stream, a call
        on stream 0 during the capture fails with cudaErrorStreamCaptureImplicit and may invalidate it).
        Ordering with a caller's stream is done with events."""
        return int(self._call("cudaStreamCreateWithFlags", self.rt.cudaStreamNonBlocking))

    def destroy_stream(self, stream: int) -> None:
        self._call("cudaStreamDestroy", stream)

    def htod(self, dst: int, src: np.ndarray, stream: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call("cudaMemcpyAsync", dst, src.ctypes.data, src.nbytes, kind, stream)

    def dtoh(self, dst: np.ndarray, src: int, stream: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call("cudaMemcpyAsync", dst.ctypes.data, src, dst.nbytes, kind, stream)

    def sync(self, stream: int) -> None:
        self._call("cudaStreamSynchronize", stream)

    # timing
    def event(self) -> Any:
        return self._call("cudaEventCreate")

    def record(self, event: Any, stream: int) -> None:
        self._call("cudaEventRecord", event, stream)

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(self._call("cudaEventElapsedTime", start, end))

    def wait_event(self, stream: int, event: Any) -> None:
        """Work queued on ``stream`` after this waits for ``event`` (any stream's handle: torch's too)."""
        self._call("cudaStreamWaitEvent", stream, event, 0)

    def destroy_event(self, event: Any) -> None:
        self._call("cudaEventDestroy", event)

    # CUDA graphs
    def begin_capture(self, stream: int) -> None:
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._call("cudaStreamBeginCapture", stream, mode)

    def end_capture(self, stream: int) -> CudaGraph:
        """The captured graph, instantiated; :class:`CaptureInvalidated` when the capture was invalidated
        (the stream has left capture mode either way; call :meth:`clear_error` then)."""
        err, graph = self.rt.cudaStreamEndCapture(stream)
        if int(err) == _CAPTURE_INVALIDATED:
            raise CaptureInvalidated("cudaStreamEndCapture failed: cudaErrorStreamCaptureInvalidated")
        self._check(err, "cudaStreamEndCapture")
        try:
            return CudaGraph(graph, self._call("cudaGraphInstantiate", graph, 0))
        except CudaError:
            self._call("cudaGraphDestroy", graph)
            raise

    def launch(self, graph: CudaGraph, stream: int) -> None:
        self._call("cudaGraphLaunch", graph.exec, stream)

    def destroy_graph(self, graph: CudaGraph) -> None:
        self._call("cudaGraphExecDestroy", graph.exec)
        self._call("cudaGraphDestroy", graph.graph)


class PyCuda:
    """pycuda (the design card's choice); needs the CUDA toolkit to install.

    It holds the device's primary context (the one the CUDA runtime, and so TensorRT, uses) and
    pushes it on the calling thread in :meth:`activate`: a pycuda context is current only on the
    thread that pushed it. No stream capture: pycuda's releases lack ``Stream.begin_capture``.
    """

    name = "pycuda"
    can_capture = False

    def __init__(self, device: int = 0) -> None:
        import pycuda.driver as cuda  # type: ignore[import-not-found]

        cuda.init()
        count = cuda.Device.count()
        if not 0 <= device < count:
            raise CudaError(f"cuda:{device} does not exist: this machine has {count} CUDA device(s)")
        self.cuda = cuda
        self.device = device
        self.context = cuda.Device(device).retain_primary_context()
        self._allocs: dict[int, Any] = {}
        self._streams: dict[int, Any] = {}
        self._pinned: list[np.ndarray] = []

    @contextmanager
    def activate(self) -> Iterator[None]:
        """Push the device's primary context on the calling thread; pop it afterwards."""
        self.context.push()
        try:
            yield
        finally:
            self.cuda.Context.pop()

    def clear_error(self) -> None:
        pass  # pycuda raises on each failing call; there is no last error to reset

    def malloc(self, nbytes: int) -> int:
        alloc = self.cuda.mem_alloc(nbytes)
        self._allocs[int(alloc)] = alloc
        return int(alloc)

    def free(self, ptr: int) -> None:
        alloc = self._allocs.pop(ptr, None)
        if alloc is not None:
            alloc.free()

    def pinned(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        arr = self.cuda.pagelocked_empty(shape, dtype)
        self._pinned.append(arr)
        return arr

    def free_pinned(self) -> None:
        self._pinned.clear()

    def stream(self) -> int:
        s = self.cuda.Stream(flags=1)  # CU_STREAM_NON_BLOCKING, as cuda-python's
        self._streams[s.handle] = s
        return int(s.handle)

    def destroy_stream(self, stream: int) -> None:
        self._streams.pop(stream, None)

    def _stream(self, stream: int) -> Any:
        try:
            return self._streams[stream]
        except KeyError:
            raise CudaError("pycuda cannot order work with a stream it did not create (torch's): "
                            "pip install 'vitdeploy[cuda]' for cuda-python") from None

    def htod(self, dst: int, src: np.ndarray, stream: int) -> None:
        self.cuda.memcpy_htod_async(dst, src, self._streams[stream])

    def dtoh(self, dst: np.ndarray, src: int, stream: int) -> None:
        self.cuda.memcpy_dtoh_async(dst, src, self._streams[stream])

    def sync(self, stream: int) -> None:
        self._streams[stream].synchronize()

    def event(self) -> Any:
        return self.cuda.Event()

    def record(self, event: Any, stream: int) -> None:
        event.record(self._stream(stream))

    def elapsed_ms(self, start: Any, end: Any) -> float:
        end.synchronize()
        return float(start.time_till(end))

    def wait_event(self, stream: int, event: Any) -> None:
        self._stream(stream).wait_for_event(event)

    def destroy_event(self, event: Any) -> None:
        pass  # pycuda frees an event when the object goes

    def begin_capture(self, stream: int) -> None:
        raise CudaError("pycuda has no CUDA stream capture: for --cuda-graph, pip install 'vitdeploy[cuda]'")

    def end_capture(self, stream: int) -> CudaGraph:
        raise CudaError("pycuda has no CUDA stream capture")

    def launch(self, graph: CudaGraph, stream: int) -> None:
        raise CudaError("pycuda has no CUDA graphs")

    def destroy_graph(self, graph: CudaGraph) -> None:
        pass  # no graph is ever made


def device_memory(prefer: str = "auto", device: int = 0) -> CudaPython | PyCuda:
    """cuda-python if installed, else pycuda, bound to ``cuda:device``; a one-line error naming what to install."""
    orders = {"auto": (CudaPython, PyCuda), "cuda-python": (CudaPython,), "pycuda": (PyCuda,)}
    if prefer not in orders:
        raise CudaError(f"memory layer {prefer!r}: choose {', '.join(orders)}")
    missing = []
    for impl in orders[prefer]:
        try:
            return impl(device)
        except ImportError:
            missing.append(impl.name)
    raise CudaError(f"no CUDA Python layer: pip install 'vitdeploy[cuda]' (cuda-python); tried {', '.join(missing)}")
