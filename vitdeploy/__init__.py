"""vitdeploy: a Vision Transformer from PyTorch to ONNX and TensorRT, verified and measured.

Heavy modules (torch, onnx, onnxruntime, tensorrt) load on first use, so importing the package is
cheap: ``from vitdeploy import load_model`` pulls in torch only when called.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["ViTConfig", "__version__", "load_model", "preset", "save_model"]


def __getattr__(name: str) -> Any:
    if name in ("load_model", "save_model"):
        from vitdeploy import checkpoints

        return getattr(checkpoints, name)
    if name in ("ViTConfig", "preset"):
        from vitdeploy import config

        return getattr(config, name)
    raise AttributeError(f"module 'vitdeploy' has no attribute {name!r}")
