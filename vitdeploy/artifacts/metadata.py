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
KNOWN = ("version", "config", "preprocessing", "labels", "precision", "batch", "source", "source_sha256")
REQUIRED = KNOWN[:6]
JSON_FIELDS = ("config", "preprocessing", "labels")  # the fields ONNX metadata_props hold as JSON text
MAX_LABELS = 1 << 20


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
    extra: dict[str, str] = field(default_factory=dict)

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
            **self.extra,
        }
        return {PREFIX + k: v for k, v in props.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version, "config": self.config, "preprocessing": self.preprocessing,
            "labels": self.labels, "precision": self.precision, "batch": self.batch, "source": self.source,
            "source_sha256": self.source_sha256, **self.extra,
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
        for key in ("version", "precision", "batch", "source", "source_sha256"):
            if key in d and not isinstance(d[key], str):
                raise _bad(f"field {key} is a {type(d[key]).__name__}, not a string")
        labels = d["labels"]
        if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
            raise _bad("labels are not a list of strings")
        config = d["config"]
        if not isinstance(config, dict):
            raise _bad("config is not an object")
        num_labels = config.get("num_labels", 1)
        if type(num_labels) is not int or not 1 <= num_labels <= MAX_LABELS:
            raise _bad(f"config.num_labels {num_labels!r} is not a count from 1 to {MAX_LABELS}")
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
