"""What a family registers, and the small helpers its key maps and config readers share.

A family is data and plain functions (timm's ``@register_model`` variants; HF's per-family
``config.json`` and checkpoint names): its HF ``model_type``s, a reader of HF ``config.json`` into
ViTConfig's block options, a key map from its checkpoint names (HF, timm) to ours (HF ViT's names,
plus the few a family adds), its presets and its preprocessing defaults. No torch at import: the key
maps only call methods of the tensors they are given.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vitdeploy.config import HF_NUM_LABELS, ViTConfig
from vitdeploy.errors import ConfigError

StateDict = dict[str, Any]  # name -> torch.Tensor
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# the parts of a classifier checkpoint that an embedding model does not have
HEAD_KEYS = re.compile(r"^(classifier|distillation_classifier)\.")
# the parts of an embedding checkpoint that a classifier does not have (SigLIP's pooling head, CLIP's projection)
EMBEDDING_KEYS = re.compile(r"^(head|visual_projection)\.")


@dataclass(frozen=True)
class Family:
    """One family member's registration; see the module docstring."""

    name: str
    model_types: tuple[str, ...]  # HF model_types (config.json) this family reads
    config_from_hf: Callable[[dict[str, Any]], ViTConfig]
    hf_keys: Callable[[StateDict], StateDict]  # HF checkpoint names -> ours
    presets: Mapping[str, Callable[[], ViTConfig]] = field(default_factory=dict)
    tasks: tuple[str, ...] = ("classification", "embedding")  # the first is a preset's default
    resizes_positions: bool = False  # position embeddings interpolated to another input size (DINOv2)
    detect: Callable[[StateDict], bool] = lambda state: False  # is this an HF state dict of the family?
    # timm's VisionTransformer names -> ours (None: timm weights of the family are not read), and what timm's
    # variants of the family set differently from HF's config (LayerNorm eps, activation, classifier input)
    timm_keys: Callable[[StateDict], StateDict] | None = None
    timm_config: Mapping[str, Any] = field(default_factory=dict)
    # timm architecture names of the family (a timm folder's config.json): ``{size}`` is timm's size name,
    # ``{n}`` a number; the heads of a size where the family's differ from TIMM_HEADS (DINOv2's giant)
    timm_architectures: tuple[str, ...] = ()
    timm_heads: Mapping[str, int] = field(default_factory=dict)


def rename(state: StateDict, rules: list[tuple[str, str]], drop: tuple[str, ...] = ()) -> StateDict:
    """Each key through the first regex rule that matches (``re.sub``); keys matching ``drop`` removed;
    a key no rule matches is kept as is (the strict load names it)."""
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]
    dropped = [re.compile(p) for p in drop]
    out: StateDict = {}
    for key, value in state.items():
        if any(p.search(key) for p in dropped):
            continue
        for pattern, repl in compiled:
            if pattern.search(key):
                key = pattern.sub(repl, key)
                break
        out[key] = value
    return out


