"""The TensorRT runtime's logic without a GPU: small fakes of TensorRT and of the CUDA layer.

The fake CUDA layer keeps a timeline of what each stream has queued and which events a stream has
waited on, so an execution of the one TensorRT context on a stream that is not ordered after work
still in flight on another stream is caught as the data race it would be on a GPU. The real-GPU
test is at the end, marked ``gpu``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import types

import numpy as np
import pytest

from vitdeploy.engines import cuda_memory
from vitdeploy.engines import tensorrt_build as tb
from vitdeploy.engines.sidecar import EngineSidecar, TensorIO, write_engine
from vitdeploy.errors import VitDeployError


# -- fakes -----------------------------------------------------------------------------------------
class Race(AssertionError):
    pass


class FakeCuda:
    """The CUDA layer's interface over a timeline: ops queued per stream, waits between streams."""

    name = "fake"

    def __init__(self, fail_malloc_at: int | None = None) -> None:
        self.ids = iter(range(1, 10_000))
        self.pending: dict[int, set[int]] = {}  # stream -> ops queued and not known finished
        self.waited: dict[int, set[int]] = {}  # stream -> ops it is ordered after (through events)
        self.capturing: set[int] = set()
        self.allocs: set[int] = set()
        self.pinned_arrays: list[np.ndarray] = []
        self.streams: set[int] = set()
        self.events: set[int] = set()
        self.graphs: set[int] = set()
        self.freed: list[str] = []
        self.mallocs = 0
        self.fail_malloc_at = fail_malloc_at
        self.executions: list[tuple[int, int]] = []  # (stream, op)

    def queue(self, stream: int, what: str = "op") -> int:
        op = next(self.ids)
        self.pending.setdefault(stream, set()).add(op)
        return op

    def execute(self, stream: int) -> int:
        """A TensorRT context execution on ``stream``: every op in flight elsewhere must be ordered before."""
        for other, ops in self.pending.items():
            if other != stream and ops - self.waited.get(stream, set()):
                raise Race(f"context runs on stream {stream} while stream {other} has unordered work in flight")
        op = self.queue(stream)
        self.executions.append((stream, op))
        return op

    # memory
    def malloc(self, nbytes: int) -> int:
        self.mallocs += 1
        if self.mallocs == self.fail_malloc_at:
            raise cuda_memory.CudaError("cudaMalloc failed: cudaErrorMemoryAllocation")
        ptr = next(self.ids)
        self.allocs.add(ptr)
        return ptr

    def free(self, ptr: int) -> None:
        assert ptr in self.allocs, f"free of {ptr}: not allocated (double free?)"
        self.allocs.remove(ptr)
        self.freed.append("device")

    def pinned(self, shape: tuple[int, ...], dtype: object) -> np.ndarray:
        arr = np.zeros(shape, dtype)
        self.pinned_arrays.append(arr)
        return arr

    def free_pinned(self) -> None:
        if self.pinned_arrays:
            self.freed.append("pinned")
        self.pinned_arrays.clear()

    # streams
    def stream(self) -> int:
        s = next(self.ids)
        self.streams.add(s)
        return s

    def destroy_stream(self, stream: int) -> None:
        assert stream in self.streams
        self.streams.remove(stream)
        self.freed.append("stream")

    def htod(self, dst: int, src: np.ndarray, stream: int) -> None:
        self.queue(stream)

    def dtoh(self, dst: np.ndarray, src: int, stream: int) -> None:
        self.queue(stream)

    def sync(self, stream: int) -> None:
        self.pending.pop(stream, None)

    # events
    def event(self) -> dict:
        e = {"id": next(self.ids), "ops": set()}
        self.events.add(e["id"])
        return e

    def record(self, event: dict, stream: int) -> None:
        event["ops"] = set(self.pending.get(stream, set())) | self.waited.get(stream, set())

    def wait_event(self, stream: int, event: dict) -> None:
        self.waited.setdefault(stream, set()).update(event["ops"])

    def elapsed_ms(self, start: dict, end: dict) -> float:
        return 0.25

    def destroy_event(self, event: dict) -> None:
        self.events.remove(event["id"])
        self.freed.append("event")

    # graphs
    def begin_capture(self, stream: int) -> None:
        self.capturing.add(stream)

    def end_capture(self, stream: int) -> int:
        self.capturing.discard(stream)
        g = next(self.ids)
        self.graphs.add(g)
        return g

    def launch(self, graph: int, stream: int) -> None:
        assert graph in self.graphs, "launch of a destroyed graph"
        self.execute(stream)

    def destroy_graph(self, graph: int) -> None:
        self.graphs.remove(graph)
        self.freed.append("graph")


