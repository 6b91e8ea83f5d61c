"""The tune plan: which CPU path runs an artifact fastest on this machine (schema, read/write, matching).

``vitdeploy tune m.onnx`` measures the CPU paths (see :mod:`vitdeploy.tune`) and writes ``m.tune.json``
beside the artifact. :func:`vitdeploy.engines.open_runtime` with ``backend="auto"`` on a CPU-only run
reads it through :func:`load_matching_plan` and opens a :class:`PlannedRuntime`: the latency choice for
small batches, the throughput choice from ``throughput_batch`` up. A plan is keyed by the CPU (model,
ISA flags, usable cores), the library versions that ran it and the artifact's SHA-256; a plan made
anywhere else is ignored with a one-line notice.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy import schema
from vitdeploy.engines.base import Runtime
from vitdeploy.errors import VitDeployError
from vitdeploy.sysinfo import usable_cpus

log = logging.getLogger(__name__)

PLAN_FORMAT = "vitdeploy-tune/1"
KEY_LIBRARIES = ("onnxruntime", "openvino")


def plan_path(artifact: str | Path) -> Path:
    """``m.onnx`` -> ``m.tune.json`` (same folder, same stem)."""
    p = Path(artifact)
    return p.with_name(p.stem + ".tune.json")


def _threads(value: Any) -> bool:
    return type(value) is int and 1 <= value <= 4096


# What a plan's path may pass to each backend's runtime (its constructor's keyword arguments, with their
# accepted values; tests/test_hostile_files.py checks the names against the constructors' signatures).
# A plan only chooses CPU paths, so device, engine_cache and the like are not among them.
PATH_OPTIONS: dict[str, dict[str, Any]] = {
    "onnxruntime": {"threads": _threads, "qdq_activations": ("auto", "int8", "uint8"),
                    "optimization": ("disable", "basic", "extended", "all")},
    "openvino": {"threads": _threads, "precision_hint": ("f32", "bf16", "f16"), "hint": ("LATENCY", "THROUGHPUT")},
}


@dataclass(frozen=True)
class MachineKey:
    """What must be equal for a measured ranking to hold: CPU, ISA, cores and the runtimes' versions."""

    cpu: str
    flags: tuple[str, ...]
    cpus: int
    libraries: tuple[tuple[str, str | None], ...]

    @classmethod
    def current(cls) -> MachineKey:
        from vitdeploy import sysinfo

        libs = sysinfo.library_versions()
        return cls(sysinfo.cpu_model(), tuple(sysinfo.cpu_flags()), usable_cpus(),
                   tuple((k, libs.get(k)) for k in KEY_LIBRARIES))

    def to_dict(self) -> dict[str, Any]:
        return {"cpu": self.cpu, "flags": list(self.flags), "cpus": self.cpus, "libraries": dict(self.libraries)}

    @classmethod
    def from_dict(cls, d: Any) -> MachineKey:
        d = schema.obj(d, "machine")
        flags, libs = schema.array(d["flags"], "machine.flags"), schema.obj(d["libraries"], "machine.libraries")
        if not all(isinstance(f, str) for f in flags):
            raise ValueError("machine.flags are not strings")
        versions = tuple((k, libs.get(k)) for k in KEY_LIBRARIES)
        if not all(v is None or isinstance(v, str) for _, v in versions):
            raise ValueError("machine.libraries versions are not strings")
        cpus = schema.integer(d["cpus"], "machine.cpus", 1, 1 << 20)
        return cls(schema.text(d["cpu"], "machine.cpu"), tuple(flags), cpus, versions)

    def difference(self, other: MachineKey) -> str | None:
        """None when equal, else what differs, as ``plan value -> this machine's value``."""
        if self.cpu != other.cpu:
            return f"CPU {self.cpu} -> {other.cpu}"
        if self.flags != other.flags:
            return f"ISA flags {' '.join(self.flags) or '-'} -> {' '.join(other.flags) or '-'}"
        if self.cpus != other.cpus:
            return f"{self.cpus} usable CPUs -> {other.cpus}"
        for (name, mine), (_, theirs) in zip(self.libraries, other.libraries, strict=True):
            if mine != theirs:
                return f"{name} {mine} -> {theirs}"
        return None


