"""ONNX Runtime backend: CPU by default; CUDA and TensorRT execution providers when present."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy import dtypes
from vitdeploy.artifacts.metadata import PREFIX, ArtifactMetadata
from vitdeploy.deprecation import moved
from vitdeploy.engines.base import InputSpec, Runtime
from vitdeploy.errors import VitDeployError
from vitdeploy.io import check_onnx_external_data, onnx_external_data
from vitdeploy.sysinfo import is_x86, usable_cpus

INPUT_DTYPES = ("float32", "float16", "uint8")  # what the Runtime interface feeds a model
DYNAMIC_MAX_BATCH = 256  # larger requests to a dynamic-batch artifact are split to bound memory
QDQ_ACTIVATIONS = ("auto", "int8", "uint8")
_PROTOBUF_LIMIT = 2**31 - 1


def qdq_activations_to_uint8(model: Any) -> int:
    """Re-express int8 activation Q/DQ pairs as uint8 with the zero point moved by +128, in place.

    ``QuantizeLinear(x, s, z:int8)`` and ``QuantizeLinear(x, s, z+128:uint8)`` hold the same
    integers shifted by 128, saturate at the same real values and dequantize to identical floats,
    so the rewrite is exact. It matters for speed on x86: MLAS multiplies uint8 x int8 with
    AVX2/AVX-512 VNNI/AMX kernels, but has int8 x int8 kernels only on CPUs with AVX-VNNI-INT8,
    and ONNX Runtime fuses a DQ->MatMul whose output is not re-quantized only for uint8 inputs.
    TensorRT, on the other hand, accepts only int8 Q/DQ, which is why the file keeps int8.
    Weights (DQ of an initializer) stay int8. Returns the number of Q nodes rewritten.
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    outputs = {o.name for o in graph.output}

    def int8_zero_point(node: Any) -> np.ndarray | None:
        if len(node.input) < 3 or node.input[2] not in inits:
            return None
        z = numpy_helper.to_array(inits[node.input[2]])
        return z if z.dtype == np.int8 else None

    new_inits: dict[bytes, str] = {}
    retyped: set[str] = set()
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or q.domain not in ("", "ai.onnx") or q.input[0] in inits:
            continue
        if any(a.name == "output_dtype" for a in q.attribute):  # opset 21: the type named twice
            continue
        z = int8_zero_point(q)
        users = consumers.get(q.output[0], [])
        if z is None or not users or q.output[0] in outputs:
            continue
        if any(u.op_type != "DequantizeLinear" or u.input[0] != q.output[0] for u in users):
            continue
        zs = [int8_zero_point(u) for u in users]
        if any(zu is None or zu.shape != z.shape or not np.array_equal(zu, z) for zu in zs):
            continue
        shifted = (z.astype(np.int16) + 128).astype(np.uint8)
        key = shifted.tobytes() + str(shifted.shape).encode()
        if key not in new_inits:
            name = f"{q.input[2]}__uint8"
            while name in inits:
                name += "_"
            graph.initializer.append(numpy_helper.from_array(shifted, name))
            inits[name] = graph.initializer[-1]
            new_inits[key] = name
        for node in (q, *users):
            node.input[2] = new_inits[key]
        retyped.add(q.output[0])
    for vi in graph.value_info:
        if vi.name in retyped:
            vi.type.tensor_type.elem_type = onnx.TensorProto.UINT8
    return len(retyped)


INTEGER_KERNELS = ("QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "MatMulInteger", "QLinearConv", "ConvInteger",
                   "DynamicQuantizeMatMul")


