"""Top-1 accuracy of any Runtime on an image folder with one sub-folder per class name."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.engines.base import Runtime
from vitdeploy.errors import VitDeployError
from vitdeploy.preprocess import Preprocessing, batches, labelled_images


@dataclass
class EvalResult:
    accuracy: float
    correct: int
    total: int
    predictions: list[int]
    targets: list[int]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("predictions")
        d.pop("targets")
        return d


def evaluate_folder(runtime: Runtime, folder: str | Path, batch_size: int = 32) -> EvalResult:
    """Class folder names are matched to the artifact's labels (or to integer class ids)."""
    if runtime.metadata is None:
        raise VitDeployError("the model carries no preprocessing metadata: export it with vitdeploy")
    files, classes = labelled_images(folder)
    labels = runtime.labels
    index = {name: i for i, name in enumerate(labels)}
    for c in sorted(set(classes)):
        if c not in index and not (c.isdigit() and int(c) < len(labels)):
            raise VitDeployError(f"class folder {c!r} names no label of the model ({', '.join(labels[:5])}, ...)")
    targets = [index[c] if c in index else int(c) for c in classes]
    prep = Preprocessing.from_dict(runtime.metadata.preprocessing)
    preds: list[int] = []
    for x in batches(files, prep, batch_size, uint8=runtime.spec.pixels):  # the artifact's input form
        preds.extend(np.asarray(runtime.infer(x)).argmax(-1).tolist())
    correct = int(sum(p == t for p, t in zip(preds, targets, strict=True)))
    return EvalResult(correct / len(files), correct, len(files), preds, targets)