def strip_prefix(state: StateDict, prefixes: tuple[str, ...]) -> StateDict:
    """Keys without the first of ``prefixes`` that some key has (HF's base-model prefix: ``dinov2.``, ...)."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    return dict(state)


# the names inside one transformer block of CLIP and SigLIP (HF) -> HF ViT's
CLIP_BLOCK_RULES = [
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"vit.encoder.layer.\1.layernorm_before."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"vit.encoder.layer.\1.layernorm_after."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.q_proj\.", r"vit.encoder.layer.\1.attention.attention.query."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.k_proj\.", r"vit.encoder.layer.\1.attention.attention.key."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.v_proj\.", r"vit.encoder.layer.\1.attention.attention.value."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"vit.encoder.layer.\1.attention.output.dense."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc1\.", r"vit.encoder.layer.\1.intermediate.dense."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc2\.", r"vit.encoder.layer.\1.output.dense."),
    (r"^embeddings\.patch_embedding\.", "vit.embeddings.patch_embeddings.projection."),
    (r"^post_layernorm\.", "vit.layernorm."),
]
# an image-text folder's text half (CLIP, SigLIP), read past
TEXT_KEYS = (r"^text_model\.", r"^text_projection\.", r"^logit_scale$", r"^logit_bias$")


def split_qkv(state: StateDict, pattern: str, target: str) -> StateDict:
    """A fused query/key/value tensor (timm's ``qkv``, torch MultiheadAttention's ``in_proj``) split in that
    order along dim 0 into ``target.format(i=..., part=...)`` + ``.weight``/``.bias``."""
    out: StateDict = {}
    regex = re.compile(pattern)
    for key, value in state.items():
        m = regex.match(key)
        if not m:
            out[key] = value
            continue
        i, kind = m.group("i") if "i" in regex.groupindex else "", m.group("kind")
        for part, tensor in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
            out[target.format(i=i, part=part) + "." + kind] = tensor
    return out


def hf_task(d: dict[str, Any]) -> str:
    """classification when config.json's architecture is a classifier, else embedding (a base model)."""
    archs = d.get("architectures") or []
    return "classification" if any("ForImageClassification" in str(a) for a in archs) else "embedding"


def hf_labels(d: dict[str, Any]) -> dict[str, Any]:
    """num_labels and id2label, as HF's config.json has them (it leaves out its default of 2 labels)."""
    if isinstance(d.get("id2label"), dict):
        return {"id2label": d["id2label"]}
    if isinstance(d.get("num_labels"), int):
        return {"num_labels": d["num_labels"]}
    return {"num_labels": HF_NUM_LABELS} if "transformers_version" in d else {}  # transformers' default


def hf_common(d: dict[str, Any], *names: str) -> dict[str, Any]:
    """The fields every family shares with HF ViT's config (and ``names``), where config.json has them."""
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
            "layer_norm_eps", "patch_size", "num_channels", "qkv_bias", "initializer_range", *names)
    return {k: d[k] for k in keys if k in d}


def build(d: dict[str, Any], **fields: Any) -> ViTConfig:
    """A ViTConfig from a family reader's fields; a bad field is one ConfigError naming it."""
    try:
        return ViTConfig(**fields, extra={k: v for k, v in d.items() if k not in fields})
    except TypeError as e:
        raise ConfigError(f"config.json of a {fields.get('model_type')} model has a field of the wrong type: {e}") \
            from None


# timm's VisionTransformer (vision_transformer.py) names -> ours; the same for every family, as timm builds
# them all from one class (DeiT's VisionTransformerDistilled adds dist_token and head_dist)
TIMM_RULES = [
    (r"^cls_token$", "vit.embeddings.cls_token"),
    (r"^dist_token$", "vit.embeddings.distillation_token"),
    (r"^reg_token$", "vit.embeddings.register_tokens"),
    (r"^pos_embed$", "vit.embeddings.position_embeddings"),
    (r"^patch_embed\.proj\.", "vit.embeddings.patch_embeddings.projection."),
    (r"^norm_pre\.", "vit.pre_layernorm."),
    (r"^norm\.", "vit.layernorm."),
    (r"^head\.", "classifier."),
    (r"^head_dist\.", "distillation_classifier."),
    (r"^blocks\.(\d+)\.norm1\.", r"vit.encoder.layer.\1.layernorm_before."),
    (r"^blocks\.(\d+)\.norm2\.", r"vit.encoder.layer.\1.layernorm_after."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"vit.encoder.layer.\1.attention.output.dense."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"vit.encoder.layer.\1.intermediate.dense."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"vit.encoder.layer.\1.output.dense."),
    (r"^blocks\.(\d+)\.ls([12])\.gamma$", r"vit.encoder.layer.\1.layer_scale\2.lambda1"),
    # SigLIP's attention pooling (timm AttentionPoolLatent): latent probe, q, fused kv, proj, norm, mlp
    (r"^attn_pool\.latent$", "head.probe"),
    (r"^attn_pool\.q\.", "head.attention.attention.query."),
    (r"^attn_pool\.k\.", "head.attention.attention.key."),
    (r"^attn_pool\.v\.", "head.attention.attention.value."),
    (r"^attn_pool\.proj\.", "head.attention.output.dense."),
    (r"^attn_pool\.norm\.", "head.layernorm."),
    (r"^attn_pool\.mlp\.", "head.mlp."),
]