def cpu_kernel_report(model: Any) -> dict[str, int]:
    """How ONNX Runtime's CPU provider runs a Q/DQ model's weighted ops after its graph optimizations.

    ``integer``: ops fused into integer kernels (QLinearMatMul, QGemm, ...). ``float_on_dequantized``:
    MatMul/Gemm/Conv left in float with a DequantizeLinear input (Q/DQ that buys no speed).
    """
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="vitdeploy-ort-") as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        nodes = onnx.load(so.optimized_model_filepath).graph.node
    producers = {o: n.op_type for n in nodes for o in n.output}
    return {
        "integer": sum(n.op_type in INTEGER_KERNELS for n in nodes),
        "float_on_dequantized": sum(n.op_type in ("MatMul", "Gemm", "Conv", "FusedMatMul")
                                    and any(producers.get(i) == "DequantizeLinear" for i in n.input)
                                    for n in nodes),
    }


TENSORRT_CACHE_SUFFIX = ".ort-trt-cache"  # <stem>.ort-trt-cache/<ONNX hash>/ beside the artifact
TENSORRT_OPT_BATCH = 8
_PROVIDER = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider"}
GPU_ORT_INSTALL = ("pip uninstall -y onnxruntime && pip install onnxruntime-gpu "
                   "(docs/engines.md: Installing on a GPU machine)")


def onnx_batch_range(path: str | Path) -> tuple[str, tuple[int, ...], tuple[int, int, int]]:
    """(input name, non-batch dims, (min, opt, max) batch) of an ONNX's one input, read from its batch
    axis: a fixed size N gives N/N/N, a symbolic one (``--dynamic-batch``, metadata ``batch: dynamic``)
    1/8/DYNAMIC_MAX_BATCH, since larger requests are split before they reach the session."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # protobuf's DecodeError and the like
        raise VitDeployError(f"ONNX Runtime cannot load {path}: {type(e).__name__}: {e}") from None
    weights = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise VitDeployError(f"{path}: expected one input, found {len(inputs)}: export it with vitdeploy")
    name = inputs[0].name
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) < 2 or min(dims[1:]) <= 0:
        raise VitDeployError(f"{path}: input {name} needs static non-batch dims, got {dims}")
    if any(c in name for c in ",:"):  # the provider's profile syntax is "name:1x3x224x224,name2:..."
        raise VitDeployError(f"{path}: input name {name!r} has ',' or ':', which TensorRT's profile syntax cannot hold")
    batch = dims[0]
    lo, hi = (batch, batch) if batch > 0 else (1, DYNAMIC_MAX_BATCH)
    return name, tuple(dims[1:]), (lo, min(max(lo, TENSORRT_OPT_BATCH), hi), hi)


def tensorrt_provider_options(input_name: str, dims: tuple[int, ...], batch: tuple[int, int, int],
                              cache_dir: Path | None) -> dict[str, str]:
    """ONNX Runtime's TensorRT provider options: one optimization profile over the artifact's whole batch
    range, so a batch size not seen before never rebuilds the engine while serving, and its engine and
    timing caches in ``cache_dir`` (None: no caches), so a restart deserializes instead of rebuilding."""
    shape = "x".join(str(d) for d in dims)
    opts = {f"trt_profile_{k}_shapes": f"{input_name}:{b}x{shape}"
            for k, b in zip(("min", "opt", "max"), batch, strict=True)}
    if cache_dir is not None:
        opts.update(trt_engine_cache_enable="True", trt_engine_cache_path=str(cache_dir),
                    trt_timing_cache_enable="True", trt_timing_cache_path=str(cache_dir))
    return opts


def tensorrt_cache_dir(path: Path) -> Path:
    """``<stem>.ort-trt-cache/<first 16 hex of the ONNX's sha256>``: ONNX Runtime keys its engine cache by
    the graph's structure and names, not its weights, so a re-export under the same name needs a new folder."""
    from vitdeploy.io import sha256_file

    return path.with_name(path.stem + TENSORRT_CACHE_SUFFIX) / sha256_file(path)[:16]


