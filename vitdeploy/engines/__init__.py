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

    auto: a TensorRT engine -> TensorRT; an ONNX -> the path its tune plan (``m.tune.json``, written by
    ``vitdeploy tune``) chose on this machine, when the run is CPU-only and the plan matches this
    machine and file, else ONNX Runtime (TensorRT, CUDA or CPU provider, in that order of
    availability); anything else -> our torch model via :func:`vitdeploy.load_model`.
    ``options`` go to the backend (threads, dtype, compile, config, seed, ...); with a plan, only
    ``threads`` may be given (it overrides the plan's), any other option bypasses the plan.
    ``use_plan=False`` ignores a plan. ``shared_cores=True``: the process's cores also do other work (a
    server's request handling), so runtimes that would spin waiting for work (ONNX Runtime) sleep instead.
    An engine runs on ``device`` ``cuda`` / ``auto`` (device 0) or
    ``cuda:N``, never ``cpu``; its options include ``cuda_graph`` and ``instances`` (contexts in flight).
    """
    from vitdeploy.engines import registry

    if backend not in BACKENDS:
        raise VitDeployError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    kind = artifact_kind(path)
    use_plan = options.pop("use_plan", True)
    shared_cores = bool(options.pop("shared_cores", False))
    checkpoint_args = {k: options.pop(k) for k in ("config", "seed") if options.get(k) is not None}
    options = {k: v for k, v in options.items() if k not in ("config", "seed")}  # None: not given
    if backend == "auto" and kind == "onnx" and use_plan and set(options) <= {"threads"} and _cpu_only(device):
        planned = _open_planned(path, options.get("threads"), shared_cores)
        if planned is not None:
            return planned
    if backend == "auto":
        backend = {"onnx": "onnxruntime", "engine": "tensorrt", "checkpoint": "torch"}[kind]
    if backend != "torch" and not Path(str(path)).exists():
        raise VitDeployError(f"{path}: the {backend} backend needs an existing file")
    registry.check_kind(backend, kind, path)
    if checkpoint_args and backend != "torch":  # the architecture and random-init seed of a checkpoint
        raise VitDeployError(f"--config/--seed describe a checkpoint; {Path(str(path)).name} carries its own")
    options.update(checkpoint_args)
    if shared_cores and backend == "onnxruntime":
        options.setdefault("spinning", False)
    if backend != "tensorrt":  # an engine's device goes through parse_device, which says more
        registry.check_device(backend, device)
    registry.check_options(backend, options)  # unknown names: one error listing the valid ones
    cls = registry.runtime_class(backend)
    if backend == "openvino":  # OpenVINO's own device name
        return cls(path, device="CPU", **options)
    if backend == "tensorrt":
        from vitdeploy.engines.tensorrt.runtime import parse_device

        return cls(path, device=parse_device(device), **options)
    return cls(path, device=device, **options)


def _cpu_only(device: str) -> bool:
    """A tune plan ranks CPU paths: it applies when ONNX Runtime would run on the CPU anyway."""
    if device == "cpu":
        return True
    if device != "auto":
        return False
    try:
        import onnxruntime as ort
    except ImportError:
        return True
    return not {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers())


def _open_planned(path: str | Path, threads: int | None, shared_cores: bool) -> Runtime | None:
    from vitdeploy.engines.plan import PathChoice, PlannedRuntime, load_matching_plan

    plan = load_matching_plan(path)
    if plan is None:
        return None

    def opener(choice: PathChoice) -> Runtime:
        opts = {**choice.options, **({"threads": threads} if threads else {})}
        return open_runtime(path, backend=choice.backend, device="cpu", use_plan=False, shared_cores=shared_cores,
                            **opts)

    return PlannedRuntime(plan, opener)
