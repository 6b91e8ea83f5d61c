"""A small device-memory layer for the TensorRT runtime: cuda-python (default) or pycuda.

Only what the runtime needs: device and pinned host buffers, a stream, async copies, events for
timing and for ordering two streams, and CUDA-graph capture; and the matching destroy call for each
thing it creates. Both implementations raise :class:`CudaError` with the CUDA error name, so a
machine without a driver fails with one clear line.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitdeploy.errors import VitDeployError


class CudaError(VitDeployError):
    pass


@dataclass
class CudaGraph:
    """A captured graph and its executable instance (both destroyed by ``destroy_graph``)."""

    graph: Any
    exec: Any


class CudaPython:
    """NVIDIA's cuda-python runtime bindings (``cuda.bindings.runtime``, or ``cuda.cudart``)."""

    name = "cuda-python"

    def __init__(self) -> None:
        from vitdeploy.sysinfo import cudart as find_cudart

        cudart = find_cudart()
        if cudart is None:
            raise ImportError("cuda-python is not installed")
        self.rt = cudart
        self._pinned: list[int] = []
        err, count = cudart.cudaGetDeviceCount()
        self._check(err, "cudaGetDeviceCount")
        if count == 0:
            raise CudaError("no CUDA device found")

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
        return int(self._call("cudaStreamCreate"))

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
        graph = self._call("cudaStreamEndCapture", stream)
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
    """pycuda (the design card's choice); needs the CUDA toolkit to install."""

    name = "pycuda"

    def __init__(self) -> None:
        import pycuda.autoinit  # type: ignore[import-not-found]  # noqa: F401
        import pycuda.driver as cuda  # type: ignore[import-not-found]

        self.cuda = cuda
        self._allocs: dict[int, Any] = {}
        self._streams: dict[int, Any] = {}
        self._pinned: list[np.ndarray] = []

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
        s = self.cuda.Stream()
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
        self._streams[stream].begin_capture()

    def end_capture(self, stream: int) -> CudaGraph:
        graph = self._streams[stream].end_capture()
        return CudaGraph(graph, graph.instance())

    def launch(self, graph: CudaGraph, stream: int) -> None:
        graph.exec.launch(self._streams[stream])

    def destroy_graph(self, graph: CudaGraph) -> None:
        pass  # pycuda frees graphs when the objects go


def device_memory(prefer: str = "auto") -> CudaPython | PyCuda:
    """cuda-python if installed, else pycuda; a one-line error naming what to install."""
    order = {"auto": (CudaPython, PyCuda), "cuda-python": (CudaPython,), "pycuda": (PyCuda,)}[prefer]
    missing = []
    for impl in order:
        try:
            return impl()
        except ImportError:
            missing.append(impl.name)
    raise CudaError(f"no CUDA Python layer: pip install 'vitdeploy[cuda]' (cuda-python); tried {', '.join(missing)}")
