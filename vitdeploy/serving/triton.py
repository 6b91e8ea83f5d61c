"""A Triton Inference Server model repository for an ONNX or a TensorRT engine.

Two layouts, one I/O:
- native (default): Triton's own backend runs the file: ``onnxruntime_onnx`` for an ONNX,
  ``tensorrt_plan`` for a full-TensorRT engine. ``REPO/NAME/config.pbtxt``, ``REPO/NAME/1/model.{onnx,plan}``.
- python: Triton's Python backend runs vitdeploy's own Runtime (``model.py`` from
  :mod:`vitdeploy.serving.triton_model`) on the artifact: an ONNX through ONNX Runtime or OpenVINO, an
  engine of either TensorRT flavour. This is how a TensorRT-RTX engine serves in Triton: Triton's
  TensorRT backend is full TensorRT and cannot load it.

The model folder is written in a staging folder on the repository's file system (beside it, or inside
it under a hidden name when the repository is a mount point: see :func:`_stage_dir`) and renamed into
place, so a failed write leaves no half-written model for Triton to load. config.pbtxt is rendered
through Triton's ModelConfig protobuf, and every name and number in it is validated first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitdeploy import dtypes
from vitdeploy.errors import VitDeployError

# the I/O types a ViT artifact has (numpy names from ONNX, TensorRT's from engine sidecars)
_IO_TYPES = ("float32", "float16", "bfloat16", "uint8", "int8")
TRITON_BACKENDS = ("native", "python")
RUNTIME_BACKENDS = ("auto", "onnxruntime", "openvino", "tensorrt")


@dataclass
class TritonRepo:
    model_dir: Path
    config: Path
    model_file: Path
    labels: Path | None
    triton_backend: str = "native"  # native | python


@dataclass
class _ArtifactIO:
    file_type: str  # onnx | engine
    flavour: str | None  # engines: tensorrt | tensorrt_rtx
    input: str
    output: str
    in_dtype: str
    out_dtype: str
    in_dims: list[int]
    out_dims: list[int]
    static_batch: int | None
    max_batch: int | None  # an engine's profile maximum
    labels: list[str]


def _artifact_io(path: Path) -> _ArtifactIO:
    """Input/output names, dtypes, per-item dims and batch limits, from the sidecar or the ONNX."""
    from vitdeploy.engines import artifact_kind

    file_type = artifact_kind(path)
    if file_type == "engine":
        from vitdeploy.engines.tensorrt.sidecar import EngineSidecar

        side = EngineSidecar.read(path)
        inp, out = side.input, side.output
        return _ArtifactIO("engine", side.flavour, inp.name, out.name, inp.dtype, out.dtype, inp.shape[1:],
                           out.shape[1:], None if inp.shape[0] == -1 else inp.shape[0], side.profile["max"][0],
                           list((side.model or {}).get("labels", [])))
    if file_type == "onnx":
        from vitdeploy.inspection import inspect_onnx

        info = inspect_onnx(path)
        inp, out = info["inputs"][0], info["outputs"][0]
        batch = inp["shape"][0]
        out_dtype = "float32" if inp["dtype"] == "uint8" else inp["dtype"]  # a uint8-input graph returns float32
        return _ArtifactIO("onnx", None, inp["name"], out["name"], inp["dtype"], out_dtype, inp["shape"][1:],
                           _output_dims(path, out["shape"][1:], info.get("model")),
                           batch if isinstance(batch, int) and batch > 0 else None, None,
                           list((info.get("model") or {}).get("labels", [])))
    raise VitDeployError(f"{path}: Triton repositories hold an ONNX file or a TensorRT engine")


def _output_dims(path: Path, dims: list[Any], meta: dict[str, Any] | None) -> list[Any]:
    """The output's per-image dims: the graph's, where a symbolic size (an exporter's name for a size it
    did not fold) is the artifact's ``output_size`` (logits or embedding values per image)."""
    size = (meta or {}).get("output_size")
    if len(dims) != 1 or not isinstance(size, int):
        return dims
    if isinstance(dims[0], int) and dims[0] > 0 and dims[0] != size:
        raise VitDeployError(f"{path.name}: its graph's output has {dims[0]} values per image and its metadata says "
                             f"{size}: re-export the model with `vitdeploy export`")
    return [size]


