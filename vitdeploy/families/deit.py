"""DeiT (HF ``deit``; timm ``deit_*_distilled_*``): ViT with a distillation token after [CLS] (198 tokens at
224); ``DeiTForImageClassificationWithTeacher`` averages the class head and the distillation head."""

from __future__ import annotations

from typing import Any

from vitdeploy.config import ViTConfig, to_2tuple
from vitdeploy.families.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Family,
    StateDict,
    build,
    hf_common,
    hf_labels,
    hf_task,
    rename,
    timm_keys,
)

DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
            "hidden_act": "gelu", "layer_norm_eps": 1e-12, "patch_size": 16}
# DeiTImageProcessor: resized to 256x256 (the aspect ratio not kept) then a 224 centre crop, bicubic, ImageNet
# mean/std (a folder's preprocessor_config.json, where it has one, says the same or otherwise)
PREPROCESSING = {"image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "crop_pct": 0.875,
                 "interpolation": "bicubic"}


def resize_size(image_size: Any) -> tuple[int, int] | None:
    """DeiTImageProcessor's resize before its crop, for an input of ``image_size`` (256x256 for 224); None
    for an image_size ViTConfig refuses in its own words."""
    try:
        height, width = to_2tuple(image_size)
    except (TypeError, ValueError):
        return None
    return round(height / PREPROCESSING["crop_pct"]), round(width / PREPROCESSING["crop_pct"])


def config_from_hf(d: dict[str, Any]) -> ViTConfig:
    archs = [str(a) for a in d.get("architectures") or []]
    teacher = any(a.endswith("WithTeacher") for a in archs) or not archs
    return build(d, **{**PREPROCESSING, **DEFAULTS, **hf_common(d), **hf_labels(d)}, model_type="deit",
                 image_size=d.get("image_size", 224), resize_size=resize_size(d.get("image_size", 224)),
                 distillation_token=True, task=hf_task(d) if archs else
                 "classification", classifier_input="cls_distilled" if teacher else "cls")


def hf_keys(state: StateDict) -> StateDict:
    return rename(state, [(r"^deit\.", "vit."), (r"^cls_classifier\.", "classifier.")], drop=(r"^(deit\.)?pooler\.",))


def _preset(hidden: int, layers: int, heads: int, patch: int = 16) -> ViTConfig:
    return ViTConfig(**PREPROCESSING, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=4 * hidden, model_type="deit", distillation_token=True,
                     classifier_input="cls_distilled", patch_size=patch, resize_size=resize_size(224))


FAMILY = Family(
    name="deit", model_types=("deit",), config_from_hf=config_from_hf, hf_keys=hf_keys,
    presets={"deit-tiny-distilled-patch16-224": lambda: _preset(192, 12, 3),
             "deit-small-distilled-patch16-224": lambda: _preset(384, 12, 6),
             "deit-base-distilled-patch16-224": lambda: _preset(768, 12, 12),
             "deit-test": lambda: _preset(32, 2, 2, patch=32)},  # a tiny one, for trying the tools
    detect=lambda state: any(k.startswith("deit.") for k in state),
    timm_keys=timm_keys, timm_config={"layer_norm_eps": 1e-6},  # timm's DeiT: eps 1e-6, HF's 1e-12
    timm_architectures=("deit_{size}_distilled_patch{n}_{n}",),
)
