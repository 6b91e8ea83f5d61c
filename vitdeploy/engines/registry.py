"""One registry of backends: name -> (runtime class, typed options, artifact kinds, devices).

:func:`vitdeploy.engines.open_runtime` validates every option against it, so an unknown option is one
clear error listing the valid ones (never a ``TypeError`` from a constructor), and a device a backend
cannot honour is refused instead of dropped.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any

from vitdeploy.errors import VitDeployError


@dataclass(frozen=True)
class OnnxRuntimeOptions:
    threads: int | None = None
    optimization: str = "all"  # disable | basic | extended | all
    engine_cache: str | None = None
    qdq_activations: str = "auto"  # auto | int8 | uint8
    spinning: bool = True  # intra-op threads spin for work between calls


@dataclass(frozen=True)
class OpenVinoOptions:
    threads: int | None = None
    precision_hint: str = "f32"  # f32 | bf16 | f16
    hint: str = "LATENCY"  # LATENCY | THROUGHPUT
    attention: str = "as_written"  # as_written | float (attention's Q/DQ dropped when read)


@dataclass(frozen=True)
class TensorRTOptions:
    cuda_graph: bool = False
    memory: str = "auto"  # auto | cuda-python | pycuda
    runtime_cache: bool = True  # TensorRT-RTX's JIT cache beside the engine
    instances: int = 1  # execution contexts in flight
    max_graphs: int = 8  # batch sizes each instance captures (the first it runs); others run without a graph


@dataclass(frozen=True)
class TorchOptions:
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    compile: bool = False
    sdpa: bool = True
    threads: int | None = None
    max_batch: int = 256
    config: Any = None  # config.json or preset for bare weight files
    seed: int | None = None


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # imported only when the backend is opened
    cls: str
    options: type
    kinds: tuple[str, ...]  # artifact kinds it runs
    devices: tuple[str, ...]  # device families it runs on: cpu, cuda
    hint: str = ""  # what to do with an artifact of another kind ({path}, {kind})


REGISTRY: dict[str, Backend] = {b.name: b for b in (
    Backend("onnxruntime", "vitdeploy.engines.onnxruntime_backend", "OnnxRuntime", OnnxRuntimeOptions, ("onnx",),
            ("cpu", "cuda", "tensorrt"), "ONNX Runtime runs .onnx files, not {kind} files: {path}"),
    Backend("openvino", "vitdeploy.engines.openvino_backend", "OpenVinoRuntime", OpenVinoOptions, ("onnx",),
            ("cpu",), "OpenVINO runs .onnx files here, not {kind} files: {path}"),
    Backend("tensorrt", "vitdeploy.engines.tensorrt.runtime", "TensorRTRuntime", TensorRTOptions, ("engine",),
            ("cuda",), "the TensorRT backend runs engines: build one with `vitdeploy build {path}`"),
    Backend("torch", "vitdeploy.engines.torch_backend", "TorchRuntime", TorchOptions, ("checkpoint",),
            ("cpu", "cuda"), "the torch backend runs checkpoints, not {kind} files: {path}"),
)}


def option_names(backend: str) -> list[str]:
    return [f.name for f in dataclasses.fields(REGISTRY[backend].options)]


def check_options(backend: str, options: dict[str, Any]) -> Any:
    """The backend's typed options from ``options``, or one VitDeployError naming the unknown ones."""
    entry = REGISTRY[backend]
    known = option_names(backend)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise VitDeployError(f"the {backend} backend takes no option {', '.join(map(repr, unknown))}: "
                             f"it takes {', '.join(known)}")
    return entry.options(**options)


def check_device(backend: str, device: str) -> None:
    """Refuse a device the backend cannot run on (``auto`` always passes: the backend picks)."""
    family = device.split(":", 1)[0].lower()
    if device == "auto" or family in REGISTRY[backend].devices:
        return
    raise VitDeployError(f"--device {device}: the {backend} backend runs on {', '.join(REGISTRY[backend].devices)}")


def check_kind(backend: str, kind: str, path: Any) -> None:
    entry = REGISTRY[backend]
    if kind not in entry.kinds:
        raise VitDeployError(entry.hint.format(kind=kind, path=path))


def runtime_class(backend: str) -> Any:
    entry = REGISTRY[backend]
    return getattr(importlib.import_module(entry.module), entry.cls)


# the compute number format a user names (`bench --dtype bf16`) -> each backend's own option for it
DTYPE_OPTION = {"openvino": "precision_hint", "torch": "dtype"}


def dtype_options(backend: str, dtype: str | None) -> dict[str, Any]:
    """The options that ask ``backend`` to compute in ``dtype`` ({} for none, or a backend without a
    choice: ONNX Runtime and TensorRT compute in the file's own precision)."""
    name = DTYPE_OPTION.get(backend)
    return {name: dtype} if dtype and name else {}