def _tensorrt_options(path: Path, engine_cache: str | None) -> dict[str, str]:
    name, dims, batch = onnx_batch_range(path)
    cache: Path | None = Path(engine_cache) if engine_cache else tensorrt_cache_dir(path)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        import warnings

        warnings.warn(f"TensorRT provider: no engine cache ({cache}: {e.strerror}); each start rebuilds "
                      "the engine: pass engine_cache= a writable folder", stacklevel=3)
        cache = None
    return tensorrt_provider_options(name, dims, batch, cache)


def parse_device(device: str) -> tuple[str, int | None]:
    """``auto``, ``cpu``, ``cuda[:N]`` or ``tensorrt[:N]`` -> (kind, N or None); anything else refused."""
    import re

    text = str(device).strip().lower()
    m = re.fullmatch(r"(auto|cpu|cuda|tensorrt)(?::(\d+))?", text)
    if m is None or (m.group(2) is not None and m.group(1) in ("auto", "cpu")):
        raise VitDeployError(f"--device {device!r}: ONNX Runtime runs on auto, cpu, cuda, cuda:N, tensorrt or "
                             "tensorrt:N")
    return m.group(1), int(m.group(2)) if m.group(2) is not None else None


def choose_providers(device: str = "auto", tensorrt_options: Callable[[], dict[str, str]] | None = None) -> list[Any]:
    """TensorRT, then CUDA, then CPU, as far as this onnxruntime build and ``device`` allow.

    ``tensorrt_options`` makes the TensorRT provider's options, called only where that provider is chosen.
    ``cuda:N`` / ``tensorrt:N`` give both GPU providers ``device_id`` N; a GPU device that no offered
    provider can run is refused (never quietly the CPU).
    """
    import onnxruntime as ort

    kind, index = parse_device(device)
    on = {"device_id": str(index)} if index is not None else {}
    available = ort.get_available_providers()
    if kind == "tensorrt" and _PROVIDER["tensorrt"] not in available:
        raise VitDeployError(f"--device {device}: this onnxruntime has no TensorRT execution provider "
                             f"({', '.join(available)}): {GPU_ORT_INSTALL}; or use --device cuda")
    providers: list[Any] = []
    if kind in ("auto", "cuda", "tensorrt"):
        if _PROVIDER["tensorrt"] in available and kind != "cuda":
            providers.append((_PROVIDER["tensorrt"], {**(tensorrt_options() if tensorrt_options else {}), **on}))
        if _PROVIDER["cuda"] in available:
            providers.append((_PROVIDER["cuda"], on) if on else _PROVIDER["cuda"])
        if kind == "cuda" and not providers:
            raise VitDeployError(f"--device {device}: this onnxruntime has no GPU providers ({', '.join(available)}): "
                                 f"{GPU_ORT_INSTALL}")
    providers.append("CPUExecutionProvider")
    return providers


def _check_provider(device: str, running: list[str]) -> None:
    """Refuse a session that ONNX Runtime quietly moved off the provider ``device`` asked for (it falls
    back, with a printed "EP Error", when the provider's libraries or the GPU are missing)."""
    wanted = _PROVIDER.get(parse_device(device)[0])
    if wanted and wanted not in running:
        raise VitDeployError(f"--device {device}: ONNX Runtime could not start its {wanted} and fell back to "
                             f"{', '.join(running)} (its EP Error above names the missing library): install "
                             "the GPU libraries onnxruntime-gpu needs (CUDA, cuDNN; TensorRT for --device tensorrt)"
                             ", or choose another --device")


def _input_dtype(name: str, ort_type: str) -> str:
    """The numpy name of an ONNX input's element type, when the Runtime interface can feed it."""
    found = dtypes.lookup(ort_type).numpy if ort_type in {r.ort for r in dtypes.TABLE} else ort_type
    if found not in INPUT_DTYPES:
        raise VitDeployError(f"ONNX input {name!r} is {found}: vitdeploy feeds float32, float16 or uint8 pixels; "
                             "export the model with vitdeploy")
    return found


