"""What an artifact is: ONNX metadata, ops and Q/DQ coverage; an engine's sidecar, I/O and layers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vitdeploy.errors import VitDeployError


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

    from vitdeploy.exporters.metadata import ArtifactMetadata
    from vitdeploy.exporters.onnx_export import histogram
    from vitdeploy.exporters.precision import qdq_coverage

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise VitDeployError(f"{path} is not a readable ONNX file ({type(e).__name__})") from None

    def shape(vi: Any) -> list[Any]:
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    props = {p.key: p.value for p in model.metadata_props}
    qdq = qdq_coverage(model)
    ort_cpu = _onnxruntime_cpu(path, model) if qdq["q_nodes"] else None
    try:
        meta: dict[str, Any] | None = ArtifactMetadata.from_props(props).to_dict()
    except VitDeployError:
        meta = None
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


def read_sidecar(engine: Path) -> dict[str, Any]:
    from vitdeploy.engines.tensorrt_build import sidecar_path

    side = sidecar_path(engine)
    if not side.is_file():
        raise VitDeployError(f"{engine} has no sidecar {side.name}: rebuild it with `vitdeploy build`")
    try:
        data = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VitDeployError(
            f"sidecar {side} is corrupt ({e.__class__.__name__}): rebuild with `vitdeploy build`"
        ) from None
    if not isinstance(data, dict) or data.get("format") != "vitdeploy-engine/1":
        raise VitDeployError(f"sidecar {side} is not a vitdeploy engine sidecar: rebuild with `vitdeploy build`")
    return data


def inspect_engine(path: Path) -> dict[str, Any]:
    side = read_sidecar(path)
    info: dict[str, Any] = {
        "path": str(path), "kind": "engine", "bytes": path.stat().st_size,
        "flavour": side["flavour"], "trt_version": side["trt_version"], "targets": side["targets"],
        "precision": side["precision"], "io": side["io"], "profile": side["profile"],
        "onnx_sha256": side["onnx"]["sha256"], "build_seconds": side["build_seconds"], "model": side.get("model"),
    }
    from vitdeploy.engines.tensorrt_build import current_gpu

    if current_gpu() is None:
        info["layers"] = "needs a GPU (the engine inspector deserializes the engine)"
        return info
    from vitdeploy.engines.tensorrt_runtime import engine_layers

    info["layers"] = engine_layers(path, side)
    return info
