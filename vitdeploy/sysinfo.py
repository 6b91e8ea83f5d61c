"""What machine and which library versions produced a result (for `info` and benchmark JSON)."""

from __future__ import annotations

import importlib.util
import os
import platform
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


def gpus() -> list[str]:
    """CUDA devices as 'name (sm_XY)', via torch when it is installed; [] otherwise."""
    if importlib.util.find_spec("torch") is None:
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        out.append(f"{torch.cuda.get_device_name(i)} (sm_{major}{minor})")
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
    has_gpu = bool(gpus())
    for mod, extra in (("tensorrt", "tensorrt"), ("tensorrt_rtx", "tensorrt-rtx")):
        if importlib.util.find_spec(mod) is None:
            out[f"{mod} build"] = f"pip install 'vitdeploy[{extra}]'"
            out[f"{mod} run"] = f"pip install 'vitdeploy[{extra}]' (and a GPU)"
            continue
        out[f"{mod} build"] = True if mod == "tensorrt_rtx" or has_gpu else "needs a GPU"
        out[f"{mod} run"] = True if has_gpu else "needs an NVIDIA GPU"
    return out


def collect() -> dict[str, Any]:
    return {"libraries": library_versions(), "machine": machine(), "backends": backends()}
