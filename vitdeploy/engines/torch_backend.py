"""torch backend: our model from a checkpoint, eager or torch.compile, fp32/bf16/fp16, CPU or CUDA.

The baseline a user would otherwise run, and the reference the exports are checked against.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vitdeploy import __version__
from vitdeploy.artifacts.metadata import ArtifactMetadata
from vitdeploy.engines.base import InputSpec, Runtime
from vitdeploy.errors import VitDeployError

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class TorchRuntime(Runtime):
    backend = "torch"

    def __init__(self, source: Any, config: Any = None, seed: int | None = None, device: str = "auto",
                 dtype: str = "fp32", compile: bool = False, sdpa: bool = True, threads: int | None = None,
                 max_batch: int = 256) -> None:
        import torch

        from vitdeploy.checkpoints import resolve
        from vitdeploy.preprocess import Preprocessing

        if dtype not in _DTYPES:
            raise VitDeployError(f"torch dtype {dtype!r}: choose fp32, bf16 or fp16")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise VitDeployError("--device cuda: torch sees no CUDA device")
        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        loaded = resolve(source, config, seed=seed)
        cfg = loaded.model.config
        self.source = str(source)
        self.device = torch.device(device)
        self.where = self.device.type
        self.torch_dtype = getattr(torch, _DTYPES[dtype])
        self.dtype_name = dtype
        model = loaded.model.to(self.device, self.torch_dtype)
        model.set_sdpa(sdpa)
        self.model = torch.compile(model) if compile else model
        self.compiled = compile
        h, w = cfg.image_hw
        self.spec = InputSpec("pixel_values", "float32", (cfg.num_channels, h, w), 1, max_batch)
        embedding = cfg.task == "embedding"  # as the exporter writes it: the model's task and output
        self.metadata = ArtifactMetadata(
            version=__version__, config=cfg.to_dict(), preprocessing=Preprocessing.from_config(cfg).to_dict(),
            labels=[] if embedding else cfg.labels, precision=dtype, batch="dynamic", source=str(source),
            source_sha256=loaded.sha256 or "", task=cfg.task, output_size=cfg.output_size,
            normalized=embedding and cfg.normalize,
        )
        self.output_name = self.metadata.output_name  # the task's output (logits or embeddings)

    @property
    def torch_cuda(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        mode = "compile" if self.compiled else "eager"
        threads = f", {self.threads} threads" if self.device.type == "cpu" else ""
        return f"torch[{self.device.type}, {mode}{threads}] {self.source} ({self.dtype_name})"

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, self.torch_dtype, non_blocking=True)
            return self.model(x).float().cpu().numpy()

    def infer_tensor(self, x: Any) -> Any:
        """Torch in, torch out (no host copy), for callers holding CUDA tensors."""
        import torch

        with torch.inference_mode():
            return self.model(x.to(self.device, self.torch_dtype)).float()
