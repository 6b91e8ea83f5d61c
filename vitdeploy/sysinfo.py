"""What machine and which library versions produced a result (for `info` and benchmark JSON)."""

from __future__ import annotations

import importlib.util
import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from typing import Any

_DISTS = {
    "vitdeploy": ("vitdeploy",),
    "torch": ("torch",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"),
    "onnxscript": ("onnxscript",),
    "openvino": ("openvino",),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_cu12_bindings", "tensorrt_cu13_bindings"),
    "tensorrt_rtx": ("tensorrt_rtx_cu13", "tensorrt_rtx_cu12", "tensorrt-rtx"),
    "cuda-python": ("cuda-python", "cuda-bindings"),
    "pycuda": ("pycuda",),
    "transformers": ("transformers",),
}


def is_x86() -> bool:
    """An x86 CPU (64- or 32-bit), where ONNX Runtime's integer kernels take uint8 x int8."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask, which containers and taskset narrow):
    the default thread count of every CPU backend."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for key, dists in _DISTS.items():
        out[key] = None
        for dist in dists:
            try:
                out[key] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name, with its family and model numbers (clouds often report a bare "AMD EPYC")."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not key.strip():
                    break  # the first processor is enough
                fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    name = fields.get("model name")
    if not name:
        return platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni", "avx_vnni_int8")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in present]
    except OSError:
        pass
    return []


# TensorRT-RTX runs RTX-class GPUs only (its ComputeCapability enum); Hopper (sm90), Blackwell datacenter
# (sm100, sm103), Thor (sm110) and every other part need full TensorRT, which runs on all of them.
RTX_COMPUTE_CAPABILITIES = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")
TRT_FLAVOURS = {"tensorrt": "full TensorRT", "tensorrt_rtx": "TensorRT-RTX"}


def trt_flavours_for(compute_capability: str) -> list[str]:
    """The TensorRT flavours whose engines run on a GPU of ``compute_capability`` (smXY), full TensorRT first."""
    if compute_capability in RTX_COMPUTE_CAPABILITIES:
        return ["tensorrt", "tensorrt_rtx"]
    return ["tensorrt"]


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    compute_capability: str  # smXY

    @property
    def trt_flavours(self) -> list[str]:
        return trt_flavours_for(self.compute_capability)

    def describe(self) -> str:
        return f"{self.name} ({self.compute_capability})"


def cudart() -> Any:
    """cuda-python's runtime module in either layout (``cuda.bindings.runtime``, or ``cuda.cudart`` before
    12.6), or None when cuda-python is not installed."""
    try:
        from cuda.bindings import runtime  # type: ignore[import-not-found]

        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart as runtime  # type: ignore[import-not-found,no-redef]

        return runtime
    except ImportError:
        return None


def cuda_devices() -> list[Gpu]:
    """Visible CUDA devices, via cuda-python when installed, else torch; [] without a GPU or driver."""
    rt = cudart()
    if rt is not None:
        err, count = rt.cudaGetDeviceCount()
        if int(err) != 0:
            return []
        out = []
        for i in range(count):
            err, prop = rt.cudaGetDeviceProperties(i)
            if int(err) == 0:
                name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
                out.append(Gpu(i, name.strip("\x00").strip(), f"sm{prop.major}{prop.minor}"))
        return out
    if importlib.util.find_spec("torch") is None:
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        out.append(Gpu(i, torch.cuda.get_device_name(i), f"sm{major}{minor}"))
    return out


def gpus() -> list[str]:
    """CUDA devices as 'name (smXY)'; [] without a GPU."""
    return [g.describe() for g in cuda_devices()]


def gpu_flavours() -> list[dict[str, Any]]:
    """Per visible GPU: which TensorRT flavours can run engines on it, and why not the other."""
    out = []
    for g in cuda_devices():
        flavours = g.trt_flavours
        note = None if "tensorrt_rtx" in flavours else (
            f"TensorRT-RTX cannot run on {g.compute_capability}; build with full TensorRT (--trt tensorrt)")
        out.append({"index": g.index, "name": g.name, "compute_capability": g.compute_capability,
                    "trt_flavours": flavours, "note": note})
    return out


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpus": gpus(),
    }


def backends() -> dict[str, Any]:
    """Backend name -> True when usable here, else the reason it is not."""
    out: dict[str, Any] = {}
    if importlib.util.find_spec("onnxruntime"):
        import onnxruntime as ort

        out["onnxruntime"] = True
        providers = ort.get_available_providers()
        for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
            out[f"onnxruntime:{p}"] = True if p in providers else "provider not in this onnxruntime build"
    else:
        out["onnxruntime"] = "pip install onnxruntime"
    out["openvino"] = True if importlib.util.find_spec("openvino") else "pip install 'vitdeploy[openvino]'"
    out["torch"] = True if importlib.util.find_spec("torch") else "pip install torch"
    devices = cuda_devices()
    for mod, extra in (("tensorrt", "tensorrt"), ("tensorrt_rtx", "tensorrt-rtx")):
        if importlib.util.find_spec(mod) is None:
            out[f"{mod} build"] = f"pip install 'vitdeploy[{extra}]'"
            out[f"{mod} run"] = f"pip install 'vitdeploy[{extra}]' (and a GPU)"
            continue
        runnable = [g for g in devices if mod in g.trt_flavours]
        out[f"{mod} build"] = True if mod == "tensorrt_rtx" or devices else "needs a GPU"
        if runnable:
            out[f"{mod} run"] = True
        elif devices:
            out[f"{mod} run"] = (f"{TRT_FLAVOURS[mod]} cannot run on "
                                 f"{', '.join(g.compute_capability for g in devices)}: use full TensorRT")
        else:
            out[f"{mod} run"] = "needs an NVIDIA GPU"
    return out


def collect() -> dict[str, Any]:
    return {"libraries": library_versions(), "machine": machine(), "backends": backends(),
            "gpu_flavours": gpu_flavours()}