# timm's heads for each size name of its VisionTransformer variants (vision_transformer.py, deit.py)
TIMM_HEADS = {"xsmall": 4, "tiny": 3, "small": 6, "medium": 8, "betwixt": 10, "base": 12, "large": 16, "huge": 16,
              "giant": 16, "gigantic": 16, "so400m": 16}


def timm_projection(state: StateDict) -> StateDict:
    """timm's image-text CLIP keeps the projection as its ``head`` (our ``classifier`` after timm_keys) with a
    zero bias (timm's conversion writes zeros): ours is ``visual_projection``, without bias."""
    if "classifier.weight" not in state:
        return state
    out = dict(state)
    bias = out.pop("classifier.bias", None)
    if bias is not None and bool(bias.any()):
        raise ConfigError("the timm CLIP's head has a nonzero bias, so it is a classifier, not CLIP's projection "
                          "(which has none): load it with --task classification")
    out["visual_projection.weight"] = out.pop("classifier.weight")
    return out


def timm_keys(state: StateDict) -> StateDict:
    """timm ``VisionTransformer`` keys -> ours: the fused ``qkv`` split into query, key and value; the pooling
    head's ``kv`` into key and value; SwiGLU's ``fc1_g``/``fc1_x`` (gate, then up) stacked into one Linear, as
    our SwiGLU (and timm's packed one) reads it; and a position table without the prefix tokens' rows
    (timm's ``no_embed_class``: DINOv2 with registers) given zero rows for them, which adds nothing."""
    state = split_qkv(state, r"^blocks\.(?P<i>\d+)\.attn\.qkv\.(?P<kind>weight|bias)$",
                      "vit.encoder.layer.{i}.attention.attention.{part}")
    out: StateDict = {}
    for key, value in state.items():
        if m := re.match(r"^attn_pool\.kv\.(weight|bias)$", key):
            k, v = value.chunk(2, dim=0)  # timm's order: key, then value
            out[f"attn_pool.k.{m.group(1)}"], out[f"attn_pool.v.{m.group(1)}"] = k, v  # renamed below
        elif re.match(r"^blocks\.\d+\.mlp\.fc1_x\.", key) and key.replace("fc1_x", "fc1_g") in state:
            continue  # stacked under its fc1_g below
        elif m := re.match(r"^blocks\.(\d+)\.mlp\.fc1_g\.(weight|bias)$", key):
            up = state.get(key.replace("fc1_g", "fc1_x"))
            if up is None:  # left as is: the strict load names it
                out[key] = value
                continue
            out[f"vit.encoder.layer.{m.group(1)}.intermediate.dense.{m.group(2)}"] = _cat(value, up)
        else:
            out[key] = value
    out = rename(out, TIMM_RULES)
    prefix = sum(k in state for k in ("cls_token", "dist_token"))
    positions = out.get("vit.embeddings.position_embeddings")
    if prefix and positions is not None and math.isqrt(positions.shape[1]) ** 2 == positions.shape[1]:
        zeros = positions.new_zeros((positions.shape[0], prefix, positions.shape[2]))
        out["vit.embeddings.position_embeddings"] = _cat(zeros, positions, dim=1)
    return out


def _cat(first: Any, second: Any, dim: int = 0) -> Any:
    import torch  # only when a key map runs (the registry imports without torch)

    return torch.cat([first, second], dim=dim)