@dataclass(frozen=True)
class PathChoice:
    """One CPU path: a backend and the options :func:`open_runtime` passes to it."""

    backend: str  # onnxruntime | openvino
    options: dict[str, Any]
    label: str = ""

    def key(self) -> str:
        return json.dumps([self.backend, self.options], sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> PathChoice:
        """A path from a plan file: the backend and every option checked against what that backend's
        runtime accepts (:data:`PATH_OPTIONS`), so nothing unknown reaches a constructor."""
        d = schema.obj(d, "path")
        backend, options = d.get("backend"), schema.obj(d.get("options"), "path options")
        if backend not in PATH_OPTIONS:
            raise ValueError(f"path backend {backend!r} is not one of {', '.join(PATH_OPTIONS)}")
        for key, value in options.items():
            accepted = PATH_OPTIONS[backend].get(key)
            if accepted is None:
                raise ValueError(f"{backend} takes no option {key!r} (it takes {', '.join(PATH_OPTIONS[backend])})")
            if not (accepted(value) if callable(accepted) else value in accepted):
                raise ValueError(f"{backend} option {key}={value!r} is out of range")
        return cls(backend, dict(options), schema.text(d.get("label", ""), "path label"))


@dataclass
class TunePlan:
    artifact: str  # file name, for messages
    artifact_sha256: str
    machine: MachineKey
    latency: PathChoice  # fastest at batch 1
    throughput: PathChoice  # fastest per image at throughput_batch
    throughput_batch: int
    candidates: list[dict[str, Any]] = field(default_factory=list)  # every measured path, for the record
    format: str = PLAN_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "artifact": self.artifact, "artifact_sha256": self.artifact_sha256,
                "machine": self.machine.to_dict(), "latency": self.latency.to_dict(),
                "throughput": self.throughput.to_dict(), "throughput_batch": self.throughput_batch,
                "candidates": self.candidates}

    @classmethod
    def from_dict(cls, d: Any) -> TunePlan:
        """Type a plan's JSON; ValueError/KeyError/TypeError on anything malformed (see :meth:`read`)."""
        d = schema.obj(d, "plan")
        if d.get("format") != PLAN_FORMAT:
            raise ValueError(f"format {d.get('format')!r} is not {PLAN_FORMAT}")
        sha = schema.text(d["artifact_sha256"], "artifact_sha256")
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ValueError("artifact_sha256 is not a SHA-256")
        candidates = schema.array(d.get("candidates", []), "candidates")
        if not all(isinstance(c, dict) for c in candidates):
            raise ValueError("candidates are not objects")
        return cls(schema.text(d["artifact"], "artifact"), sha, MachineKey.from_dict(d["machine"]),
                   PathChoice.from_dict(d["latency"]), PathChoice.from_dict(d["throughput"]),
                   schema.integer(d["throughput_batch"], "throughput_batch", 1, 1 << 16), candidates)

    def write(self, path: str | Path) -> None:
        from vitdeploy.io import atomic_write_bytes

        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    @classmethod
    def read(cls, path: str | Path) -> TunePlan:
        """The plan at ``path``; a one-line VitDeployError for any file that is not a valid plan."""
        from vitdeploy.io import read_json_file

        fix = "rerun `vitdeploy tune`"
        data = read_json_file(path, f"tune plan {path}", fix, max_bytes=1 << 20, word="unreadable")
        try:
            return cls.from_dict(data)
        except (ValueError, KeyError, TypeError) as e:
            raise VitDeployError(f"tune plan {path} is unreadable ({type(e).__name__}: {e}): {fix}") from None

    def mismatch(self, artifact: str | Path, machine: MachineKey | None = None) -> str | None:
        """Why this plan does not hold for ``artifact`` here, or None when it does."""
        from vitdeploy.io import sha256_file

        diff = self.machine.difference(machine or MachineKey.current())
        if diff:
            return f"tuned on another machine ({diff})"
        if sha256_file(artifact) != self.artifact_sha256:
            return f"tuned for another version of {Path(artifact).name}"
        return None


def load_matching_plan(artifact: str | Path) -> TunePlan | None:
    """The plan beside ``artifact`` when it holds on this machine; None (and one notice) otherwise."""
    path = plan_path(artifact)
    if not path.is_file():
        return None
    try:
        plan = TunePlan.read(path)
    except VitDeployError as e:
        log.warning("ignoring %s", e)
        return None
    why = plan.mismatch(artifact)
    if why:
        log.warning("ignoring tune plan %s: %s; rerun `vitdeploy tune %s`", path.name, why, artifact)
        return None
    return plan


class PlannedRuntime(Runtime):
    """Runs each batch on the path the plan chose for its size; opens the second path on first use."""

    backend = "planned"

    def __init__(self, plan: TunePlan, opener: Callable[[PathChoice], Runtime]) -> None:
        self.plan = plan
        self._opener = opener
        self._latency = opener(plan.latency)
        self._throughput: Runtime | None = self._latency if plan.throughput.key() == plan.latency.key() else None
        self.spec = self._latency.spec
        self.metadata = self._latency.metadata
        self.output_name = self._latency.output_name
        self.threads = self._latency.threads
        self.where = "cpu"

    def runtime_for(self, batch: int) -> Runtime:
        if batch < self.plan.throughput_batch:
            return self._latency
        if self._throughput is None:
            self._throughput = self._opener(self.plan.throughput)
        return self._throughput

    def describe(self) -> str:
        lat = self._latency.describe()
        if self.plan.throughput.key() == self.plan.latency.key():
            return f"tuned: {lat}"
        return (f"tuned: {lat} below batch {self.plan.throughput_batch}, "
                f"{self.plan.throughput.label or self.plan.throughput.backend} from batch {self.plan.throughput_batch}")

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.runtime_for(batch.shape[0])._run(batch)

    def infer(self, batch: Any) -> np.ndarray:
        x = self.check_input(batch)
        return self.runtime_for(x.shape[0]).infer(x)

    def close(self) -> None:
        for rt in {id(r): r for r in (self._latency, self._throughput) if r is not None}.values():
            rt.close()