def fake_trt(cuda: FakeCuda, in_dtype: str = "FLOAT", version: str = "1.7.1.116",
             fail_in_capture: bool = False) -> types.SimpleNamespace:
    created: dict = {"runtimes": [], "caches": []}

    class ILogger:
        Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

        def __init__(self) -> None:
            pass

    class Context:
        def __init__(self) -> None:
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: tuple) -> bool:
            return True

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream: int) -> bool:
            if stream in cuda.capturing:
                return not fail_in_capture
            cuda.execute(stream)
            return True

    class RuntimeCache:
        def __init__(self) -> None:
            self.loaded = b""
            created["caches"].append(self)

        def deserialize(self, data: bytes) -> None:
            self.loaded = data

        def serialize(self) -> bytes:
            return b"kernels:" + self.loaded

    class RuntimeConfig:
        def create_runtime_cache(self) -> RuntimeCache:
            return RuntimeCache()

        def set_runtime_cache(self, cache: RuntimeCache) -> None:
            self.cache = cache

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i: int) -> str:
            return ["pixel_values", "logits"][i]

        def get_tensor_mode(self, name: str) -> str:
            return "TensorIOMode.INPUT" if name == "pixel_values" else "TensorIOMode.OUTPUT"

        def get_tensor_profile_shape(self, name: str, profile: int) -> tuple:
            return [1, 3, 8, 8], [2, 3, 8, 8], [4, 3, 8, 8]

        def get_tensor_dtype(self, name: str) -> str:
            return f"DataType.{in_dtype}" if name == "pixel_values" else "DataType.FLOAT"

        def get_tensor_shape(self, name: str) -> list[int]:
            return [-1, 3, 8, 8] if name == "pixel_values" else [-1, 10]

        def create_runtime_config(self) -> RuntimeConfig:
            return RuntimeConfig()

        def create_execution_context(self, config: RuntimeConfig | None = None) -> Context:
            return Context()

    class Runtime:
        def __init__(self, logger: object) -> None:
            self.engine_host_code_allowed = False
            created["runtimes"].append(self)

        def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
            return Engine() if data.startswith(b"fake-engine") else None

    return types.SimpleNamespace(__version__=version, ILogger=ILogger, Runtime=Runtime, created=created)


def _sidecar(**over: object) -> EngineSidecar:
    fields = dict(flavour="tensorrt_rtx", trt_version="1.7.1.116", targets=["sm89"], precision="fp32",
                  io=[TensorIO("pixel_values", "input", [-1, 3, 8, 8], "float"),
                      TensorIO("logits", "output", [-1, 10], "float")],
                  profile={"min": [1, 3, 8, 8], "opt": [2, 3, 8, 8], "max": [4, 3, 8, 8]}, onnx_path="m.onnx")
    fields.update(over)
    return EngineSidecar(**fields)  # type: ignore[arg-type]


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """An engine file + sidecar on disk, and fakes in place of TensorRT, the CUDA layer and the GPU query."""
    state = types.SimpleNamespace(cuda=FakeCuda(), trt_kwargs={}, flavour="tensorrt_rtx")
    state.engine = tmp_path / "m.engine"
    write_engine(state.engine, b"fake-engine-1", _sidecar(), durable=False)

    def import_tensorrt(flavour: str = "auto"):
        state.trt = fake_trt(state.cuda, **state.trt_kwargs)
        return state.trt, state.flavour

    monkeypatch.setattr(tb, "import_tensorrt", import_tensorrt)
    monkeypatch.setattr(tb, "current_gpu", lambda: ("NVIDIA GeForce RTX 4090", "sm89"))
    monkeypatch.setattr(cuda_memory, "device_memory", lambda prefer="auto": state.cuda)
    return state


def _open(fake, **kw):
    from vitdeploy.engines.tensorrt_runtime import TensorRTRuntime

    return TensorRTRuntime(fake.engine, **kw)


def _x(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 3, 8, 8)).astype(np.float32)


class FakeCudaTensor:
    """Just enough of a torch CUDA tensor for infer_torch (its data lives nowhere: meta device)."""

    def __init__(self, n: int) -> None:
        import torch

        self.shape = (n, 3, 8, 8)
        self.is_cuda = True
        self.device = torch.device("meta")

    def contiguous(self) -> FakeCudaTensor:
        return self

    def to(self, dtype: object) -> FakeCudaTensor:
        return self

    def data_ptr(self) -> int:
        return 0xD00D


@pytest.fixture
def torch_stream(monkeypatch):
    """torch's current stream: a foreign stream handle (777) the runtime must order itself with."""
    import torch

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=777))
    return 777


