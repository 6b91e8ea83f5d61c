"""The metadata every artifact carries (ONNX ``metadata_props``; the engine sidecar copies it).

Reading needs only ``onnx`` (not torch), so serving and runtime code can use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitdeploy.errors import VitDeployError

if TYPE_CHECKING:
    from vitdeploy.artifacts.golden import GoldenSet

PREFIX = "vitdeploy."
KNOWN = ("version", "config", "preprocessing", "labels", "precision", "batch", "source", "source_sha256",
         "task", "output_name", "output_size", "normalized")
REQUIRED = KNOWN[:6]
# the fields ONNX metadata_props hold as JSON text (the rest are plain strings)
JSON_FIELDS = ("config", "preprocessing", "labels", "output_size", "normalized")
MAX_LABELS = 1 << 20
MAX_OUTPUT = 1 << 20
# task -> the name of the ONNX output (and of every runtime's output) that task has
TASK_OUTPUTS = {"classification": "logits", "embedding": "embeddings"}
TASKS = tuple(TASK_OUTPUTS)


@dataclass
class ArtifactMetadata:
    """What downstream commands need to know about an exported model."""

    version: str
    config: dict[str, Any]
    preprocessing: dict[str, Any]
    labels: list[str]
    precision: str
    batch: str  # "dynamic" or the static batch size
    source: str = ""
    source_sha256: str = ""
    task: str = "classification"  # "classification" (logits) | "embedding" (one vector per image)
    output_name: str = ""  # the ONNX output; "" reads as the task's own (TASK_OUTPUTS)
    output_size: int = 0  # values per image; 0 reads as config.num_labels for classification
    normalized: bool = False  # embeddings L2-normalized in the graph
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.output_name:
            self.output_name = TASK_OUTPUTS.get(self.task, "")
        if not self.output_size and self.task == "classification":
            self.output_size = _num_labels(self.config)

    @property
    def is_embedding(self) -> bool:
        return self.task == "embedding"

    @property
    def golden(self) -> GoldenSet | None:
        """The golden set the artifact carries (``vitdeploy.golden``; see vitdeploy.artifacts.golden), or None."""
        from vitdeploy.artifacts.golden import GoldenSet

        return GoldenSet.from_extra(self.extra)

    def to_props(self) -> dict[str, str]:
        props = {
            "version": self.version,
            "config": json.dumps(self.config, sort_keys=True),
            "preprocessing": json.dumps(self.preprocessing, sort_keys=True),
            "labels": json.dumps(self.labels),
            "precision": self.precision,
            "batch": self.batch,
            "source": self.source,
            "source_sha256": self.source_sha256,
            "task": self.task,
            "output_name": self.output_name,
            "output_size": json.dumps(self.output_size),
            "normalized": json.dumps(self.normalized),
            **self.extra,
        }
        return {PREFIX + k: v for k, v in props.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version, "config": self.config, "preprocessing": self.preprocessing,
            "labels": self.labels, "precision": self.precision, "batch": self.batch, "source": self.source,
            "source_sha256": self.source_sha256, "task": self.task, "output_name": self.output_name,
            "output_size": self.output_size, "normalized": self.normalized, **self.extra,
        }

    @classmethod
    def from_dict(cls, d: Any) -> ArtifactMetadata:
        """Type and check metadata read from an artifact (untrusted): every opener (ONNX Runtime, OpenVINO,
        the engine sidecar, inspect, serve) gets one clear VitDeployError for a bad field, never a
        crash later. Unknown keys are kept as text in ``extra``."""
        if not isinstance(d, dict):
            raise _bad(f"is a {type(d).__name__}, not an object")
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise VitDeployError(f"artifact metadata lacks {', '.join(missing)}: re-export with `vitdeploy export`")
        for key in ("version", "precision", "batch", "source", "source_sha256", "task", "output_name"):
            if key in d and not isinstance(d[key], str):
                raise _bad(f"field {key} is a {type(d[key]).__name__}, not a string")
        labels = d["labels"]
        if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
            raise _bad("labels are not a list of strings")
        config = d["config"]
        if not isinstance(config, dict):
            raise _bad("config is not an object")
        num_labels = _num_labels(config)
        if type(num_labels) is not int or not 1 <= num_labels <= MAX_LABELS:
            raise _bad(f"config.num_labels {num_labels!r} is not a count from 1 to {MAX_LABELS}")
        _check_output(d, num_labels)
        from vitdeploy.preprocess import Preprocessing

        Preprocessing.from_dict(d["preprocessing"])  # its own one-line error
        extra = {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in d.items() if k not in KNOWN}
        return cls(**{k: d[k] for k in KNOWN if k in d}, extra=extra)

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ArtifactMetadata:
        d: dict[str, Any] = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
        if not d:
            raise NoMetadataError("this ONNX carries no vitdeploy metadata: export it with `vitdeploy export`")
        for key in JSON_FIELDS:
            if key in d:
                try:
                    d[key] = json.loads(d[key])
                except RecursionError:
                    raise _bad(f"field {key} is nested too deep") from None
                except (ValueError, TypeError) as e:
                    raise _bad(f"field {key} is not JSON ({type(e).__name__})") from None
        return cls.from_dict(d)


class NoMetadataError(VitDeployError):
    """An ONNX without vitdeploy metadata (a plain ONNX: it runs, with no labels or preprocessing)."""


def _num_labels(config: dict[str, Any]) -> Any:
    return config.get("num_labels", 1)


def _check_output(d: dict[str, Any], num_labels: int) -> None:
    """The task and its output, as an artifact states them (absent: a classifier's ``logits``, as every
    artifact written before embeddings)."""
    task = d.get("task", "classification")
    if task not in TASK_OUTPUTS:
        raise _bad(f"task {task!r} is not one of {', '.join(TASKS)}")
    name = d.get("output_name", TASK_OUTPUTS[task])
    if name != TASK_OUTPUTS[task]:
        raise _bad(f"output_name {name!r} is not {TASK_OUTPUTS[task]!r}, the {task} output")
    size = d.get("output_size", num_labels if task == "classification" else None)
    if type(size) is not int or not 1 <= size <= MAX_OUTPUT:
        raise _bad(f"output_size {size!r} is not a count from 1 to {MAX_OUTPUT}")
    if task == "classification" and size != num_labels:
        raise _bad(f"output_size {size} differs from config.num_labels {num_labels}")
    normalized = d.get("normalized", False)
    if type(normalized) is not bool:
        raise _bad(f"field normalized is {normalized!r}, not true or false")
    if normalized and task != "embedding":
        raise _bad("says normalized, which only an embedding output can be")


def _bad(problem: str) -> VitDeployError:
    return VitDeployError(f"the artifact's metadata {problem}: re-export the model with `vitdeploy export`")


def set_metadata(model: Any, meta: ArtifactMetadata) -> None:
    """Write ``meta`` into an ``onnx.ModelProto``'s metadata_props (replacing ours, keeping others)."""
    props = meta.to_props()
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    for key, value in [*kept, *props.items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def read_onnx_metadata(path: str | Path) -> ArtifactMetadata:
    """Metadata of an ONNX file, read without loading external weights."""

    from vitdeploy.io import load_onnx_graph

    model = load_onnx_graph(path)
    return ArtifactMetadata.from_props({p.key: p.value for p in model.metadata_props})
