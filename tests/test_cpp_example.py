"""The C++ example (examples/cpp) through its own CMake project: configure, build, run.

Without a GPU it runs up to ``createInferRuntime`` (full TensorRT) or ``deserializeCudaEngine``
(TensorRT-RTX), where the CUDA driver is missing; everything before that is real: the sidecar is
parsed with nlohmann/json, its flavour, I/O types and version compatibility are checked, the batch
file is read and converted to the input's type, and its labels and I/O names are read.
Headers: TensorRT's public API (third_party/tensorrt, vendored), CUDA's from the
nvidia-cuda-runtime-cu12 / nvidia-cuda-nvcc-cu12 wheels (`pip install -e '.[cpp-example]'`).
Libraries: the lean runtime (-DUSE_TENSORRT_LEAN=ON, version-compatible engines only) links
libnvinfer_lean from the tensorrt-lean-cu13-libs wheel of that extra; the default configuration links
full libnvinfer, which no registry reachable here ships (PyPI's tensorrt-cu13-libs is a stub that
downloads from pypi.nvidia.com), so it is built and run where one is found and skipped, with that
reason, elsewhere; its configure step runs everywhere.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "cpp"
TRT_INCLUDE = ROOT / "third_party" / "tensorrt" / "include"
INSTALL_HINT = "pip install -e '.[cpp-example]'"
# a label a regex over the JSON text gets wrong; nlohmann/json does not
TRICKY_LABELS = ["cat", 'say "hi", then ]', "naïve"]


def _package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _absent(reason: str) -> None:
    """Skip with the reason; fail instead where CI requires the C++ stage (VITDEPLOY_REQUIRE names cpp)."""
    if "cpp" in os.environ.get("VITDEPLOY_REQUIRE", ""):
        pytest.fail(f"{reason} (VITDEPLOY_REQUIRE names cpp: a skip is not a pass)")
    pytest.skip(reason)


def _toolchain(on_gpu: bool = False) -> dict[str, Path]:
    """Paths to what the build needs; skip with the reason where something is absent (or, unless
    ``on_gpu``, where a GPU is present: then only the marked GPU test runs the example)."""
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        _absent(f"{' and '.join(missing)} not found: apt-get install cmake g++")
    runtime, nvcc, lean = (_package_dir(p) for p in ("nvidia.cuda_runtime", "nvidia.cuda_nvcc", "tensorrt_lean_libs"))
    if runtime is None or nvcc is None or lean is None:
        _absent(f"CUDA runtime/nvcc headers or TensorRT's lean runtime wheels not installed: {INSTALL_HINT}")
    gpu = shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi"], capture_output=True).returncode == 0
    if gpu and not on_gpu:
        pytest.skip("a GPU is present: these tests check the example up to the CUDA boundary of a GPU-less machine")
    cudart = sorted((runtime / "lib").glob("libcudart.so.*"))
    return {"cuda_include": runtime / "include", "crt_include": nvcc / "include", "cudart": cudart[0],
            "nvinfer_lean": lean / "libnvinfer_lean.so.11"}


NO_NVINFER = ("full libnvinfer not found (no tensorrt_libs package, none on the library path): PyPI's "
              "tensorrt-cu13-libs is a stub that downloads from pypi.nvidia.com; pip install "
              "--extra-index-url https://pypi.nvidia.com tensorrt-cu13-libs to build the default configuration")


def _full_nvinfer() -> Path | None:
    """libnvinfer.so.11/.10 from NVIDIA's tensorrt-cu1x-libs wheel (package tensorrt_libs) or the system."""
    libs = _package_dir("tensorrt_libs")
    found = sorted(libs.glob("libnvinfer.so.1[01]")) if libs else []
    if found:
        return found[-1]
    name = ctypes.util.find_library("nvinfer")
    if name is None:
        return None
    done = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True)
    paths = [line.rsplit("=> ", 1)[-1] for line in done.stdout.splitlines() if name in line]
    return Path(paths[0]) if paths else None


