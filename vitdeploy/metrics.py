"""Comparing two sets of logits (numpy only): the figures export, compare and eval report."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vitdeploy.errors import ConfigError

# Tolerances for verifying an exported ONNX against torch, per precision. ``max_abs_rel`` is the
# largest absolute error allowed relative to the logits' scale (max |reference|, at least 1);
# ``min_cosine`` is over the flattened logits of all verification inputs.
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"max_abs_rel": 1e-4, "min_cosine": 0.99999},
    "fp16": {"max_abs_rel": 5e-2, "min_cosine": 0.999},
    "int8": {"max_abs_rel": 0.5, "min_cosine": 0.98},
    "fp8": {"max_abs_rel": 0.8, "min_cosine": 0.95},
}


@dataclass
class Comparison:
    max_abs: float
    mean_abs: float
    cosine: float
    top1_agreement: float
    scale: float
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def within(self, max_abs_rel: float, min_cosine: float) -> bool:
        return self.max_abs <= max_abs_rel * self.scale and self.cosine >= min_cosine

    def summary(self) -> str:
        return (f"max abs {self.max_abs:.3g} (scale {self.scale:.3g}), mean abs {self.mean_abs:.3g}, "
                f"cosine {self.cosine:.6f}, top-1 agreement {self.top1_agreement * 100:.1f}% "
                f"over {self.samples} inputs")


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> Comparison:
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(candidate, dtype=np.float64)
    if ref.shape != out.shape:
        raise ConfigError(f"logits shapes differ: {ref.shape} vs {out.shape}")
    diff = np.abs(ref - out)
    denom = np.linalg.norm(ref) * np.linalg.norm(out)
    cosine = float(np.dot(ref.ravel(), out.ravel()) / denom) if denom > 0 else float(np.allclose(ref, out))
    agree = float(np.mean(ref.argmax(-1) == out.argmax(-1))) if ref.ndim == 2 else 1.0
    return Comparison(
        max_abs=float(diff.max()) if diff.size else 0.0,
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        cosine=cosine,
        top1_agreement=agree,
        scale=max(1.0, float(np.abs(ref).max()) if ref.size else 1.0),
        samples=int(ref.shape[0]) if ref.ndim else 1,
    )
