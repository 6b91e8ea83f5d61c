"""The engine sidecar: one typed home for the JSON file that travels with every TensorRT engine.

``m.engine`` -> ``m.json`` (same folder, same stem). It records what the engine needs to be run
and checked without deserializing it: flavour and version of TensorRT, GPU targets, I/O tensors,
the batch profile, build options, the model's metadata, and the engine's own size and SHA-256 so
that a reader never pairs an engine with another build's sidecar. The runtime, inspect, Triton and
the CLI read engines through :meth:`EngineSidecar.read`; nothing else reads the JSON by key.

Flavour names live here too: ``tensorrt`` (full TensorRT, the ``tensorrt`` module) and
``tensorrt_rtx`` (TensorRT-RTX, ``tensorrt_rtx``), and the compute capabilities each runs on.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vitdeploy import schema
from vitdeploy.deprecation import moved
from vitdeploy.errors import VitDeployError
from vitdeploy.sysinfo import TRT_FLAVOURS, trt_flavours_for

FORMAT = "vitdeploy-engine/1"

TENSORRT = "tensorrt"
TENSORRT_RTX = "tensorrt_rtx"
FLAVOURS = (TENSORRT, TENSORRT_RTX)
# what users type (--trt) -> flavour (= the Python module's name)
_ALIASES = {"tensorrt": TENSORRT, "trt": TENSORRT, "full": TENSORRT,
            "rtx": TENSORRT_RTX, "tensorrt_rtx": TENSORRT_RTX, "tensorrt-rtx": TENSORRT_RTX}


def flavour_name(text: str) -> str:
    """'rtx' | 'tensorrt_rtx' | 'tensorrt' ... -> the flavour ('tensorrt' or 'tensorrt_rtx')."""
    try:
        return _ALIASES[text.strip().lower()]
    except KeyError:
        raise VitDeployError(f"TensorRT flavour {text!r}: choose tensorrt (full TensorRT) or rtx (TensorRT-RTX)"
                             ) from None


def runs_on(flavour: str, compute_capability: str) -> bool:
    """Whether engines of ``flavour`` can run on a GPU of ``compute_capability`` at all."""
    return flavour in trt_flavours_for(compute_capability)


def sidecar_path(engine: str | Path) -> Path:
    """The engine's JSON sidecar: same folder, same stem."""
    return Path(engine).with_suffix(".json")


MAX_DIM = 1 << 31  # a tensor dimension or batch above this is not a real engine's


def _dims(value: Any, what: str, dynamic: bool) -> list[int]:
    dims = schema.array(value, what)
    low = -1 if dynamic else 1
    if not dims or any(type(d) is not int or not (low <= d < MAX_DIM) or d == 0 for d in dims):
        raise ValueError(f"{what} {dims!r} is not a shape (integers from {low} to {MAX_DIM - 1}, no 0)")
    return dims


def _tensor_io(value: Any) -> list[TensorIO]:
    io = []
    for t in schema.array(value, "io"):
        t = schema.obj(t, "io entry", optional=True)
        mode = schema.text(t["mode"], "io mode")
        if mode not in ("input", "output"):
            raise ValueError(f"io mode {mode!r}")
        io.append(TensorIO(schema.text(t["name"], "io name"), mode, _dims(t["shape"], "io shape", True),
                           schema.text(t["dtype"], "io dtype")))
    if sorted({t.mode for t in io}) != ["input", "output"]:
        raise ValueError("io needs an input and an output")
    return io


def _profile(value: Any, io: list[TensorIO]) -> dict[str, list[int]]:
    shapes = schema.obj(value, "profile", optional=True)
    profile = {k: _dims(shapes[k], f"profile {k}", False) for k in ("min", "opt", "max")}
    rank = len(next(t for t in io if t.mode == "input").shape)
    if any(len(v) != rank for v in profile.values()) or not all(
            a <= b <= c for a, b, c in zip(profile["min"], profile["opt"], profile["max"], strict=True)):
        raise ValueError(f"profile {profile} is not min <= opt <= max shapes of the input's rank {rank}")
    return profile


@dataclass(frozen=True)
class TensorIO:
    name: str
    mode: str  # input | output
    shape: list[int]  # -1 for a dynamic axis
    dtype: str  # TensorRT's name, lower case: float | half | int8 | bf16 ...