def _configure(build_dir: Path, library: Path | None, tools: dict[str, Path], rtx: bool = False,
               lean: bool = False) -> subprocess.CompletedProcess:
    cmd = [
        "cmake", "-S", str(EXAMPLE), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
        f"-DUSE_TENSORRT_RTX={'ON' if rtx else 'OFF'}", f"-DUSE_TENSORRT_LEAN={'ON' if lean else 'OFF'}",
        f"-DTENSORRT_INCLUDE_DIR={TRT_INCLUDE}",
        f"-DCUDA_INCLUDE_DIRS={tools['cuda_include']};{tools['crt_include']}", f"-DCUDART_LIBRARY={tools['cudart']}",
    ]
    if library is not None:
        cmd.append(f"-DTENSORRT_LIBRARY={library}")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _cmake_build(build_dir: Path, library: Path, tools: dict[str, Path], rtx: bool = False, lean: bool = False) -> Path:
    done = _configure(build_dir, library, tools, rtx, lean)
    assert done.returncode == 0, f"cmake configure failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    done = subprocess.run(["cmake", "--build", str(build_dir)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"cmake --build failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    exe = build_dir / "vit_infer"
    assert exe.is_file()
    return exe


@pytest.fixture(scope="module")
def lean_example(tmp_path_factory) -> Path:
    """The example built against TensorRT's lean runtime (-DUSE_TENSORRT_LEAN=ON, libnvinfer_lean)."""
    tools = _toolchain()
    return _cmake_build(tmp_path_factory.mktemp("cpp-lean"), tools["nvinfer_lean"], tools, lean=True)


@pytest.fixture(scope="module")
def full_example(tmp_path_factory) -> Path:
    """The example's default configuration, against full libnvinfer where one is found."""
    tools = _toolchain()
    library = _full_nvinfer()
    if library is None:
        pytest.skip(NO_NVINFER)
    return _cmake_build(tmp_path_factory.mktemp("cpp-trt"), library, tools)


def _sidecar(engine: Path, flavour: str, labels: list[str], dtypes: tuple[str, str] = ("float", "float"),
             input_shape: tuple[int, ...] = (-1, 3, 224, 224), version_compatible: bool = True) -> None:
    """A sidecar as `vitdeploy build` writes it (through its one typed home), UTF-8 as written."""
    from vitdeploy.engines.tensorrt.sidecar import EngineSidecar, TensorIO, sidecar_path

    batch_free = list(input_shape[1:])
    side = EngineSidecar(
        flavour=flavour, trt_version="11.1.0", targets=["sm90"], precision="fp16",
        io=[TensorIO("pixel_values", "input", list(input_shape), dtypes[0]),
            TensorIO("logits", "output", [-1, len(labels)], dtypes[1])],
        profile={"min": [1, *batch_free], "opt": [1, *batch_free], "max": [4, *batch_free]},
        options={"version_compatible": version_compatible}, model={"labels": labels},
    )
    sidecar_path(engine).write_text(json.dumps(side.to_dict(), ensure_ascii=False), encoding="utf-8")


def _run(exe: Path, engine: Path, n: int = 1, batch: bytes | None = None) -> subprocess.CompletedProcess:
    """Run the example on ``engine`` with a batch file: ``batch``, or n normalized float32 images."""
    data = batch if batch is not None else np.zeros((n, 3, 224, 224), np.float32).tobytes()
    batch_file = engine.with_suffix(".bin")
    batch_file.write_bytes(data)
    return subprocess.run([str(exe), str(engine), str(batch_file), str(n)], capture_output=True, text=True, timeout=120)


def _engine(tmp_path: Path, name: str = "vit.engine", **sidecar) -> Path:
    engine = tmp_path / name
    engine.write_bytes(b"\0" * 64)
    _sidecar(engine, sidecar.pop("flavour", "tensorrt"), sidecar.pop("labels", TRICKY_LABELS), **sidecar)
    return engine


def _at_the_cuda_boundary(done: subprocess.CompletedProcess) -> None:
    """TensorRT's own boundary on a machine without a GPU driver, and the program's one line."""
    assert done.returncode == 1, done.stderr
    assert "CUDA initialization failure" in done.stderr
    assert "createInferRuntime failed" in done.stderr and "needs an NVIDIA GPU" in done.stderr


@pytest.mark.parametrize("build", ["lean", "full"])
def test_tensorrt_build_runs_to_create_infer_runtime(build, request, tmp_path):
    exe = request.getfixturevalue(f"{build}_example")
    engine = _engine(tmp_path, version_compatible=build == "lean")
    done = _run(exe, engine)
    # the sidecar was read with a JSON parser: names, types, labels (quotes, comma, bracket, UTF-8) all counted
    title = "TensorRT (lean runtime)" if build == "lean" else "TensorRT"
    assert (f"{title} 11.1.0, fp16, classification, input pixel_values (float32), output logits (float32), 3 labels"
            in done.stderr), done.stderr
    _at_the_cuda_boundary(done)


