"""Accuracy of any Runtime on an image folder with one sub-folder per class, in the measure its task has.

- A classifier: top-1 accuracy, class folder names matched to the artifact's labels (or class ids).
- An embedding model: k-nearest-neighbour top-1, leave-one-out over the whole folder: each image is
  classified by the majority class of its ``k`` most cosine-similar other images (a tie goes to the
  class of the nearest among the tied), so every image is a query once and never its own neighbour.

Against a reference artifact (FP32, for an INT8/FP8/FP16 one) on the same images: the mean and lowest
cosine of each image's embedding to the reference's (embeddings), or the top-1 agreement (classifiers),
beside the reference's own score.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.engines.base import Runtime
from vitdeploy.errors import VitDeployError
from vitdeploy.preprocess import Preprocessing, batches, labelled_images

_CHUNK = 1024  # query rows per similarity block: a block is _CHUNK x N float32


@dataclass
class Agreement:
    """A runtime's outputs against a reference's, on the same images."""

    reference: str  # the reference runtime, described
    measure: str  # "cosine" (embeddings: per image) | "top-1 agreement" (classifiers)
    mean: float
    lowest: float  # the lowest per-image cosine; for top-1 agreement, the agreement again
    reference_score: float  # the reference's own kNN top-1 (embeddings) or top-1 accuracy (classifiers)

    def summary(self) -> str:
        if self.measure == "cosine":
            return (f"cosine to {self.reference}: mean {self.mean:.6f}, lowest {self.lowest:.6f} "
                    f"(its kNN top-1 {self.reference_score * 100:.2f}%)")
        return (f"top-1 agreement with {self.reference}: {self.mean * 100:.2f}% "
                f"(its top-1 {self.reference_score * 100:.2f}%)")


@dataclass
class EvalResult:
    accuracy: float
    correct: int
    total: int
    predictions: list[int]
    targets: list[int]
    reference: Agreement | None = None
    task: str = "classification"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("predictions")
        d.pop("targets")
        return {**d, "measure": "top-1"}


@dataclass
class EmbeddingEvalResult:
    """kNN top-1 (leave-one-out, cosine) of an embedding model on a labelled folder."""

    knn_top1: float
    correct: int
    total: int
    k: int
    size: int  # values per embedding
    normalized: bool  # the artifact says it L2-normalizes in its graph
    mean_norm: float  # over the finite embeddings
    non_finite: int  # embeddings holding NaN or infinity (each counts as a miss, and as cosine 0)
    predictions: list[str]
    targets: list[str]
    reference: Agreement | None = None
    task: str = "embedding"

    @property
    def accuracy(self) -> float:
        """The task's score under the name a classifier's result has."""
        return self.knn_top1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("predictions")
        d.pop("targets")
        return {**d, "accuracy": self.knn_top1, "measure": "kNN top-1"}

    def summary(self) -> str:
        bad = f", {self.non_finite} not finite" if self.non_finite else ""
        return (f"kNN top-1 {self.knn_top1 * 100:.2f}% ({self.correct}/{self.total}; k={self.k}, cosine, "
                f"leave-one-out), {self.size}-d embeddings, mean norm {self.mean_norm:.4g}{bad}")


@dataclass
class ReferenceOutputs:
    """A reference's output rows on a folder's images (in :func:`vitdeploy.preprocess.labelled_images` order),
    computed once for every artifact scored against it."""

    name: str  # the reference runtime, described
    rows: np.ndarray

    @classmethod
    def of(cls, reference: Runtime, folder: str | Path, batch_size: int = 32) -> ReferenceOutputs:
        return cls(reference.describe(), outputs(reference, labelled_images(folder)[0], batch_size))


def evaluate(runtime: Runtime, folder: str | Path, batch_size: int = 32,
             reference: Runtime | ReferenceOutputs | None = None, k: int = 1) -> EvalResult | EmbeddingEvalResult:
    """The measure the artifact's task has (its metadata says which): top-1 for a classifier, kNN top-1 for
    an embedding model; with ``reference`` (a runtime, or its outputs on this folder), the agreement with it
    on the same images."""
    if isinstance(reference, Runtime):
        _check_reference(runtime, reference)
        reference = ReferenceOutputs.of(reference, folder, batch_size)
    files, classes = labelled_images(folder)
    return score(runtime, outputs(runtime, files, batch_size), classes, reference, k)


def score(runtime: Runtime, out: np.ndarray, classes: list[str], reference: ReferenceOutputs | None = None,
          k: int = 1) -> EvalResult | EmbeddingEvalResult:
    """:func:`evaluate` on output rows already computed for images of ``classes``."""
    meta = _metadata(runtime)
    if reference is not None and reference.rows.shape != out.shape:
        raise VitDeployError(f"the reference gives {reference.rows.shape[1:]} per image and this model "
                             f"{out.shape[1:]}: give the FP32 export of the same model as the reference")
    if meta.is_embedding:
        result = knn_result(out, classes, k, normalized=meta.normalized)
        if reference is not None:
            cos = row_cosines(out, reference.rows)
            result.reference = Agreement(reference.name, "cosine", float(cos.mean()), float(cos.min()),
                                         knn_result(reference.rows, classes, k).knn_top1)
        return result
    targets = _targets(runtime, classes)
    top1 = _top1(out, targets)
    if reference is not None:
        agree = float(np.mean(out.argmax(-1) == reference.rows.argmax(-1)))
        top1.reference = Agreement(reference.name, "top-1 agreement", agree, agree,
                                   _top1(reference.rows, targets).accuracy)
    return top1


def evaluate_folder(runtime: Runtime, folder: str | Path, batch_size: int = 32) -> EvalResult:
    """Top-1 of a classifier; class folder names are matched to the artifact's labels (or to class ids)."""
    if _metadata(runtime).is_embedding:
        raise VitDeployError("this artifact is an embedding model, not a classifier: score it with "
                             "vitdeploy.evaluate.evaluate (kNN top-1), or `vitdeploy eval`")
    result = evaluate(runtime, folder, batch_size)
    assert isinstance(result, EvalResult)  # a classifier's
    return result