class OnnxRuntime(Runtime):
    backend = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None,
                 optimization: str = "all", engine_cache: str | None = None,
                 qdq_activations: str = "auto", spinning: bool = True) -> None:
        """``qdq_activations``: "int8" runs Q/DQ files as written; "uint8" runs int8 activation Q/DQ
        as uint8 (exact, see :func:`qdq_activations_to_uint8`); "auto" does so on x86 with the CPU
        provider only, where it is ONNX Runtime's fast integer path. ``spinning=False``: the intra-op
        threads sleep between calls instead of spinning for work (ONNX Runtime's
        ``session.intra_op.allow_spinning``), for a process whose cores also serve requests."""
        import onnxruntime as ort

        if qdq_activations not in QDQ_ACTIVATIONS:
            raise VitDeployError(f"qdq_activations must be one of {', '.join(QDQ_ACTIVATIONS)}, "
                                 f"not {qdq_activations!r}")
        self.path = Path(path)
        check_onnx_external_data(self.path)  # older ONNX Runtime releases follow '..' and absolute locations
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = threads or usable_cpus()
        so.inter_op_num_threads = 1
        if not spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.spinning = spinning
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        self.threads = so.intra_op_num_threads
        providers = choose_providers(device, lambda: _tensorrt_options(self.path, engine_cache))
        cpu_only = providers == ["CPUExecutionProvider"]
        want_u8 = qdq_activations == "uint8" or (qdq_activations == "auto" and cpu_only and is_x86())
        source: str | bytes = str(self.path)
        self.qdq_rewritten = 0
        if want_u8 and self.path.is_file():
            source = self._uint8_source() or source
        try:
            self.session = ort.InferenceSession(source, so, providers=providers)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise VitDeployError(f"ONNX Runtime cannot load {self.path}: {first}") from None
        _check_provider(device, self.session.get_providers())
        self.where = {"CPU": "cpu", "CUDA": "cuda", "Tensorrt": "cuda"}.get(
            self.session.get_providers()[0].replace("ExecutionProvider", ""), "?")
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        dims = inp.shape
        if len(dims) < 2 or any(not isinstance(d, int) for d in dims[1:]):
            raise VitDeployError(f"{self.path}: input {inp.name} needs static non-batch dims, got {dims}")
        lo, hi = (dims[0], dims[0]) if isinstance(dims[0], int) else (1, DYNAMIC_MAX_BATCH)
        self.spec = InputSpec(inp.name, _input_dtype(inp.name, inp.type), tuple(dims[1:]), lo, hi)
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata = ArtifactMetadata.from_props(props) if any(k.startswith(PREFIX) for k in props) else None

    def _uint8_source(self) -> bytes | None:
        """The model with uint8 activation Q/DQ as bytes, or None where there is nothing to rewrite."""
        import onnx

        try:
            model = onnx.load(str(self.path), load_external_data=False)
        except Exception:
            return None  # ONNX Runtime reports the unreadable file itself
        if not any(n.op_type == "QuantizeLinear" for n in model.graph.node):
            return None
        if any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer):
            onnx_external_data(model, self.path.parent)  # refuses locations outside the file's folder
            onnx.load_external_data_for_model(model, str(self.path.parent))
        self.qdq_rewritten = qdq_activations_to_uint8(model)
        if not self.qdq_rewritten or model.ByteSize() > _PROTOBUF_LIMIT:
            self.qdq_rewritten = 0
            return None
        return model.SerializeToString()

    def describe(self) -> str:
        provider = self.session.get_providers()[0].replace("ExecutionProvider", "")
        precision = self.metadata.precision if self.metadata else "?"
        qdq = ", Q/DQ as uint8" if self.qdq_rewritten else ""
        return f"onnxruntime[{provider}, {self.threads} threads{qdq}] {self.path.name} ({precision})"

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]

__getattr__ = moved(__name__, {"default_threads": "vitdeploy.sysinfo:usable_cpus"})