@dataclass
class EngineSidecar:
    flavour: str  # tensorrt | tensorrt_rtx
    trt_version: str
    targets: list[str]  # smXY the engine was built for
    precision: str
    io: list[TensorIO]
    profile: dict[str, list[int]]  # min / opt / max input shapes
    onnx_path: str = ""
    onnx_sha256: str = ""
    gpu: str | None = None  # the GPU a full-TensorRT build ran on
    options: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0
    built_at: str = ""
    vitdeploy_version: str = ""
    model: dict[str, Any] | None = None
    engine_bytes: int | None = None
    engine_sha256: str | None = None
    verification: dict[str, Any] | None = None  # build's golden-set check (vitdeploy.verify), or why none ran

    # -- views -----------------------------------------------------------------------------------
    @property
    def input(self) -> TensorIO:
        return next(t for t in self.io if t.mode == "input")

    @property
    def output(self) -> TensorIO:
        return next(t for t in self.io if t.mode == "output")

    @property
    def title(self) -> str:
        return TRT_FLAVOURS[self.flavour]

    @property
    def version_compatible(self) -> bool:
        return bool(self.options.get("version_compatible"))

    @property
    def profiles(self) -> int:
        """Identical optimization profiles in the engine: one per instance it runs at once (``--instances``)
        for a dynamic batch; a static engine has one."""
        return int(self.options.get("instances") or 1) if self.profile["min"] != self.profile["max"] else 1

    @property
    def hardware_compat(self) -> str | None:
        return self.options.get("hardware_compat")

    # -- (de)serialization -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {
            "format": FORMAT, "flavour": self.flavour, "trt_version": self.trt_version, "targets": self.targets,
            "gpu": self.gpu, "precision": self.precision, "io": d["io"], "profile": self.profile,
            "onnx": {"path": self.onnx_path, "sha256": self.onnx_sha256},
            "engine": {"bytes": self.engine_bytes, "sha256": self.engine_sha256},
            "options": self.options, "build_seconds": self.build_seconds, "built_at": self.built_at,
            "vitdeploy_version": self.vitdeploy_version, "model": self.model, "verification": self.verification,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Any, where: str = "sidecar") -> EngineSidecar:
        """Validate and type a sidecar's JSON; VitDeployError naming the problem and the fix. Every field
        is checked for its type (a sidecar is untrusted input), and the engine's size and SHA-256 are
        required: without them a reader could pair an engine with another build's sidecar."""
        fix = "rebuild the engine with `vitdeploy build`"
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise VitDeployError(f"{where} is not a vitdeploy engine sidecar ({FORMAT}): {fix}")
        try:
            flavour = data["flavour"]
            if flavour not in FLAVOURS:
                raise ValueError(f"flavour {flavour!r}")
            io = _tensor_io(data["io"])
            profile = _profile(data["profile"], io)
            onnx = schema.obj(data.get("onnx"), "onnx", optional=True)
            engine = schema.obj(data.get("engine"), "engine", optional=True)
            engine_bytes, engine_sha256 = engine.get("bytes"), engine.get("sha256")
            if type(engine_bytes) is not int or engine_bytes < 0:
                raise ValueError(f"engine.bytes {engine_bytes!r} is not a byte count")
            if not isinstance(engine_sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", engine_sha256):
                raise ValueError(f"engine.sha256 {engine_sha256!r} is not a SHA-256")
            options = schema.obj(data.get("options"), "options", optional=True)
            model = data.get("model")
            if model not in (None, {}):  # {}: built from a foreign ONNX, no metadata to check
                from vitdeploy.artifacts.metadata import ArtifactMetadata

                # one clear error for bad preprocessing or labels
                ArtifactMetadata.from_dict(schema.obj(model, "model", optional=True))
            seconds = data.get("build_seconds", 0.0)
            if type(seconds) not in (int, float) or not math.isfinite(seconds):
                raise ValueError(f"build_seconds {seconds!r}")
            return cls(
                flavour=flavour, trt_version=schema.text(data["trt_version"], "trt_version"),
                targets=[schema.text(t, "targets") for t in schema.array(data["targets"], "targets")],
                precision=schema.text(data.get("precision", "unknown"), "precision"), io=io, profile=profile,
                onnx_path=schema.text(onnx.get("path", ""), "onnx.path"),
                onnx_sha256=schema.text(onnx.get("sha256", ""), "onnx.sha256"),
                gpu=None if data.get("gpu") is None else schema.text(data["gpu"], "gpu"), options=options,
                build_seconds=float(seconds), built_at=schema.text(data.get("built_at", ""), "built_at"),
                vitdeploy_version=schema.text(data.get("vitdeploy_version", ""), "vitdeploy_version"),
                model=model, engine_bytes=engine_bytes, engine_sha256=engine_sha256,
                verification=data.get("verification") if isinstance(data.get("verification"), dict) else None,
            )
        except VitDeployError as e:
            raise VitDeployError(f"{where}: {e}") from None
        except (KeyError, TypeError, ValueError, StopIteration) as e:
            raise VitDeployError(f"{where} is malformed ({type(e).__name__}: {e}): {fix}") from None

    @classmethod
    def read(cls, engine: str | Path, verify: bool = True, data: bytes | None = None) -> EngineSidecar:
        """The sidecar of ``engine``; with ``verify``, also check that it describes this engine file
        (``data``: the engine's bytes when the caller has read them already).

        An engine and its sidecar are published as one set (:func:`write_engine`): the engine first,
        the sidecar last. If a build was killed between those two renames, the new sidecar waits in
        the build's staging folder; the reader finds it and completes the publish (the new set).
        """
        engine = Path(engine)
        out = cls._read_json(engine)
        if not verify or not Path.is_file(engine):
            return out
        problem = out._mismatch(engine, data)
        if problem is None:
            return out
        again = cls._read_json(engine)  # a build published a new set while we read
        if again._mismatch(engine, data) is None:
            return again
        rolled = _complete_publish(engine, data)
        if rolled is not None:
            return rolled
        raise VitDeployError(f"{engine} does not match its sidecar {sidecar_path(engine).name} ({problem}): "
                             "they come from different builds; rebuild with `vitdeploy build`")

    @classmethod
    def _read_json(cls, engine: Path) -> EngineSidecar:
        side = sidecar_path(engine)
        if not side.is_file():
            raise VitDeployError(f"{engine} has no sidecar {side.name}: rebuild it with `vitdeploy build`")
        from vitdeploy.io import read_json_file

        data = read_json_file(side, f"sidecar {side}", "rebuild with `vitdeploy build`")
        return cls.from_dict(data, where=f"sidecar {side}")

    def _mismatch(self, engine: Path, data: bytes | None = None) -> str | None:
        """Why ``engine`` is not the engine this sidecar describes, or None when it is."""
        import hashlib

        from vitdeploy.io import sha256_file

        size = len(data) if data is not None else engine.stat().st_size
        if self.engine_bytes is not None and size != self.engine_bytes:
            return f"{size} bytes, the sidecar says {self.engine_bytes}"
        if self.engine_sha256 is not None:
            digest = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(engine)
            if digest != self.engine_sha256:
                return "its SHA-256 is not the one the sidecar records"
        return None


def _staging_pattern(engine: Path) -> str:
    import glob

    return glob.escape(f".vitdeploy-{engine.name}.") + "*"


def _complete_publish(path: Path, data: bytes | None) -> EngineSidecar | None:
    """Finish a publish killed between its two renames: a staged sidecar that matches ``engine``."""
    import contextlib
    import os

    from vitdeploy.io import read_json_file

    name = sidecar_path(path).name
    for folder in path.resolve().parent.glob(_staging_pattern(path)):
        staged = folder / name
        if not staged.is_file():
            continue
        try:
            candidate = EngineSidecar.from_dict(read_json_file(staged, f"sidecar {staged}", ""))
        except VitDeployError:
            continue
        if candidate._mismatch(path, data) is not None:
            continue
        with contextlib.suppress(FileNotFoundError):  # another reader may have completed it first
            os.replace(staged, sidecar_path(path))
        return candidate
    return None


def write_engine(engine: str | Path, data: bytes | memoryview, sidecar: EngineSidecar,
                 durable: bool = True) -> EngineSidecar:
    """Publish ``data`` as ``engine`` and ``sidecar`` beside it, as one set: a reader through
    :meth:`EngineSidecar.read` sees the old set or the new one, never a mix, even if the process is
    killed at any point. The sidecar records the engine's size and SHA-256. The previous engine's
    runtime cache (``.rtcache``) is removed first: losing it costs one JIT compile, pairing it with
    another engine could cost more."""
    import contextlib
    import hashlib
    from dataclasses import replace

    from vitdeploy.io import publish_file_set, staging_dir

    engine = Path(engine)
    view = memoryview(data)
    side = replace(sidecar, engine_bytes=view.nbytes, engine_sha256=hashlib.sha256(view).hexdigest())
    with staging_dir(engine) as folder:
        staged_engine, staged_side = folder / engine.name, folder / sidecar_path(engine).name
        with open(staged_engine, "wb") as f:
            f.write(view)
        staged_side.write_text(side.to_json())
        with contextlib.suppress(FileNotFoundError):
            runtime_cache_path(engine).unlink()
        publish_file_set({engine: staged_engine, sidecar_path(engine): staged_side}, last=sidecar_path(engine),
                         durable=durable)
    _remove_stale_staging(engine)
    return side


STALE_STAGING_SECONDS = 3600.0


def _remove_stale_staging(path: Path, older_than: float = STALE_STAGING_SECONDS) -> None:
    """Remove staging folders that killed builds of ``path`` left (a whole engine each), once a new set
    is in place; only old ones, so a build publishing beside us keeps its own."""
    import shutil
    import time

    now = time.time()
    for folder in path.resolve().parent.glob(_staging_pattern(path)):
        try:
            if now - folder.stat().st_mtime > older_than:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue


def runtime_cache_path(engine: str | Path) -> Path:
    """TensorRT-RTX's JIT runtime cache for ``engine``: same folder, same stem, ``.rtcache``."""
    return Path(engine).with_suffix(".rtcache")


def read_sidecar(engine: str | Path, verify: bool = True) -> EngineSidecar:
    """Shorthand for :meth:`EngineSidecar.read`."""
    return EngineSidecar.read(engine, verify=verify)

__getattr__ = moved(__name__, {
    "FLAVOUR_TITLES": "vitdeploy.sysinfo:TRT_FLAVOURS",
    "RTX_TARGETS": "vitdeploy.sysinfo:RTX_COMPUTE_CAPABILITIES",
    "flavours_for": "vitdeploy.sysinfo:trt_flavours_for",
})