# -- ordering of infer and infer_torch ---------------------------------------------------------------
def test_infer_after_infer_torch_is_ordered_on_one_stream(fake, torch_stream):
    rt = _open(fake)
    producer = fake.cuda.queue(torch_stream)  # a torch kernel still writing the input
    out = rt.infer_torch(FakeCudaTensor(2))
    assert tuple(out.shape) == (2, 10)
    # the context ran on the runtime's stream, after the input's producer, and torch's stream waits for it
    (stream, op), = fake.cuda.executions
    assert stream == rt.stream and producer in fake.cuda.waited[rt.stream]
    assert op in fake.cuda.waited[torch_stream]
    # the next host call may not run the context beside the infer_torch execution (a Race otherwise)
    assert rt.infer(_x(3)).shape == (3, 10)
    rt.infer_torch(FakeCudaTensor(4))
    assert rt.infer(_x(1)).shape == (1, 10)
    assert {s for s, _ in fake.cuda.executions} == {rt.stream}
    # the context's addresses are our buffers again after each zero-copy call
    assert rt.context.addresses == {"pixel_values": rt.d_in, "logits": rt.d_out}
    rt.close()


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


# -- close -------------------------------------------------------------------------------------------
def test_close_frees_everything_once_and_later_calls_fail_clearly(fake, torch_stream):
    rt = _open(fake, cuda_graph=True)
    rt.infer(_x(2))
    rt.infer(_x(3))  # two captured graphs
    assert len(fake.cuda.graphs) == 2
    rt.close()
    rt.close()  # idempotent
    assert fake.cuda.allocs == set() and fake.cuda.streams == set() and fake.cuda.events == set()
    assert fake.cuda.graphs == set() and fake.cuda.pinned_arrays == []
    assert sorted(fake.cuda.freed) == sorted(["graph"] * 2 + ["event"] * 6 + ["stream", "device", "device", "pinned"])
    assert rt.engine is None and rt.context is None and rt.runtime is None
    for call in (lambda: rt.infer(_x(1)), lambda: rt.infer_torch(FakeCudaTensor(1))):
        with pytest.raises(VitDeployError, match=r"runtime for m\.engine is closed"):
            call()


def test_close_waits_for_a_call_in_flight(fake):
    rt = _open(fake)
    rt.lock.acquire()  # a call in flight holds the lock
    closer = threading.Thread(target=rt.close)
    closer.start()
    time.sleep(0.1)
    assert closer.is_alive() and fake.cuda.freed == []  # nothing freed under the running call
    rt.lock.release()
    closer.join(5)
    assert not closer.is_alive() and "device" in fake.cuda.freed


def test_context_manager_saves_runtime_cache_atomically(fake, tmp_path):
    (tmp_path / "m.rtcache").write_bytes(b"old")
    with _open(fake) as rt:
        assert fake.trt.created["caches"][0].loaded == b"old"
        rt.infer(_x(1))
    assert (tmp_path / "m.rtcache").read_bytes() == b"kernels:old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "m.json", "m.rtcache"]  # no temp files
    # a runtime whose engine was rebuilt meanwhile does not write its (old engine's) cache over
    rt = _open(fake)
    write_engine(fake.engine, b"fake-engine-2", _sidecar(), durable=False)
    assert not (tmp_path / "m.rtcache").exists()  # the rebuild dropped the old cache
    rt.close()
    assert not (tmp_path / "m.rtcache").exists()


def test_runtime_cache_only_for_tensorrt_rtx(fake, tmp_path):
    fake.flavour = "tensorrt"
    write_engine(fake.engine, b"fake-engine-1", _sidecar(flavour="tensorrt", trt_version="10.16.1.11"),
                 durable=False)
    fake.trt_kwargs = {"version": "10.16.1.11"}
    with _open(fake):
        pass
    assert not (tmp_path / "m.rtcache").exists() and fake.trt.created["caches"] == []


# -- failures ----------------------------------------------------------------------------------------
def test_failing_init_frees_what_it_allocated(fake):
    fake.cuda.fail_malloc_at = 2  # d_in allocated, d_out fails
    with pytest.raises(cuda_memory.CudaError, match="cudaErrorMemoryAllocation"):
        _open(fake)
    assert fake.cuda.mallocs == 2 and fake.cuda.allocs == set() and fake.cuda.streams == set()


def test_corrupt_engine_is_refused_and_nothing_leaks(fake):
    write_engine(fake.engine, b"not an engine", _sidecar(), durable=False)
    with pytest.raises(VitDeployError, match=r"TensorRT could not load .*rebuild it with `vitdeploy build`"):
        _open(fake)
    assert fake.cuda.allocs == set() and fake.cuda.streams == set()


def test_captured_enqueue_failure_is_an_error(fake):
    fake.trt_kwargs = {"fail_in_capture": True}
    rt = _open(fake, cuda_graph=True)
    with pytest.raises(VitDeployError, match=r"enqueue failed while capturing a CUDA graph.*without --cuda-graph"):
        rt.infer(_x(2))
    assert fake.cuda.capturing == set() and fake.cuda.graphs == set() and rt.graphs == {}
    rt.close()


