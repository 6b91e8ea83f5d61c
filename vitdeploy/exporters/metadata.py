"""The metadata every artifact carries (ONNX ``metadata_props``; the engine sidecar copies it).

Reading needs only ``onnx`` (not torch), so serving and runtime code can use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitdeploy.errors import VitDeployError

PREFIX = "vitdeploy."


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
    def from_dict(cls, d: dict[str, Any]) -> ArtifactMetadata:
        known = ("version", "config", "preprocessing", "labels", "precision", "batch", "source", "source_sha256")
        missing = [k for k in known[:6] if k not in d]
        if missing:
            raise VitDeployError(f"artifact metadata lacks {', '.join(missing)}: re-export with `vitdeploy export`")
        return cls(**{k: d[k] for k in known if k in d}, extra={k: str(v) for k, v in d.items() if k not in known})

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ArtifactMetadata:
        d: dict[str, Any] = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
        if not d:
            raise VitDeployError("this ONNX carries no vitdeploy metadata: export it with `vitdeploy export`")
        for key in ("config", "preprocessing", "labels"):
            if key in d:
                d[key] = json.loads(d[key])
        return cls.from_dict(d)


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
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise VitDeployError(f"{path} is not a readable ONNX file ({type(e).__name__})") from None
    return ArtifactMetadata.from_props({p.key: p.value for p in model.metadata_props})