def test_lean_runtime_refuses_an_engine_that_is_not_version_compatible(lean_example, tmp_path):
    """libnvinfer_lean deserializes only version-compatible engines (NVIDIA/TensorRT #3307): say so up front."""
    done = _run(lean_example, _engine(tmp_path, version_compatible=False))
    assert done.returncode == 1
    assert "was not built with --version-compatible" in done.stderr and "runs only version-compatible" in done.stderr
    assert "-DUSE_TENSORRT_LEAN" in done.stderr and "createInferRuntime" not in done.stderr


def test_default_configuration_is_full_nvinfer_not_the_lean_runtime(tmp_path):
    """The default links full libnvinfer; the lean runtime is an option, named as what it is, never a stand-in."""
    tools = _toolchain()

    def refused(done: subprocess.CompletedProcess) -> str:
        assert done.returncode != 0, done.stdout[-2000:]
        return " ".join(done.stderr.split())  # CMake wraps its messages

    said = refused(_configure(tmp_path / "lean-as-full", tools["nvinfer_lean"], tools))
    assert "is TensorRT's lean runtime, which runs only version-compatible engines" in said
    assert "-DUSE_TENSORRT_LEAN=ON" in said
    both = _configure(tmp_path / "rtx-lean", tools["nvinfer_lean"], tools, rtx=True, lean=True)
    assert "TensorRT-RTX has none" in refused(both)
    if _full_nvinfer() is None:  # nothing to find here: the configure step says what to do
        said = refused(_configure(tmp_path / "none", None, tools))
        assert "TensorRT not found" in said and "runs only engines built with --version-compatible" in said


@pytest.mark.parametrize(("dtypes", "shape", "batch", "said"), [
    (("half", "half"), (-1, 3, 224, 224), None, "input pixel_values (float16), output logits (float16)"),
    (("uint8", "float"), (-1, 224, 224, 3), np.zeros((2, 224, 224, 3), np.uint8).tobytes(),
     "input pixel_values (uint8), output logits (float32)"),
])
def test_float16_and_uint8_io_run_to_the_cuda_boundary(lean_example, tmp_path, dtypes, shape, batch, said):
    """--fp16-io (float32 file converted to float16) and --uint8-input (uint8 NHWC pixels) engines."""
    done = _run(lean_example, _engine(tmp_path, dtypes=dtypes, input_shape=shape), n=2, batch=batch)
    assert said in done.stderr, done.stderr
    _at_the_cuda_boundary(done)


@pytest.mark.parametrize(("dtypes", "shape", "message"), [
    (("uint8", "float"), (-1, 224, 224, 3),  # a float32 file for a uint8 engine
     "has 1204224 bytes, expected 301056: 301056 uint8 pixels for input pixel_values (uint8)"),
    (("half", "float"), (-1, 3, 224, 224), None),  # the right file: no refusal
    (("bf16", "float"), (-1, 3, 224, 224), "pixel_values is bf16; this program handles float32, float16 and uint8"),
    (("float", "int8"), (-1, 3, 224, 224), "logits is int8; this program handles float32, float16 and uint8"),
    (("float", "uint8"), (-1, 3, 224, 224), "a uint8 output is not logits"),
])
def test_io_type_refusals_before_tensorrt(lean_example, tmp_path, dtypes, shape, message):
    done = _run(lean_example, _engine(tmp_path, dtypes=dtypes, input_shape=shape), n=2)
    assert done.returncode == 1
    if message is None:
        _at_the_cuda_boundary(done)
    else:
        assert message in done.stderr and "createInferRuntime" not in done.stderr, done.stderr


HALF_CHECK = r"""
#include "io_types.h"
#include <cstdio>
#include <vector>
// stdin: float32 values; stdout: their float16 bits, then every float16 bit pattern as float32
int main() {
  std::vector<float> in;
  float v;
  while (std::fread(&v, 4, 1, stdin) == 1) in.push_back(v);
  for (float x : in) { const uint16_t h = vit::floatToHalf(x); std::fwrite(&h, 2, 1, stdout); }
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = vit::halfToFloat(static_cast<uint16_t>(b));
    std::fwrite(&f, 4, 1, stdout);
  }
}
"""


