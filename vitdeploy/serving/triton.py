"""A Triton Inference Server model repository for an engine (tensorrt_plan) or an ONNX
(onnxruntime_onnx): ``REPO/NAME/config.pbtxt``, ``REPO/NAME/1/model.{plan,onnx}``, labels."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitdeploy.errors import VitDeployError

_TRITON_TYPES = {"float32": "TYPE_FP32", "float": "TYPE_FP32", "float16": "TYPE_FP16", "half": "TYPE_FP16"}


@dataclass
class TritonRepo:
    model_dir: Path
    config: Path
    model_file: Path
    labels: Path | None


def _artifact_io(path: Path) -> dict[str, Any]:
    """Input/output names, dtypes, per-item dims and batch limits, from the sidecar or the ONNX."""
    from vitdeploy.engines import artifact_kind

    kind = artifact_kind(path)
    if kind == "engine":
        from vitdeploy.inspect import read_sidecar

        side = read_sidecar(path)
        inp = next(t for t in side["io"] if t["mode"] == "input")
        out = next(t for t in side["io"] if t["mode"] == "output")
        labels = (side.get("model") or {}).get("labels", [])
        return {"platform": "tensorrt_plan", "file": "model.plan", "input": inp["name"], "output": out["name"],
                "in_dtype": inp["dtype"], "out_dtype": out["dtype"], "in_dims": inp["shape"][1:],
                "out_dims": out["shape"][1:], "static_batch": None if inp["shape"][0] == -1 else inp["shape"][0],
                "max_batch": side["profile"]["max"][0], "labels": labels}
    if kind == "onnx":
        from vitdeploy.inspect import inspect_onnx

        info = inspect_onnx(path)
        inp, out = info["inputs"][0], info["outputs"][0]
        batch = inp["shape"][0]
        return {"platform": "onnxruntime_onnx", "file": "model.onnx", "input": inp["name"], "output": out["name"],
                "in_dtype": inp["dtype"], "out_dtype": inp["dtype"], "in_dims": inp["shape"][1:],
                "out_dims": out["shape"][1:], "static_batch": batch if isinstance(batch, int) else None,
                "max_batch": None, "labels": (info.get("model") or {}).get("labels", [])}
    raise VitDeployError(f"{path}: Triton repositories hold an ONNX file or a TensorRT engine")


def write_triton_repo(artifact: str | Path, repo: str | Path, name: str | None = None, max_batch: int | None = None,
                      instances: int = 1, kind: str = "gpu", max_queue_delay_us: int = 100,
                      preferred: list[int] | None = None) -> TritonRepo:
    artifact = Path(artifact)
    io = _artifact_io(artifact)
    name = name or re.sub(r"[^A-Za-z0-9_-]", "_", artifact.stem)
    repo = Path(repo)
    model_dir = repo / name
    if kind not in ("gpu", "cpu"):
        raise VitDeployError("--kind: gpu or cpu")
    if io["platform"] == "tensorrt_plan" and kind == "cpu":
        raise VitDeployError("a TensorRT engine runs on a GPU instance group (--kind gpu)")
    if io["static_batch"] is not None:
        # a static batch is part of the tensor: Triton's batching is off (max_batch_size 0)
        mb, in_dims, out_dims = 0, [io["static_batch"], *io["in_dims"]], [io["static_batch"], *io["out_dims"]]
        if max_batch:
            raise VitDeployError(f"{artifact.name} has a static batch of {io['static_batch']}: "
                                 "re-export with --dynamic-batch to use --max-batch")
    else:
        limit = io["max_batch"]
        mb = max_batch or limit or 32
        if limit is not None and mb > limit:
            raise VitDeployError(f"--max-batch {mb} exceeds the engine's profile maximum {limit}")
        in_dims, out_dims = io["in_dims"], io["out_dims"]
    lines = [
        f'name: "{name}"',
        f'platform: "{io["platform"]}"',
        f"max_batch_size: {mb}",
        "input [",
        f'  {{ name: "{io["input"]}" data_type: {_TRITON_TYPES[io["in_dtype"]]} dims: {list(in_dims)} }}',
        "]",
        "output [",
        f'  {{ name: "{io["output"]}" data_type: {_TRITON_TYPES[io["out_dtype"]]} dims: {list(out_dims)}'
        + (' label_filename: "labels.txt"' if io["labels"] else "") + " }",
        "]",
    ]
    if mb > 0:
        prefs = preferred or [b for b in (4, 8, 16, 32, 64) if b <= mb] or [mb]
        lines += ["dynamic_batching {", f"  preferred_batch_size: {prefs}",
                  f"  max_queue_delay_microseconds: {max_queue_delay_us}", "}"]
    lines += ["instance_group [", f"  {{ count: {instances} kind: KIND_{kind.upper()} }}", "]"]
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    model_file = version_dir / io["file"]
    shutil.copyfile(artifact, model_file)
    data = artifact.with_name(artifact.name + ".data")
    if data.is_file():
        shutil.copyfile(data, version_dir / data.name)
    labels = None
    if io["labels"]:
        labels = model_dir / "labels.txt"
        labels.write_text("\n".join(io["labels"]) + "\n")
    config = model_dir / "config.pbtxt"
    config.write_text("\n".join(lines) + "\n")
    return TritonRepo(model_dir, config, model_file, labels)
