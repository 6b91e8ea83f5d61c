"""Backends behind one Runtime interface, and :func:`open_runtime` that picks one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitdeploy.engines.base import InputError, InputSpec, Runtime
from vitdeploy.errors import VitDeployError

__all__ = ["BACKENDS", "InputError", "InputSpec", "Runtime", "artifact_kind", "open_runtime"]

BACKENDS = ("auto", "onnxruntime", "openvino", "tensorrt", "torch")
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def artifact_kind(path: str | Path) -> str:
    """'onnx', 'engine' or 'checkpoint' (anything load_model takes), from the file itself."""
    p = Path(str(path))
    if p.is_file():
        with open(p, "rb") as f:
            head = f.read(16)
        if p.suffix == ".onnx":
            return "onnx"
        if p.suffix in ENGINE_SUFFIXES:
            return "engine"
        if p.suffix in (".safetensors", ".pth", ".pt", ".bin"):
            return "checkpoint"
        raise VitDeployError(
            f"{p} is not an ONNX file (.onnx), a TensorRT engine (.engine/.plan) or a checkpoint "
            f"(first bytes {head[:8]!r})"
        )
    return "checkpoint"


def open_runtime(path: str | Path, backend: str = "auto", device: str = "auto", **options: Any) -> Runtime:
    """Open an artifact with the right backend.

    auto: a TensorRT engine -> TensorRT; an ONNX -> ONNX Runtime (TensorRT, CUDA or CPU provider, in
    that order of availability); anything else -> our torch model via :func:`vitdeploy.load_model`.
    ``options`` go to the backend (threads, dtype, compile, config, seed, ...).
    """
    if backend not in BACKENDS:
        raise VitDeployError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    kind = artifact_kind(path)
    if backend == "auto":
        backend = {"onnx": "onnxruntime", "engine": "tensorrt", "checkpoint": "torch"}[kind]
    config, seed = options.pop("config", None), options.pop("seed", None)
    if backend == "torch":
        if kind != "checkpoint":
            raise VitDeployError(f"the torch backend runs checkpoints, not {kind} files: {path}")
        from vitdeploy.engines.torch_backend import TorchRuntime

        return TorchRuntime(path, config=config, seed=seed, device=device, **options)
    if kind == "checkpoint" and not Path(str(path)).exists():
        raise VitDeployError(f"{path}: the {backend} backend needs an existing file")
    if backend == "onnxruntime":
        if kind != "onnx":
            raise VitDeployError(f"ONNX Runtime runs .onnx files, not {kind} files: {path}")
        from vitdeploy.engines.onnxruntime_backend import OnnxRuntime

        return OnnxRuntime(path, device=device, **options)
    if backend == "openvino":
        if kind != "onnx":
            raise VitDeployError(f"OpenVINO runs .onnx files here, not {kind} files: {path}")
        from vitdeploy.engines.openvino_backend import OpenVinoRuntime

        return OpenVinoRuntime(path, **options)
    if kind != "engine":
        raise VitDeployError(f"the TensorRT backend runs engines: build one with `vitdeploy build {path}`")
    from vitdeploy.engines.tensorrt_runtime import TensorRTRuntime

    return TensorRTRuntime(path, **options)
