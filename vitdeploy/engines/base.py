"""One Runtime interface for every backend (ONNX Runtime, OpenVINO, TensorRT, torch).

A backend implements ``_run(batch)`` for a batch its artifact accepts; the base class checks the
input, splits batches larger than the artifact allows and pads smaller ones for a static batch,
and returns exactly one row of logits per input row.

Thread-safety: ``infer`` may be called from several threads on every backend. ONNX Runtime,
OpenVINO and torch sessions are re-entrant; a TensorRT runtime runs ``instances`` execution contexts
(each with its own stream and buffers), and a call waits for a free one.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from vitdeploy.artifacts.metadata import ArtifactMetadata
from vitdeploy.errors import VitDeployError

if TYPE_CHECKING:
    from PIL import Image as PILImage


class InputError(VitDeployError):
    """A batch of the wrong shape or dtype."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str  # numpy dtype name: float32 | float16, or uint8 (preprocessing in the graph)
    shape: tuple[int, ...]  # without the batch axis: (C, H, W); (H, W, C) for uint8 pixels
    min_batch: int
    max_batch: int

    @property
    def static(self) -> bool:
        return self.min_batch == self.max_batch

    @property
    def pixels(self) -> bool:
        """True when the model takes uint8 NHWC pixels and normalizes them itself."""
        return self.dtype == "uint8"


class Runtime(abc.ABC):
    """``infer(batch [N, C, H, W]) -> logits [N, num_labels]`` (float32 numpy); a model exported with
    ``--uint8-input`` takes ``[N, H, W, C]`` uint8 pixels instead. ``preprocess(images)`` gives either."""

    # What callers read (bench, tune, serving), declared here with defaults so nobody probes for them.
    backend: str = "?"
    where: str = "cpu"  # where the model runs: "cpu" or "cuda"
    threads: int | None = None  # CPU threads the backend uses, where it has a setting
    output_name: str = "logits"  # the output tensor's name in the artifact (logits, or embeddings: its task's)
    # the device phases (ms) of the last call made from the calling thread, where measured (TensorRT: per thread)
    last_timing: Mapping[str, float] = MappingProxyType({})
    instances: int = 1  # calls that can run at once without waiting for each other (TensorRT contexts)
    spec: InputSpec
    metadata: ArtifactMetadata | None

    def runtime_for(self, batch: int) -> Runtime:
        """The runtime that runs a batch of this size: itself, unless it dispatches (a tuned plan)."""
        return self

    @property
    def torch_cuda(self) -> bool:
        """True when the model runs in torch on a CUDA device (so torch.cuda's memory stats are its own)."""
        return False

    @abc.abstractmethod
    def _run(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a batch whose size lies in [spec.min_batch, spec.max_batch]."""

    def describe(self) -> str:
        return self.backend

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free what the backend holds (device buffers, sessions)."""

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def labels(self) -> list[str]:
        return self.metadata.labels if self.metadata else []

    def check_input(self, batch: Any) -> np.ndarray:
        """A numpy (or torch) batch -> contiguous numpy in the artifact's dtype, or InputError."""
        if hasattr(batch, "detach") and hasattr(batch, "cpu"):  # torch tensor
            batch = batch.detach().cpu().numpy()
        if not isinstance(batch, np.ndarray):
            raise InputError(f"expected a numpy array or torch tensor, got {type(batch).__name__}")
        if batch.ndim == len(self.spec.shape):
            batch = batch[None]
        if batch.ndim != len(self.spec.shape) + 1 or tuple(batch.shape[1:]) != self.spec.shape:
            want = ", ".join(map(str, self.spec.shape))
            raise InputError(f"input shape {tuple(batch.shape)} does not match the model's [N, {want}]")
        if batch.shape[0] == 0:
            raise InputError("empty batch")
        if self.spec.pixels:
            if batch.dtype != np.uint8:
                raise InputError(f"input dtype {batch.dtype}: this model normalizes in its graph and takes uint8 "
                                 "NHWC pixels (resized, not normalized): use runtime.preprocess(images)")
            return np.ascontiguousarray(batch)
        if batch.dtype.kind != "f":
            raise InputError(f"input dtype {batch.dtype} is not floating point: pass preprocessed float32 pixels")
        return np.ascontiguousarray(batch, dtype=self.spec.dtype)

    def infer(self, batch: Any) -> np.ndarray:
        x = self.check_input(batch)
        n = x.shape[0]
        lo, hi = self.spec.min_batch, self.spec.max_batch
        if lo <= n <= hi:
            return np.asarray(self._run(x), dtype=np.float32)
        outs = []
        for start in range(0, n, hi):
            chunk = x[start:start + hi]
            k = chunk.shape[0]
            if k < lo:  # pad a short chunk for a static (or min-bounded) batch
                pad = np.repeat(chunk[-1:], lo - k, axis=0)
                chunk = np.concatenate([chunk, pad])
            outs.append(np.asarray(self._run(chunk), dtype=np.float32)[:k])
        return np.concatenate(outs)

    def warm(self, batch: Any) -> None:
        """Run ``batch`` once on every instance of the runtime that takes its size (a server's warm-up:
        each TensorRT instance sets up, and with CUDA graphs captures, that size; a warmed TensorRT runtime
        captures no size it was not warmed with). One :meth:`infer` where instances share everything."""
        inner = self.runtime_for(len(batch))
        if inner is not self:
            inner.warm(batch)
        else:
            self.infer(batch)

    def preprocess(self, images: list[PILImage.Image]) -> np.ndarray:
        """Decoded RGB images -> the batch this artifact takes: normalized float32 [N, C, H, W], or the
        resized uint8 [N, H, W, C] pixels for a model with its preprocessing in the graph."""
        from vitdeploy.preprocess import ImageError, Preprocessing

        if self.metadata is None:
            raise VitDeployError("this artifact carries no preprocessing metadata: export it with vitdeploy")
        if not images:
            raise ImageError("no images given")
        prep = Preprocessing.from_dict(self.metadata.preprocessing)
        if self.spec.pixels:
            return np.stack([prep.pixels(im) for im in images])
        return np.stack([prep(im) for im in images]).astype(self.spec.dtype, copy=False)

    def predict_images(self, paths: list[Any], top_k: int = 5) -> list[list[tuple[str, float]]]:
        """Image files -> top-k (label, probability) per image, preprocessing from the metadata."""
        from vitdeploy.preprocess import open_image

        logits = self.infer(self.preprocess([open_image(p) for p in paths]))
        probs = softmax(logits)
        labels = self.labels
        out = []
        for row in probs:
            idx = np.argsort(-row)[:top_k]
            out.append([(labels[i] if i < len(labels) else str(i), float(row[i])) for i in idx])
        return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)