def test_float16_conversions_match_numpy_bit_for_bit(tmp_path):
    """The example's float32 <-> float16 conversions (io_types.h) against numpy's, on random bit patterns,
    the rounding ties, subnormals, overflow and every half value."""
    tools = _toolchain()
    (tmp_path / "check.cpp").write_text(HALF_CHECK)
    cmd = ["c++", "-std=c++17", "-O1", "-Wall", "-Wno-deprecated-declarations", f"-I{EXAMPLE}", f"-I{TRT_INCLUDE}",
           f"-I{tools['cuda_include']}", f"-I{tools['crt_include']}", str(tmp_path / "check.cpp"),
           "-o", str(tmp_path / "check")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.integers(0, 2**32, 300_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
        (rng.standard_normal(50_000) * 10).astype(np.float32), (rng.standard_normal(50_000) * 1e-5).astype(np.float32),
        np.float32([0, -0.0, 65504, 65519.99, 65520, 1e-8, 2**-25, 2**-25 * 1.0000001, 2**-24 * 1.5, 2**-24 * 2.5,
                    1 + 2**-11, 1 + 3 * 2**-11, np.inf, -np.inf, np.nan])])
    out = subprocess.run([str(tmp_path / "check")], input=x.tobytes(), capture_output=True, timeout=60).stdout
    half = np.frombuffer(out[:2 * len(x)], np.uint16)
    with np.errstate(all="ignore"):
        ref = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(half[~nan], ref[~nan]) and np.isnan(half[nan].view(np.float16)).all()
    back = np.frombuffer(out[2 * len(x):], np.float32)
    every = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    assert np.array_equal(np.isnan(back), np.isnan(every)) and np.array_equal(back[~np.isnan(back)],
                                                                              every[~np.isnan(every)])


def test_refuses_an_engine_of_the_other_flavour(lean_example, tmp_path):
    done = _run(lean_example, _engine(tmp_path, "rtx.engine", flavour="tensorrt_rtx", labels=["a"]))
    assert done.returncode == 1
    assert "is a tensorrt_rtx engine" in done.stderr and "-DUSE_TENSORRT_RTX=ON" in done.stderr
    assert "createInferRuntime" not in done.stderr  # refused before touching TensorRT


@pytest.mark.parametrize("text, message", [
    ('{"format": "vitdeploy-engine/1", "flavour": ', "is not valid JSON"),
    ('{"format": "vitdeploy-engine/1", "flavour": "tensorrt"}', "is malformed"),
    ('{"labels": ["a"]}', "is not a vitdeploy engine sidecar"),
])
def test_bad_sidecar_is_one_clear_line(lean_example, tmp_path, text, message):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\0")
    engine.with_suffix(".json").write_text(text)
    done = _run(lean_example, engine)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vit_infer: sidecar ") and message in lines[0], done.stderr
    engine.with_suffix(".json").unlink()
    done = _run(lean_example, engine)
    assert done.returncode == 1 and "has no sidecar" in done.stderr


def test_tensorrt_rtx_branch_builds_without_its_headers_and_runs_a_real_engine(tiny_checkpoint, tmp_path):
    """-DUSE_TENSORRT_RTX=ON compiles against full TensorRT's headers (TensorRT-RTX ships none on PyPI),
    links libtensorrt_rtx from the tensorrt-rtx wheel, and loads an engine `vitdeploy build` made."""
    tools = _toolchain()
    rtx_libs = _package_dir("tensorrt_rtx_libs")
    if rtx_libs is None or importlib.util.find_spec("tensorrt_rtx") is None:
        pytest.skip("TensorRT-RTX not installed: pip install 'vitdeploy[tensorrt-rtx]'")
    from vitdeploy.engines.tensorrt.build import BuildOptions, build_engine
    from vitdeploy.exporters import ExportOptions, export_onnx

    exe = _cmake_build(tmp_path / "build-rtx", rtx_libs / "libtensorrt_rtx.so.1", tools, rtx=True)
    onnx_path = export_onnx(tiny_checkpoint, tmp_path / "tiny.onnx", options=ExportOptions(dynamic_batch=True)).path
    engine = tmp_path / "tiny.engine"
    build_engine(onnx_path, engine, BuildOptions(flavour="rtx", compute_capabilities=["sm89"], max_batch=4))
    done = _run(exe, engine)
    assert done.returncode == 1, done.stderr
    assert "TensorRT-RTX" in done.stderr and "input pixel_values (float32)" in done.stderr
    assert ", 6 labels" in done.stderr  # the tiny model's 6 classes
    assert f"cannot deserialize {engine}" in done.stderr
    assert "CUDA" in done.stderr  # TensorRT-RTX's reason: no CUDA driver here


