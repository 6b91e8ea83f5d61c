"""SigLIP's image tower (HF ``siglip_vision_model``, and the vision half of a ``siglip`` folder): no class
token, tanh GELU, and an attention-pooling head (a learned probe, multi-head attention, LayerNorm and
MLP) whose output is ``pooler_output``, the embedding. ``SiglipForImageClassification`` classifies the mean
of the final hidden states (every token is a patch), past the pooling head. SigLIP 2 (``siglip2``:
variable-resolution patches) is another model, refused by the family registry."""

from __future__ import annotations

from typing import Any

from vitdeploy.config import ViTConfig
from vitdeploy.errors import ConfigError
from vitdeploy.families.base import (
    CLIP_BLOCK_RULES,
    TEXT_KEYS,
    Family,
    StateDict,
    build,
    hf_common,
    hf_labels,
    hf_task,
    rename,
    split_qkv,
    timm_keys,
)

DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "patch_size": 16, "image_size": 224}
# SiglipImageProcessor: resized straight to 224x224 (no crop), bicubic, mean = std = 0.5
PREPROCESSING = {"image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5), "crop_pct": None,
                 "interpolation": "bicubic"}


def config_from_hf(d: dict[str, Any]) -> ViTConfig:
    """A ``siglip_vision_model`` config, or a ``siglip`` folder's ``vision_config`` (a
    ``SiglipForImageClassification``'s labels)."""
    vision = d.get("vision_config") or {} if d.get("model_type") == "siglip" else d
    if not isinstance(vision, dict):
        raise ConfigError("a siglip config.json's vision_config is not an object")
    task = hf_task(d)
    if vision.get("vision_use_head") is False and task == "embedding":
        raise ConfigError("a SigLIP image tower without its attention-pooling head (vision_use_head false) "
                          "has no embedding vitdeploy knows: it is not supported")
    merged = {**DEFAULTS, **vision}
    return build(vision, **{**PREPROCESSING, **hf_common(merged), **hf_labels(d)}, image_size=merged["image_size"],
                 model_type="siglip_vision_model", class_token=False, pooling="map", task=task,
                 classifier_input="patch_mean")


def hf_keys(state: StateDict) -> StateDict:
    """HF SigLIP names -> ours: positions ``[N, D]`` gain the batch axis; the head's fused ``in_proj`` is
    split into query, key and value (torch's MultiheadAttention order)."""
    state = rename(state, [(r"^vision_model\.", "")], drop=TEXT_KEYS)
    state = split_qkv(state, r"^head\.attention\.in_proj_(?P<kind>weight|bias)$", "head.attention.attention.{part}")
    out = rename(state, [*CLIP_BLOCK_RULES, (r"^head\.attention\.out_proj\.", "head.attention.output.dense.")])
    if "embeddings.position_embedding.weight" in out:
        out["vit.embeddings.position_embeddings"] = out.pop("embeddings.position_embedding.weight")[None]
    return out


def _preset(hidden: int, layers: int, heads: int, mlp: int, patch: int, size: int) -> ViTConfig:
    return config_from_hf({"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                           "intermediate_size": mlp, "patch_size": patch, "image_size": size})


FAMILY = Family(
    name="siglip", model_types=("siglip_vision_model", "siglip"), config_from_hf=config_from_hf, hf_keys=hf_keys,
    tasks=("embedding", "classification"),
    presets={"siglip-base-patch16-224": lambda: _preset(768, 12, 12, 3072, 16, 224),
             "siglip-large-patch16-256": lambda: _preset(1024, 24, 16, 4096, 16, 256),
             "siglip-test": lambda: _preset(32, 2, 2, 64, 32, 224)},
    detect=lambda state: any(k.endswith("head.probe") for k in state),
    timm_keys=timm_keys, timm_config={"hidden_act": "gelu"},  # timm's vit_*_siglip_*: exact GELU, not tanh
    timm_architectures=("vit_{size}_patch{n}_siglip_{n}",),  # not *_siglip_gap_* (no pooling head)
)
