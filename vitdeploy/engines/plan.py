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
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.engines.base import Runtime
from vitdeploy.errors import VitDeployError

log = logging.getLogger(__name__)

PLAN_FORMAT = "vitdeploy-tune/1"
KEY_LIBRARIES = ("onnxruntime", "openvino")


def plan_path(artifact: str | Path) -> Path:
    """``m.onnx`` -> ``m.tune.json`` (same folder, same stem)."""
    p = Path(artifact)
    return p.with_name(p.stem + ".tune.json")


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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
    def from_dict(cls, d: dict[str, Any]) -> MachineKey:
        return cls(str(d["cpu"]), tuple(d["flags"]), int(d["cpus"]),
                   tuple((k, d["libraries"].get(k)) for k in KEY_LIBRARIES))

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
    def from_dict(cls, d: dict[str, Any]) -> PathChoice:
        if d.get("backend") not in ("onnxruntime", "openvino") or not isinstance(d.get("options"), dict):
            raise ValueError(f"bad path {d!r}")
        return cls(d["backend"], dict(d["options"]), str(d.get("label", "")))


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
    def from_dict(cls, d: dict[str, Any]) -> TunePlan:
        if d.get("format") != PLAN_FORMAT:
            raise ValueError(f"format {d.get('format')!r} is not {PLAN_FORMAT}")
        tb = int(d["throughput_batch"])
        if tb < 1:
            raise ValueError("throughput_batch must be >= 1")
        return cls(str(d["artifact"]), str(d["artifact_sha256"]), MachineKey.from_dict(d["machine"]),
                   PathChoice.from_dict(d["latency"]), PathChoice.from_dict(d["throughput"]), tb,
                   list(d.get("candidates", [])))

    def write(self, path: str | Path) -> None:
        from vitdeploy.io import atomic_write_bytes

        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    @classmethod
    def read(cls, path: str | Path) -> TunePlan:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise VitDeployError(f"tune plan {path} is unreadable ({e}): rerun `vitdeploy tune`") from None

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
        self.threads = getattr(self._latency, "threads", None)
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