def test_bf16_io_is_refused_by_name(fake):
    fake.trt_kwargs = {"in_dtype": "BF16"}
    with pytest.raises(VitDeployError, match=r"'pixel_values' is bf16: .*export with float32"):
        _open(fake)
    assert fake.cuda.allocs == set()


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


# -- version rules -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("built", "here", "compatible", "ok"), [
    ("10.9.0.34", "10.16.1.11", True, True),  # a later runtime (as strings, "10.16" < "10.9")
    ("10.16.1.11", "11.4.0.106", True, True),  # 10 -> 11
    ("10.16.1.11", "10.9.0.34", True, False),  # an older runtime (as strings, "10.9" > "10.16")
    ("10.16.1.11", "10.16.1.11", False, True),
    ("10.16.1", "10.16.1.0", False, True),  # the same version, written two ways
    ("10.9.0.34", "10.16.1.11", False, False),  # not version-compatible: exactly this version
])
def test_version_rules(built, here, compatible, ok):
    from vitdeploy.engines.tensorrt_runtime import check_compatible

    side = _sidecar(flavour="tensorrt", trt_version=built, options={"version_compatible": compatible})
    if ok:
        check_compatible(side, "tensorrt", here, ("NVIDIA L4", "sm89"))
    else:
        with pytest.raises(VitDeployError, match=f"built with tensorrt {built}.*this is {here}: rebuild"):
            check_compatible(side, "tensorrt", here, ("NVIDIA L4", "sm89"))


@pytest.mark.parametrize("compatible", [False, True])
def test_host_code_allowed_only_for_version_compatible_engines(fake, compatible):
    write_engine(fake.engine, b"fake-engine-1", _sidecar(options={"version_compatible": compatible}), durable=False)
    with _open(fake):
        pass
    assert fake.trt.created["runtimes"][0].engine_host_code_allowed is compatible


# -- GPU flavour and refusal texts (issue 11: a stubbed GPU) -------------------------------------------
def test_rtx_engine_on_hopper_says_full_tensorrt_not_a_rebuild_that_cannot_work():
    from vitdeploy.engines.tensorrt_runtime import check_compatible

    for gpu in (("NVIDIA H200", "sm90"), ("NVIDIA B200", "sm100"), ("NVIDIA GB300", "sm103")):
        with pytest.raises(VitDeployError) as e:
            check_compatible(_sidecar(), "tensorrt_rtx", "1.7.1.116", gpu)
        msg = str(e.value)
        assert f"TensorRT-RTX cannot run on {gpu[1]} ({gpu[0]}); build with full TensorRT" in msg
        assert "--trt tensorrt" in msg and "--compute-capability" not in msg


def test_refusals_advise_a_rebuild_that_works():
    from vitdeploy.engines.tensorrt_runtime import check_compatible

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
    """Build with a flavour that runs on this GPU (by compute capability), run it, compare with ONNX Runtime."""
    import importlib.util

    from vitdeploy.engines import open_runtime
    from vitdeploy.engines.sidecar import FLAVOUR_TITLES, flavours_for

    gpu = tb.current_gpu()
    if gpu is None:
        pytest.skip("needs an NVIDIA GPU to run an engine")
    runnable = [f for f in flavours_for(gpu[1]) if importlib.util.find_spec(f)]
    if not runnable:
        wanted = " or ".join(FLAVOUR_TITLES[f] for f in flavours_for(gpu[1]))
        pytest.skip(f"{gpu[0]} ({gpu[1]}) runs engines of {wanted}, which is not installed here")
    torch = pytest.importorskip("torch")
    digits_onnx = request.getfixturevalue("digits_onnx")  # after the skips: exporting takes a while
    flavour = {"tensorrt": "tensorrt", "tensorrt_rtx": "rtx"}[runnable[0]]
    tb.build_engine(digits_onnx["fp16"], tmp_path / "m.engine", tb.BuildOptions(flavour=flavour, max_batch=8))
    x = np.random.default_rng(0).standard_normal((11, 3, 224, 224)).astype(np.float32)
    with open_runtime(digits_onnx["fp16"]) as ort:
        ref = ort.infer(x)
    for graph in (False, True):
        with open_runtime(tmp_path / "m.engine", cuda_graph=graph) as rt:
            assert np.abs(rt.infer(x) - ref).max() < 5e-2
            out = rt.infer_torch(torch.from_numpy(x[:4]).cuda())
            assert out.is_cuda and out.shape == (4, 10)
            assert np.abs(out.float().cpu().numpy() - ref[:4]).max() < 5e-2
            assert np.abs(rt.infer(x[:3]) - ref[:3]).max() < 5e-2  # host path after a zero-copy call
        with pytest.raises(VitDeployError, match="is closed"):
            rt.infer(x[:1])
    if runnable[0] == "tensorrt_rtx":
        assert (tmp_path / "m.rtcache").is_file()