# -- on a GPU ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("io", ["float32", "fp16-io", "uint8-input"])
def test_example_matches_onnxruntime_on_gpu(io, request, tmp_path):
    """A version-compatible engine of each I/O kind, built with full TensorRT, run by the default build
    (libnvinfer) and, for engines of the lean runtime's own major version, the lean one: the top-5
    classes and their probabilities are ONNX Runtime's."""
    from vitdeploy.engines import open_runtime
    from vitdeploy.engines.tensorrt.build import BuildOptions, build_engine, current_gpu
    from vitdeploy.exporters import ExportOptions, export_onnx
    from vitdeploy.preprocess import Preprocessing, find_images, load_images

    if current_gpu() is None:
        pytest.skip("needs an NVIDIA GPU to run an engine (none visible: no driver or no device)")
    trt = pytest.importorskip("tensorrt", reason="full TensorRT not installed: it builds the engines here")
    library = _full_nvinfer()
    if library is None:
        pytest.skip(NO_NVINFER)
    tools = _toolchain(on_gpu=True)
    digits = request.getfixturevalue("digits")  # after the skips: it trains the digits model
    onnx_path = export_onnx(digits["checkpoint"], tmp_path / "m.onnx", options=ExportOptions(
        dynamic_batch=True, precision="fp16", fp16_io=io == "fp16-io", uint8_input=io == "uint8-input")).path
    engine = tmp_path / "m.engine"
    build_engine(onnx_path, engine, BuildOptions(flavour="tensorrt", max_batch=8, version_compatible=True))
    with open_runtime(onnx_path) as ort:
        prep = Preprocessing.from_dict(ort.metadata.preprocessing)
        batch = load_images(find_images(digits["test"])[:4], prep, uint8=io == "uint8-input")
        logits = ort.infer(batch).astype(np.float64)  # float32 (or uint8) in; the runtime casts for fp16-io
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    exes = [_cmake_build(tmp_path / "full", library, tools)]
    if trt.__version__.split(".")[0] == "11":  # the lean wheel of the cpp-example extra is TensorRT 11
        exes.append(_cmake_build(tmp_path / "lean", tools["nvinfer_lean"], tools, lean=True))
    for exe in exes:
        done = _run(exe, engine, n=4, batch=batch.tobytes())  # float32 for fp16-io too: the example converts
        assert done.returncode == 0, done.stderr
        rows = [line.split(":", 1)[1].split() for line in done.stdout.splitlines() if line.startswith("image ")]
        assert len(rows) == 4
        for b, row in enumerate(rows):
            labels, probs = [int(v) for v in row[::2]], [float(v) for v in row[1::2]]
            assert labels[0] == int(np.argmax(p[b])), (exe, b, row)
            assert np.allclose(probs, p[b][labels], atol=2e-2), (exe, b, row, p[b][labels])