def outputs(runtime: Runtime, files: list[Path], batch_size: int = 32) -> np.ndarray:
    """The runtime's output rows (logits or embeddings) for image files, preprocessed as its metadata says."""
    prep = Preprocessing.from_dict(_metadata(runtime).preprocessing)
    rows = [np.asarray(runtime.infer(x), dtype=np.float32)
            for x in batches(files, prep, batch_size, uint8=runtime.spec.pixels)]  # the artifact's input form
    return np.concatenate(rows)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (float64); a row that is zero or
    not finite in either scores 0, so a broken output drags the mean down instead of hiding as NaN."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise VitDeployError(f"outputs of shape {a.shape} and {b.shape} cannot be compared row by row")
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    ok = np.isfinite(a).all(1) & np.isfinite(b).all(1)
    a, b = np.where(ok[:, None], a, 0.0), np.where(ok[:, None], b, 0.0)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("ij,ij->i", a, b)
    return np.where(denom > 0, dots / np.where(denom > 0, denom, 1.0), 0.0)


def knn_result(embeddings: np.ndarray, classes: list[str], k: int = 1, normalized: bool = False) -> EmbeddingEvalResult:
    """Leave-one-out k-nearest-neighbour top-1 under cosine similarity (see the module docstring)."""
    x = np.asarray(embeddings, np.float32).reshape(len(embeddings), -1)
    if len(x) != len(classes):
        raise VitDeployError(f"{len(x)} embeddings for {len(classes)} labelled images")
    if len(x) < 2:
        raise VitDeployError("kNN top-1 needs at least 2 labelled images (each is classified by the others)")
    if not 1 <= k < len(x):
        raise VitDeployError(f"k={k}: choose from 1 to {len(x) - 1} (the other images in the folder)")
    finite = np.isfinite(x).all(1)
    norms = np.linalg.norm(np.where(finite[:, None], x, 0.0), axis=1)
    unit = np.where((finite & (norms > 0))[:, None], x / np.maximum(norms, 1e-30)[:, None], 0.0)
    preds = []
    for start in range(0, len(x), _CHUNK):
        sims = unit[start:start + _CHUNK] @ unit.T
        rows = np.arange(sims.shape[0])
        sims[rows, rows + start] = -np.inf  # never its own neighbour
        sims[:, ~finite] = -np.inf  # nor is a broken embedding anyone's
        nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        preds.extend(_vote([classes[j] for j in row]) for row in nearest)
    preds = [p if finite[i] else "" for i, p in enumerate(preds)]  # a broken embedding finds nothing
    correct = sum(p == c for p, c in zip(preds, classes, strict=True))
    mean_norm = float(norms[finite].mean()) if finite.any() else float("nan")
    return EmbeddingEvalResult(correct / len(x), correct, len(x), k, x.shape[1], normalized, mean_norm,
                               int((~finite).sum()), preds, list(classes))


def _vote(neighbours: list[str]) -> str:
    """The most common class among the neighbours (nearest first); a tie goes to the nearest of the tied."""
    counts = Counter(neighbours)
    best = max(counts.values())
    return next(c for c in neighbours if counts[c] == best)


def _metadata(runtime: Runtime) -> Any:
    if runtime.metadata is None:
        raise VitDeployError("the model carries no preprocessing metadata: export it with vitdeploy")
    return runtime.metadata


def _check_reference(runtime: Runtime, reference: Runtime) -> None:
    """A reference must answer the same question: same task and output size."""
    if reference.metadata is None:
        raise VitDeployError("the reference carries no vitdeploy metadata (its preprocessing and task): give the "
                             "FP32 export of the same model, made by `vitdeploy export`")
    a, b = _metadata(runtime), reference.metadata
    if (a.task, a.output_size) != (b.task, b.output_size):
        raise VitDeployError(f"the reference is a {b.task} model with {b.output_size} outputs and this is a {a.task} "
                             f"model with {a.output_size}: give the FP32 export of the same model as --reference")


def _targets(runtime: Runtime, classes: list[str]) -> list[int]:
    labels = runtime.labels
    index = {name: i for i, name in enumerate(labels)}
    for c in sorted(set(classes)):
        if c not in index and not (c.isdigit() and int(c) < len(labels)):
            raise VitDeployError(f"class folder {c!r} names no label of the model ({', '.join(labels[:5])}, ...)")
    return [index[c] if c in index else int(c) for c in classes]


def _top1(logits: np.ndarray, targets: list[int]) -> EvalResult:
    preds = logits.argmax(-1).tolist()
    correct = int(sum(p == t for p, t in zip(preds, targets, strict=True)))
    return EvalResult(correct / len(targets), correct, len(targets), preds, targets)
