"""What an artifact is: ONNX metadata, ops and Q/DQ coverage; an engine's sidecar, I/O and layers.

(Named ``inspection``, not ``inspect``, so that it does not shadow the standard library's module.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitdeploy.errors import VitDeployError
from vitdeploy.io import onnx_external_data


def inspect_artifact(path: str | Path) -> dict[str, Any]:
    from vitdeploy.engines import artifact_kind

    path = Path(path)
    kind = artifact_kind(path)
    if kind == "onnx":
        return inspect_onnx(path)
    if kind == "engine":
        return inspect_engine(path)
    raise VitDeployError(f"{path}: inspect reads .onnx files and TensorRT engines")


def inspect_onnx(path: Path) -> dict[str, Any]:
    import onnx

    from vitdeploy.artifacts.metadata import PREFIX, ArtifactMetadata
    from vitdeploy.exporters.onnx_export import histogram
    from vitdeploy.exporters.precision import qdq_coverage
    from vitdeploy.io import load_onnx_graph

    model = load_onnx_graph(path)

    def shape(vi: Any) -> list[Any]:
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    onnx_external_data(model, path.parent)  # a location outside the file's folder is refused here
    props = {p.key: p.value for p in model.metadata_props}
    # no vitdeploy metadata: None; metadata that is there but invalid: its one-line error
    meta = ArtifactMetadata.from_props(props).to_dict() if any(k.startswith(PREFIX) for k in props) else None
    qdq = qdq_coverage(model)
    ort_cpu = _onnxruntime_cpu(path, model) if qdq["q_nodes"] else None
    return {
        "path": str(path), "kind": "onnx", "bytes": path.stat().st_size,
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "inputs": [{"name": i.name, "shape": shape(i), "dtype": onnx.helper.tensor_dtype_to_np_dtype(
            i.type.tensor_type.elem_type).name} for i in model.graph.input],
        "outputs": [{"name": o.name, "shape": shape(o)} for o in model.graph.output],
        "nodes": len(model.graph.node), "ops": histogram(model), "qdq": qdq,
        **({"onnxruntime_cpu": ort_cpu} if ort_cpu else {}), "model": meta,
    }


def _onnxruntime_cpu(path: Path, model: Any) -> dict[str, Any] | None:
    """Weighted ops ONNX Runtime's CPU provider runs as integer kernels, as written and as uint8."""
    import copy
    import importlib.util

    import onnx

    if importlib.util.find_spec("onnxruntime") is None or path.stat().st_size > 2**31 - 1:
        return None
    from vitdeploy.engines.onnxruntime_backend import cpu_kernel_report, qdq_activations_to_uint8

    if any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer):
        return None
    try:
        report: dict[str, Any] = {"as_written": cpu_kernel_report(model)}
        as_uint8 = copy.deepcopy(model)
        if qdq_activations_to_uint8(as_uint8):
            report["qdq_as_uint8"] = cpu_kernel_report(as_uint8)
    except Exception:  # a model ONNX Runtime cannot load: the runtime commands say why
        return None
    return report


def inspect_engine(path: Path) -> dict[str, Any]:
    from vitdeploy.engines.tensorrt.build import current_gpu
    from vitdeploy.engines.tensorrt.sidecar import EngineSidecar

    side = EngineSidecar.read(path)
    info: dict[str, Any] = {
        "path": str(path), "kind": "engine", "bytes": path.stat().st_size,
        "flavour": side.flavour, "trt_version": side.trt_version, "targets": side.targets,
        "precision": side.precision, "io": [vars(t) for t in side.io], "profile": side.profile,
        "onnx_sha256": side.onnx_sha256, "engine_sha256": side.engine_sha256, "build_seconds": side.build_seconds,
        "verification": (side.verification or {}).get("summary") or (side.verification or {}).get("reason"),
        "model": side.model,
    }
    gpu = current_gpu()
    if gpu is None:
        info["layers"] = "needs a GPU (the engine inspector deserializes the engine)"
        return info
    from vitdeploy.engines.tensorrt.runtime import engine_layers

    try:
        info["layers"] = engine_layers(path)
    except VitDeployError as e:  # e.g. a TensorRT-RTX engine on a GPU it cannot run on
        info["layers"] = f"not available here: {e}"
    return info