def test_verify_reads_the_golden_tensors_and_runs_to_the_cuda_boundary(lean_example, serving_onnx, tmp_path):
    """`vit_infer m.engine --verify DIR` takes what `vitdeploy verify --write-tensors DIR` writes: the golden
    images preprocessed (their count from the file) and the expected logits, checked for top-1 after the run."""
    from vitdeploy.verify import write_golden_tensors

    golden = tmp_path / "golden"
    write_golden_tensors(serving_onnx, golden)
    count = (golden / "golden_input.bin").stat().st_size // (3 * 64 * 64 * 4)  # serving_onnx takes 64x64
    assert count >= 1
    engine = _engine(tmp_path, input_shape=(-1, 3, 64, 64))
    done = subprocess.run([str(lean_example), str(engine), "--verify", str(golden)], capture_output=True, text=True,
                          timeout=120)
    _at_the_cuda_boundary(done)
    (golden / "golden_input.bin").write_bytes(b"\0" * 1000)  # not a whole image
    done = subprocess.run([str(lean_example), str(engine), "--verify", str(golden)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and "not a whole number of 49152-byte images" in done.stderr, done.stderr
    assert "vitdeploy verify MODEL.onnx --write-tensors" in done.stderr and "createInferRuntime" not in done.stderr


CHUNKS_CHECK = r"""
#include "batching.h"
#include <cstdio>
int main() {
  int n, lo, hi;
  while (std::scanf("%d %d %d", &n, &lo, &hi) == 3) {
    std::string all;
    for (int i = 0; i < n; ++i) all += static_cast<char>('A' + i % 26);  // one byte per image
    for (const vit::Chunk& c : vit::batchChunks(n, lo, hi)) std::printf("%s ", vit::chunkInput(all, 1, c).c_str());
    std::printf("\n");
  }
}
"""


def test_verify_chunks_the_golden_set_as_the_python_runtime_does(tmp_path):
    """batching.h (what `vit_infer --verify` and a batch file of N images run through) splits N images into
    batches the engine's profile takes, exactly as vitdeploy's Runtime.infer does: a static batch of 1 runs
    the 4 golden images one by one, a static 4 pads a short last batch with its last image, and so on."""
    from vitdeploy.engines.base import InputSpec, Runtime

    if shutil.which("c++") is None:
        _absent("c++ not found: apt-get install g++")
    (tmp_path / "chunks.cpp").write_text(CHUNKS_CHECK)
    done = subprocess.run(["c++", "-std=c++17", "-Wall", f"-I{EXAMPLE}", str(tmp_path / "chunks.cpp"), "-o",
                           str(tmp_path / "chunks")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    class Recording(Runtime):
        def __init__(self, lo: int, hi: int) -> None:
            self.spec, self.metadata, self.batches = InputSpec("x", "float32", (1,), lo, hi), None, []

        def _run(self, batch: np.ndarray) -> np.ndarray:
            self.batches.append("".join(chr(ord("A") + int(v) % 26) for v in batch[:, 0]))
            return np.zeros((len(batch), 2), np.float32)

    cases = [(4, 1, 1), (4, 4, 4), (6, 4, 4), (1, 4, 4), (4, 1, 8), (11, 1, 8), (17, 2, 8), (8, 8, 8), (9, 8, 8)]
    out = subprocess.run([str(tmp_path / "chunks")], input="".join(f"{n} {lo} {hi}\n" for n, lo, hi in cases),
                         capture_output=True, text=True, timeout=60).stdout.splitlines()
    for (n, lo, hi), line in zip(cases, out, strict=True):
        rt = Recording(lo, hi)
        rt.infer(np.arange(n, dtype=np.float32)[:, None])
        assert line.split() == rt.batches, (n, lo, hi)
    assert out[0].split() == ["A", "B", "C", "D"] and out[2].split() == ["ABCD", "EFFF"]


@pytest.mark.gpu
def test_verify_passes_on_a_default_static_batch_export_on_gpu(request, tmp_path):
    """The default export has a static batch of 1; `vit_infer --verify` runs its golden set (4 images) in
    batches of 1 and passes."""
    from vitdeploy.engines.tensorrt.build import BuildOptions, build_engine, current_gpu
    from vitdeploy.exporters import ExportOptions, export_onnx
    from vitdeploy.verify import write_golden_tensors

    if current_gpu() is None:
        pytest.skip("needs an NVIDIA GPU to run an engine (none visible: no driver or no device)")
    pytest.importorskip("tensorrt", reason="full TensorRT not installed: it builds the engines here")
    library = _full_nvinfer()
    if library is None:
        pytest.skip(NO_NVINFER)
    tools = _toolchain(on_gpu=True)
    digits = request.getfixturevalue("digits")
    onnx_path = export_onnx(digits["checkpoint"], tmp_path / "m.onnx", options=ExportOptions()).path
    engine = tmp_path / "m.engine"
    build_engine(onnx_path, engine, BuildOptions(flavour="tensorrt", version_compatible=True))
    golden = tmp_path / "golden"
    write_golden_tensors(onnx_path, golden)
    count = (golden / "golden_logits.bin").stat().st_size // (10 * 4)
    assert count > 1
    exe = _cmake_build(tmp_path / "full", library, tools)
    done = subprocess.run([str(exe), str(engine), "--verify", str(golden)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and f"PASSED: {count} golden images" in done.stdout, done.stdout + done.stderr
    assert f"{count} images in {count} batch(es) of the engine's 1..1" in done.stderr
