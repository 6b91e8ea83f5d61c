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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vitdeploy.errors import VitDeployError
from vitdeploy.sysinfo import RTX_COMPUTE_CAPABILITIES, TRT_FLAVOURS, trt_flavours_for

FORMAT = "vitdeploy-engine/1"

TENSORRT = "tensorrt"
TENSORRT_RTX = "tensorrt_rtx"
FLAVOURS = (TENSORRT, TENSORRT_RTX)
FLAVOUR_TITLES = TRT_FLAVOURS
# what users type (--trt) -> flavour (= the Python module's name)
_ALIASES = {"tensorrt": TENSORRT, "trt": TENSORRT, "full": TENSORRT,
            "rtx": TENSORRT_RTX, "tensorrt_rtx": TENSORRT_RTX, "tensorrt-rtx": TENSORRT_RTX}
# TensorRT-RTX runs RTX-class GPUs only; sm90 (Hopper), sm100/sm103 (Blackwell datacenter), sm110 and the
# rest need full TensorRT (the table lives in sysinfo, beside the GPU query)
RTX_TARGETS = RTX_COMPUTE_CAPABILITIES
flavours_for = trt_flavours_for


def flavour_name(text: str) -> str:
    """'rtx' | 'tensorrt_rtx' | 'tensorrt' ... -> the flavour ('tensorrt' or 'tensorrt_rtx')."""
    try:
        return _ALIASES[text.strip().lower()]
    except KeyError:
        raise VitDeployError(f"TensorRT flavour {text!r}: choose tensorrt (full TensorRT) or rtx (TensorRT-RTX)"
                             ) from None


def runs_on(flavour: str, compute_capability: str) -> bool:
    """Whether engines of ``flavour`` can run on a GPU of ``compute_capability`` at all."""
    return flavour in flavours_for(compute_capability)


def sidecar_path(engine: str | Path) -> Path:
    """The engine's JSON sidecar: same folder, same stem."""
    return Path(engine).with_suffix(".json")


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

    # -- views -----------------------------------------------------------------------------------
    @property
    def input(self) -> TensorIO:
        return next(t for t in self.io if t.mode == "input")

    @property
    def output(self) -> TensorIO:
        return next(t for t in self.io if t.mode == "output")

    @property
    def title(self) -> str:
        return FLAVOUR_TITLES[self.flavour]

    @property
    def version_compatible(self) -> bool:
        return bool(self.options.get("version_compatible"))

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
            "vitdeploy_version": self.vitdeploy_version, "model": self.model,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Any, where: str = "sidecar") -> EngineSidecar:
        """Validate and type a sidecar's JSON; VitDeployError naming the problem and the fix."""
        fix = "rebuild the engine with `vitdeploy build`"
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise VitDeployError(f"{where} is not a vitdeploy engine sidecar ({FORMAT}): {fix}")
        try:
            flavour = data["flavour"]
            if flavour not in FLAVOURS:
                raise ValueError(f"flavour {flavour!r}")
            io = [TensorIO(str(t["name"]), str(t["mode"]), [int(d) for d in t["shape"]], str(t["dtype"]))
                  for t in data["io"]]
            if sorted({t.mode for t in io}) != ["input", "output"]:
                raise ValueError("io needs an input and an output")
            profile = {k: [int(d) for d in data["profile"][k]] for k in ("min", "opt", "max")}
            engine = data.get("engine") or {}
            onnx = data.get("onnx") or {}
            options = data.get("options") or {}
            model = data.get("model")
            if not isinstance(options, dict) or not (model is None or isinstance(model, dict)):
                raise ValueError("options/model")
            return cls(
                flavour=flavour, trt_version=str(data["trt_version"]), targets=[str(t) for t in data["targets"]],
                precision=str(data.get("precision", "unknown")), io=io, profile=profile,
                onnx_path=str(onnx.get("path", "")), onnx_sha256=str(onnx.get("sha256", "")), gpu=data.get("gpu"),
                options=options, build_seconds=float(data.get("build_seconds", 0.0)),
                built_at=str(data.get("built_at", "")), vitdeploy_version=str(data.get("vitdeploy_version", "")),
                model=model, engine_bytes=engine.get("bytes"), engine_sha256=engine.get("sha256"),
            )
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
        try:
            data = json.loads(side.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise VitDeployError(
                f"sidecar {side} is corrupt ({e.__class__.__name__}): rebuild with `vitdeploy build`"
            ) from None
        return cls.from_dict(data, where=f"sidecar {side}")

    def _mismatch(self, engine: Path, data: bytes | None = None) -> str | None:
        """Why ``engine`` is not the engine this sidecar describes, or None when it is."""
        import hashlib

        from vitdeploy.io import sha256_file

        if self.engine_bytes is None and self.engine_sha256 is None:
            return None  # sidecars written before the engine's hash was recorded
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

    name = sidecar_path(path).name
    for folder in path.resolve().parent.glob(_staging_pattern(path)):
        staged = folder / name
        try:
            candidate = EngineSidecar.from_dict(json.loads(staged.read_text()))
        except (OSError, ValueError, VitDeployError):
            continue
        if candidate.engine_sha256 is None or candidate._mismatch(path, data) is not None:
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
