"""Shared fixtures: tiny configs, HF reference models saved to folders, the trained digits model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may download
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# (our ViTConfig kwargs) for parity: one default-ish, one patch 32 with a non-default width
PARITY_CONFIGS = {
    "p16-w48": dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
                    image_size=64, patch_size=16, num_labels=7),
    "p32-w80-nobias": dict(hidden_size=80, num_hidden_layers=3, num_attention_heads=4, intermediate_size=160,
                           image_size=(96, 64), patch_size=32, num_labels=5, qkv_bias=False),
}
TINY_224 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                image_size=224, patch_size=32, num_labels=6)


def hf_reference(kwargs: dict, seed: int = 0, layer_norm_eps: float = 1e-12):
    """HF transformers' ViTForImageClassification with random weights (fixed seed)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(layer_norm_eps=layer_norm_eps, **kwargs)
    model = transformers.ViTForImageClassification(cfg).eval()
    # HF's init leaves cls/position small; make them matter for the comparison
    with torch.no_grad():
        for _name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def save_hf_folder(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def to_timm_state(hf_state: dict) -> dict:
    """HF ViT checkpoint keys -> timm's layout (fused qkv), as timm's own checkpoints have them."""
    import re

    import torch

    out = {}
    mapping = {
        "vit.embeddings.cls_token": "cls_token",
        "vit.embeddings.position_embeddings": "pos_embed",
        "vit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "vit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "vit.layernorm.weight": "norm.weight", "vit.layernorm.bias": "norm.bias",
        "classifier.weight": "head.weight", "classifier.bias": "head.bias",
    }
    block = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
             "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
    layers = {}
    for k, v in hf_state.items():
        if k in mapping:
            out[mapping[k]] = v
            continue
        m = re.match(r"vit\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", k)
        i, name, kind = m.groups()
        if name.startswith("attention.attention."):
            layers.setdefault((i, kind), {})[name.rsplit(".", 1)[1]] = v
        else:
            out[f"blocks.{i}.{block[name]}.{kind}"] = v
    for (i, kind), parts in layers.items():
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: save_hf_folder(hf_reference(kw), root / name) for name, kw in PARITY_CONFIGS.items()}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Our own checkpoint of a tiny 224x224 ViT (random init, seed 0)."""
    from vitdeploy import save_model
    from vitdeploy.checkpoints import build_model
    from vitdeploy.config import ViTConfig

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_model(build_model(ViTConfig(**TINY_224), seed=0), path)
    return path


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    """A few real image files of several modes and formats."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (mode, ext) in enumerate([("RGB", "jpg"), ("L", "png"), ("RGBA", "png"), ("RGB", "webp"),
                                      ("P", "png"), ("RGB", "png")]):
        arr = rng.integers(0, 255, (40 + 7 * i, 56, 3), dtype=np.uint8)
        img = Image.fromarray(arr).convert(mode)
        (root / f"sub{i % 2}").mkdir(exist_ok=True)
        img.save(root / f"sub{i % 2}" / f"img{i}.{ext}")
    return root


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> dict[str, Path]:
    """scikit-learn's digits as image folders and a tiny ViT trained on them (cached across runs)."""
    from vitdeploy import save_model
    from vitdeploy.datasets import train_digits_vit, write_digits

    root = tmp_path_factory.mktemp("digits")
    train, test = write_digits(root)
    cache_dir = Path(os.environ.get("VITDEPLOY_TEST_CACHE", Path(__file__).parent.parent / ".cache"))
    cache = cache_dir / "digits_vit.safetensors"
    ckpt = root / "digits_vit.safetensors"
    if cache.is_file():
        shutil.copy(cache, ckpt)
    else:
        save_model(train_digits_vit(train), ckpt)
        cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ckpt, cache)
    return {"train": train, "test": test, "checkpoint": ckpt}


@pytest.fixture(scope="session")
def digits_onnx(digits, tmp_path_factory) -> dict[str, Path]:
    """The digits model exported (and verified) in each precision, static batch 1 and dynamic."""
    from vitdeploy.exporters import ExportOptions, export_onnx

    root = tmp_path_factory.mktemp("digits_onnx")
    out = {}
    for name, opts in {
        "fp32": ExportOptions(dynamic_batch=True),
        "fp16": ExportOptions(dynamic_batch=True, precision="fp16"),
        # attention float: the linear layers' Q/DQ layout (INT8 attention: tests/test_attention_qdq.py)
        "int8": ExportOptions(dynamic_batch=True, precision="int8", calib_dir=digits["train"], calib_samples=200,
                              attention="float"),
        "fp32-b4": ExportOptions(batch=4),
    }.items():
        out[name] = export_onnx(digits["checkpoint"], root / f"digits-{name}.onnx", options=opts).path
    return out


@pytest.fixture(scope="session")
def serving_onnx(hf_folders, tmp_path_factory) -> Path:
    """A real dynamic-batch ONNX of a small ViT (64x64 input, 7 labels) for many fast inferences."""
    from vitdeploy.exporters import ExportOptions, export_onnx

    out = tmp_path_factory.mktemp("serving") / "small.onnx"
    return export_onnx(hf_folders["p16-w48"], out, options=ExportOptions(dynamic_batch=True)).path


@pytest.fixture(scope="session")
def clip_embedding(tmp_path_factory) -> Path:
    """CLIP's image tower at its test size (preset clip-test, random init, seed 0) exported by `vitdeploy export
    --task embedding --dynamic-batch`: FP32, its golden set of embeddings, vectors of the projection's size (16)
    from a hidden state of 32."""
    from click.testing import CliRunner

    from vitdeploy.cli import main

    out = tmp_path_factory.mktemp("clip_embedding") / "clip.onnx"
    r = CliRunner().invoke(main, ["export", "--model", "clip-test", "--seed", "0", "--task", "embedding",
                                  "--dynamic-batch", "--output", str(out)])
    assert r.exit_code == 0, r.output
    return out
