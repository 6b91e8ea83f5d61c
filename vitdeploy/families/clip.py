"""CLIP's image tower (HF ``clip_vision_model``, and the vision half of a ``clip`` folder): a patch
convolution without bias, a LayerNorm before the blocks, QuickGELU, a LayerNorm on [CLS] and a projection
without bias to ``image_embeds`` (the embedding). ``CLIPForImageClassification`` classifies the mean of the
patch tokens of the blocks' output (before post_layernorm, which CLIP applies to [CLS] alone)."""

from __future__ import annotations

from typing import Any

from vitdeploy.config import ViTConfig
from vitdeploy.errors import ConfigError
from vitdeploy.families.base import (
    CLIP_BLOCK_RULES,
    CLIP_MEAN,
    CLIP_STD,
    TEXT_KEYS,
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
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "patch_size": 32, "image_size": 224,
            "projection_dim": 512}
# CLIPImageProcessor: shortest edge 224, a 224 centre crop, bicubic, CLIP's mean/std
PREPROCESSING = {"image_mean": CLIP_MEAN, "image_std": CLIP_STD, "crop_pct": 1.0, "interpolation": "bicubic"}


def config_from_hf(d: dict[str, Any]) -> ViTConfig:
    """A ``clip_vision_model`` config, or a ``clip`` folder's (its ``vision_config`` and ``projection_dim``;
    a ``CLIPForImageClassification``'s labels)."""
    archs = [str(a) for a in d.get("architectures") or []]
    vision = d
    if d.get("model_type") == "clip":
        vision = d.get("vision_config") or {}
        if not isinstance(vision, dict):
            raise ConfigError("a clip config.json's vision_config is not an object")
        vision = {**vision, "projection_dim": d.get("projection_dim", 512)}
    merged = {**DEFAULTS, **vision}
    projected = not archs or any(a in ("CLIPVisionModelWithProjection", "CLIPModel") for a in archs)
    return build(vision, **{**PREPROCESSING, **hf_common(merged), **hf_labels(d)}, image_size=merged["image_size"],
                 model_type="clip_vision_model", patch_bias=False, pre_norm=True, qkv_bias=True,
                 projection_dim=int(merged["projection_dim"]) if projected else 0,
                 task=hf_task(d), classifier_input="patch_mean_before_norm")


def hf_keys(state: StateDict) -> StateDict:
    """HF CLIP names -> ours: [CLS] ``[D]`` and positions ``[N + 1, D]`` gain the batch axes of ViT's."""
    state = rename(state, [(r"^vision_model\.", "")], drop=TEXT_KEYS)
    out = rename(state, [*CLIP_BLOCK_RULES, (r"^pre_layrnorm\.", "vit.pre_layernorm.")])
    if "embeddings.class_embedding" in out:
        out["vit.embeddings.cls_token"] = out.pop("embeddings.class_embedding").reshape(1, 1, -1)
    if "embeddings.position_embedding.weight" in out:
        out["vit.embeddings.position_embeddings"] = out.pop("embeddings.position_embedding.weight")[None]
    return out


def _preset(hidden: int, layers: int, heads: int, patch: int, projection: int) -> ViTConfig:
    return config_from_hf({"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                           "intermediate_size": 4 * hidden, "patch_size": patch, "projection_dim": projection})


FAMILY = Family(
    name="clip", model_types=("clip_vision_model", "clip"), config_from_hf=config_from_hf, hf_keys=hf_keys,
    tasks=("embedding", "classification"),
    presets={"clip-vit-base-patch32": lambda: _preset(768, 12, 12, 32, 512),
             "clip-vit-base-patch16": lambda: _preset(768, 12, 12, 16, 512),
             "clip-vit-large-patch14": lambda: _preset(1024, 24, 16, 14, 768),
             "clip-test": lambda: _preset(32, 2, 2, 32, 16)},
    detect=lambda state: any(k.endswith("pre_layrnorm.weight") for k in state),
    # timm's vit_*_clip_*: [CLS] after the final norm to its head (HF's classifier reads the patches' mean)
    timm_keys=timm_keys, timm_config={"classifier_input": "cls"},
    timm_architectures=("vit_{size}_patch{n}_clip_{n}", "vit_{size}_patch{n}_clip_quickgelu_{n}"),
)