def _triton_type(dtype: str) -> str:
    """Triton's data type for an I/O tensor's numpy or TensorRT type name."""
    row = dtypes.lookup(dtype) if dtype in {n for r in dtypes.TABLE for n in (r.numpy, r.trt)} else None
    if row is not None and row.numpy in _IO_TYPES:
        return row.triton
    raise VitDeployError(f"tensor type {dtype!r} has no Triton data type here: export as float32, "
                         "float16 or uint8 input")


MAX_TRITON_BATCH = 1 << 16  # max_batch_size and preferred sizes: anything above is not a real profile
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,255}")


def _check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not _TENSOR_NAME.fullmatch(value):
        raise VitDeployError(f"{what} {value!r} is not a tensor name Triton's config may hold (letters, digits, "
                             "'_', '.', ':', '/', '-'): re-export the model with `vitdeploy export`")
    return value


def _check_dims(what: str, dims: list[Any]) -> list[int]:
    if not all(type(d) is int and (d == -1 or 1 <= d < 1 << 31) for d in dims):
        raise VitDeployError(f"{what} dims {dims!r} are not sizes (-1 or 1..2^31-1): re-export the model")
    return list(dims)


def _check_count(what: str, value: Any, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise VitDeployError(f"{what} {value!r} is not an integer from {low} to {high}")
    return value


def _check_labels(labels: list[str]) -> list[str]:
    """labels.txt holds one label a line: a label with a line break would shift every label after it."""
    for i, label in enumerate(labels):
        if not isinstance(label, str) or any(c in label for c in "\r\n\x00"):
            raise VitDeployError(f"label {i} ({label!r}) holds a line break: Triton's labels.txt takes one label a "
                                 "line; fix the labels and re-export the model")
    return labels


@dataclass
class _Config:
    """What config.pbtxt says, validated before it is rendered through Triton's own schema."""

    name: str
    header: dict[str, str]  # {"backend": "python"} or {"platform": ...}
    max_batch: int
    io: _ArtifactIO
    in_dims: list[int]
    out_dims: list[int]
    out_type: str
    kind: str
    instances: int
    preferred: list[int]
    max_queue_delay_us: int
    parameters: dict[str, str]
    warmup: list[int]  # batch sizes Triton warms with the golden set's first image (none without a golden set)


WARMUP_FILE = "golden_input"  # in the model folder's warmup/: one preprocessed golden image, raw


def _render_config(c: _Config) -> str:
    """config.pbtxt through tritonclient's ModelConfig protobuf and text_format: every string is
    escaped by protobuf, so no name or path from an artifact can add a field."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2 as mc
    except ImportError:
        raise VitDeployError("writing a Triton repository needs tritonclient: pip install 'vitdeploy[triton]'"
                             ) from None
    cfg = mc.ModelConfig(name=c.name, max_batch_size=c.max_batch, **c.header)
    inp = cfg.input.add(name=_check_name("input name", c.io.input), data_type=mc.DataType.Value(
        _triton_type(c.io.in_dtype)))
    inp.dims.extend(_check_dims("input", c.in_dims))
    out = cfg.output.add(name=_check_name("output name", c.io.output), data_type=mc.DataType.Value(c.out_type))
    out.dims.extend(_check_dims("output", c.out_dims))
    if c.io.labels:
        out.label_filename = "labels.txt"
    if c.max_batch > 0:
        cfg.dynamic_batching.preferred_batch_size.extend(
            [_check_count("preferred batch size", b, 1, c.max_batch) for b in c.preferred])
        cfg.dynamic_batching.max_queue_delay_microseconds = _check_count(
            "--max-queue-delay-us", c.max_queue_delay_us, 0, 60_000_000)
    cfg.instance_group.add(count=_check_count("--instances", c.instances, 1, 1024),
                           kind=mc.ModelInstanceGroup.Kind.Value(f"KIND_{c.kind.upper()}"))
    for key, value in c.parameters.items():
        cfg.parameters[key].string_value = value
    for batch in c.warmup:  # Triton runs these before the model is ready
        warm = cfg.model_warmup.add(name=f"golden_batch_{batch}", batch_size=batch)
        warm.inputs[inp.name].CopyFrom(mc.ModelWarmup.Input(data_type=inp.data_type, dims=inp.dims,
                                                            input_data_file=WARMUP_FILE))
    return text_format.MessageToString(cfg)


def write_triton_repo(artifact: str | Path, repo: str | Path, name: str | None = None, max_batch: int | None = None,
                      instances: int = 1, kind: str | None = None, max_queue_delay_us: int = 100,
                      preferred: list[int] | None = None, backend: str = "auto", triton_backend: str = "native",
                      execution_env: str | Path | None = None, runtime_options: dict[str, Any] | None = None,
                      runtime: str | None = None) -> TritonRepo:
    """Write ``REPO/NAME`` for ``artifact`` (see the module docstring for the two ``triton_backend`` layouts).

    ``kind``: the instance group (gpu | cpu; default gpu for an engine or a native ONNX, cpu for an ONNX on
    the Python backend). ``backend``: the vitdeploy backend the Python model opens the artifact with, as
    everywhere else in vitdeploy (``runtime`` is its old name; ``backend="python"/"native"`` the old
    spelling of ``triton_backend``: both still work, with a DeprecationWarning).
    ``execution_env``: a Python environment (venv folder or conda-pack archive) for the Python backend,
    written as ``EXECUTION_ENV_PATH``; it needs vitdeploy, the runtime's library and numpy < 2.
    """
    backend, triton_backend = _renamed(backend, triton_backend, runtime)
    artifact = Path(artifact)
    io = _artifact_io(artifact)
    python = triton_backend == "python"
    name, kind = _check_request(artifact, io, name, kind, triton_backend, backend, execution_env, runtime_options)
    mb, in_dims, out_dims = _batching(artifact, io, python, max_batch)
    model_file = "model.plan" if io.file_type == "engine" and not python else (
        "model.onnx" if io.file_type == "onnx" else "model.engine")
    header = {"backend": "python"} if python else {
        "platform": "tensorrt_plan" if io.file_type == "engine" else "onnxruntime_onnx"}
    params: dict[str, str] = {}
    if python:
        params = {"VITDEPLOY_ARTIFACT": model_file, "VITDEPLOY_BACKEND": backend,
                  "VITDEPLOY_OPTIONS": json.dumps(runtime_options or {})}
        if execution_env is not None:
            params["EXECUTION_ENV_PATH"] = str(Path(execution_env).resolve())
    warm_input = _warmup_input(artifact, io, in_dims)
    config = _render_config(_Config(
        name, header, mb, io, in_dims, out_dims,
        "TYPE_FP32" if python else _triton_type(io.out_dtype),  # the Runtime returns float32 logits
        kind, instances, preferred or [b for b in (4, 8, 16, 32, 64) if b <= mb] or [mb], max_queue_delay_us,
        params, [] if warm_input is None else sorted({1, mb}) if mb > 0 else [1]))
    _check_labels(io.labels)

    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    model_dir = repo / name
    stage = _stage_dir(repo, name)
    try:
        _fill_model_dir(stage, artifact, io, model_file, python)
        (stage / "config.pbtxt").write_text(config)
        if warm_input is not None:
            (stage / "warmup").mkdir()
            (stage / "warmup" / WARMUP_FILE).write_bytes(warm_input)
        for p in stage.rglob("*"):
            if p.is_dir() or p.name in _WRITTEN:
                os.chmod(p, 0o755 if p.is_dir() else 0o644)  # what we wrote; copies keep their own mode
        os.chmod(stage, 0o755)
        _swap_in(stage, model_dir)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return TritonRepo(model_dir, model_dir / "config.pbtxt", model_dir / "1" / model_file,
                      model_dir / "labels.txt" if io.labels else None, triton_backend)


_WRITTEN = ("config.pbtxt", "labels.txt", "model.py", "golden.json", WARMUP_FILE)  # the files we write


def _warmup_input(artifact: Path, io: _ArtifactIO, in_dims: list[int]) -> bytes | None:
    """The golden set's first image as the config's input takes it (its dtype; repeated to the whole
    static batch when the batch is part of the dims), raw; None when the artifact carries no golden set."""
    import numpy as np

    from vitdeploy.dtypes import to_numpy
    from vitdeploy.verify import artifact_metadata, golden_batch

    meta = artifact_metadata(artifact)
    golden = meta.golden if meta is not None else None
    if meta is None or golden is None:
        return None
    x = golden_batch(meta, golden)[:1].astype(to_numpy(_triton_type(io.in_dtype)))
    x = np.repeat(x, in_dims[0], axis=0) if len(in_dims) == x.ndim else x[0]
    return np.ascontiguousarray(x).tobytes()


def _renamed(backend: str, triton_backend: str, runtime: str | None) -> tuple[str, str]:
    """(vitdeploy backend, Triton backend) from this release's names and the previous release's."""
    import warnings

    if backend in TRITON_BACKENDS:
        warnings.warn("write_triton_repo(backend='native'|'python') is now triton_backend=; backend= names the "
                      "vitdeploy backend, as everywhere else", DeprecationWarning, stacklevel=3)
        backend, triton_backend = "auto", backend
    if runtime is not None:
        warnings.warn("write_triton_repo(runtime=) is now backend=", DeprecationWarning, stacklevel=3)
        backend = runtime
    return backend, triton_backend


def _check_request(artifact: Path, io: _ArtifactIO, name: str | None, kind: str | None, triton_backend: str,
                   backend: str, execution_env: str | Path | None,
                   runtime_options: dict[str, Any] | None) -> tuple[str, str]:
    """Refuse option combinations that cannot work; -> (model name, instance kind)."""
    if triton_backend not in TRITON_BACKENDS:
        raise VitDeployError(f"--triton-backend {triton_backend!r}: choose native or python")
    if backend not in RUNTIME_BACKENDS:
        raise VitDeployError(f"--backend {backend!r}: choose one of {', '.join(RUNTIME_BACKENDS)}")
    python = triton_backend == "python"
    if python and backend != "auto":
        fits = {"onnxruntime": "onnx", "openvino": "onnx", "tensorrt": "engine"}[backend]
        if fits != io.file_type:
            raise VitDeployError(f"--backend {backend} runs {fits} files, and {artifact.name} is an {io.file_type}")
    if not python and backend != "auto":
        raise VitDeployError("--backend chooses the vitdeploy backend of a Python-backend model: add "
                             "--triton-backend python")
    if not python and (execution_env or runtime_options):
        raise VitDeployError("--execution-env and --threads are for a Python-backend model: add "
                             "--triton-backend python")
    if runtime_options and "threads" in runtime_options and io.file_type != "onnx":
        raise VitDeployError("--threads sets the CPU threads of ONNX Runtime or OpenVINO: an engine runs on the GPU")
    from vitdeploy.engines.tensorrt.sidecar import TENSORRT_RTX

    if not python and io.flavour == TENSORRT_RTX:
        raise VitDeployError(
            f"{artifact.name} is a TensorRT-RTX engine: Triton's TensorRT backend (tensorrt_plan) is full TensorRT "
            "and cannot load it. Write it with --triton-backend python (Triton runs it through vitdeploy's "
            "TensorRT-RTX runtime), or build a full-TensorRT engine with `vitdeploy build --trt tensorrt` for "
            "tensorrt_plan")
    name = name or re.sub(r"[^A-Za-z0-9_-]", "_", artifact.stem)
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", name):
        raise VitDeployError(f"--name {name!r}: use up to 128 letters, digits, '_' and '-' (it is a folder and a "
                             "URL part)")
    kind = kind or ("cpu" if python and io.file_type == "onnx" else "gpu")
    if kind not in ("gpu", "cpu"):
        raise VitDeployError("--kind: gpu or cpu")
    if io.file_type == "engine" and kind == "cpu":
        raise VitDeployError("a TensorRT engine runs on a GPU instance group (--kind gpu)")
    if execution_env is not None and not Path(execution_env).exists():
        raise VitDeployError(f"--execution-env {execution_env}: no such folder or archive; make a serving venv "
                             "with numpy<2 and vitdeploy (see docs/scale-out.md)")
    return name, kind


def _batching(artifact: Path, io: _ArtifactIO, python: bool, max_batch: int | None) -> tuple[int, list[int], list[int]]:
    """max_batch_size and the per-request dims Triton's config declares."""
    in_dims, out_dims = list(io.in_dims), list(io.out_dims)
    if python:
        # vitdeploy's Runtime splits and pads to the artifact's batch limits, so Triton may batch freely
        mb = max_batch or io.max_batch or 32
    elif io.static_batch is not None:
        # a static batch is part of the tensor: Triton's batching is off (max_batch_size 0)
        if max_batch:
            raise VitDeployError(f"{artifact.name} has a static batch of {io.static_batch}: "
                                 "re-export with --dynamic-batch to use --max-batch, or use --triton-backend python")
        mb, in_dims, out_dims = 0, [io.static_batch, *in_dims], [io.static_batch, *out_dims]
    else:
        limit = io.max_batch
        mb = max_batch or limit or 32
        if limit is not None and mb > limit:
            raise VitDeployError(f"--max-batch {mb} exceeds the engine's profile maximum {limit}")
    _check_count("max_batch_size (--max-batch)", mb, 0, MAX_TRITON_BATCH)
    return mb, in_dims, out_dims


def _stage_dir(repo: Path, name: str) -> Path:
    """A new empty folder on the repository's file system, so the finished model folder renames into
    place. Beside the repository when its parent is on the same file system: Triton never sees it.
    Inside it when the repository is a file system of its own (a container volume, a mount point),
    under a hidden name carrying this host and process id: Triton in explicit mode (``--load-model``)
    leaves it alone, but Triton scans hidden folders too (a polling Triton logs "Poll failed" for it
    while the write runs), so the folders that killed writers left there are removed here first."""
    from vitdeploy.io import remove_dead_staging, staging_prefix

    repo = repo.resolve()
    if os.stat(repo.parent).st_dev == os.stat(repo).st_dev:
        return Path(tempfile.mkdtemp(prefix=f".{repo.name}.vitdeploy-{name}.", dir=repo.parent))
    target = repo / f"staging-{name}"  # named .vitdeploy-staging-<name>.<host>.<pid>.*
    remove_dead_staging(target)
    return Path(tempfile.mkdtemp(prefix=staging_prefix(target), dir=repo))


def _copy(src: Path, dst: Path) -> None:
    """Copy the bytes and the permission bits (a 0600 key stays 0600), nothing else."""
    shutil.copyfile(src, dst)
    shutil.copymode(src, dst)


def _fill_model_dir(stage: Path, artifact: Path, io: _ArtifactIO, model_file: str, python: bool) -> None:
    """Version folder ``1`` with the artifact and what travels with it, and labels.txt. External data
    is copied only from inside the ONNX's own folder (onnx_external_files refuses anything else)."""
    version = stage / "1"
    version.mkdir()
    _copy(artifact, version / model_file)
    if io.file_type == "onnx":
        from vitdeploy.io import onnx_external_files

        for data in onnx_external_files(artifact):  # the names the graph references, kept as they are
            dst = version / data.relative_to(artifact.parent)
            dst.parent.mkdir(parents=True, exist_ok=True)
            _copy(data, dst)
        if python:
            from vitdeploy.engines.plan import plan_path

            if plan_path(artifact).is_file():  # `vitdeploy tune`'s plan (keyed by the file's hash) goes along
                _copy(plan_path(artifact), plan_path(version / model_file))
    elif python:
        from vitdeploy.engines.tensorrt.sidecar import sidecar_path

        _copy(sidecar_path(artifact), sidecar_path(version / model_file))
    if python:
        shutil.copyfile(Path(__file__).with_name("triton_model.py"), version / "model.py")
    if io.labels:
        (stage / "labels.txt").write_text("\n".join(io.labels) + "\n")
    from vitdeploy.verify import artifact_golden

    golden = artifact_golden(artifact)
    if golden is not None:  # the artifact's golden set, for checking the served model (vitdeploy.verify)
        golden.write(stage / "golden.json")


def _swap_in(stage: Path, model_dir: Path) -> None:
    """Rename the complete ``stage`` onto ``model_dir``; an existing model folder is moved aside first
    and removed after, so Triton sees the old model or the new one, never a mix."""
    if not model_dir.exists():
        os.replace(stage, model_dir)
        return
    if not model_dir.is_dir():
        raise VitDeployError(f"{model_dir} exists and is not a folder: remove it or choose another --name")
    old = _stage_dir(model_dir.parent, f"old-{model_dir.name}")
    os.replace(model_dir, old / model_dir.name)
    try:
        os.replace(stage, model_dir)
    except OSError:
        os.replace(old / model_dir.name, model_dir)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
