"""A timm folder's config.json (what timm's ``save_for_hf``/``push_to_hf_hub`` write: ``architecture``,
``num_classes``, ``pretrained_cfg``, maybe ``model_args`` and ``label_names``) with its weights' shapes, read
as the ViTConfig of the family its architecture names.

timm builds every family from one ``VisionTransformer`` whose arguments each architecture's function sets, and
``model_args`` holds only those a user changed. So the family and the heads come from the name (``base``: 12),
the widths, depth, patch, tokens, LayerScale, SwiGLU, pre-norm and head from the tensors, and preprocessing
from ``pretrained_cfg``. No torch here: only tensors' shapes are read.
"""

from __future__ import annotations

import math
import re
from typing import Any

from vitdeploy.config import ViTConfig, to_2tuple
from vitdeploy.errors import ConfigError
from vitdeploy.families import family_for_timm, timm_architectures
from vitdeploy.families.base import TIMM_HEADS, Family, StateDict

# model_args the weights' shapes or this reader account for; any other changes timm's model beyond them
_MODEL_ARGS = frozenset({"img_size", "num_classes", "in_chans", "global_pool", "embed_dim", "depth", "num_heads",
                         "mlp_ratio", "patch_size", "qkv_bias", "init_values", "reg_tokens", "class_token",
                         "no_embed_class", "pre_norm", "dynamic_img_size", "weight_init"})
# a CLIP tag that names a fine-tune (laion2b_ft_in12k_in1k, openai_ft_in1k): its head is a classifier; any
# other (openai, laion2b, datacompxl, ...) is image-text pretraining, whose head is the projection
_FINE_TUNED = re.compile(r"(^|_)(ft|in1k|in12k|in21k|in22k)(_|$)")
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def timm_folder_config(d: dict[str, Any], state: StateDict) -> ViTConfig:
    """The ViTConfig of a timm folder: its config.json ``d`` (untrusted) and its state dict (timm's names)."""
    arch = d.get("architecture")
    found = family_for_timm(arch) if isinstance(arch, str) else None
    if found is None:
        raise ConfigError(f"timm architecture {str(arch)[:80]!r} is not one vitdeploy reads ({timm_architectures()}):"
                          " pass --config or --preset")
    family, size = found
    args = d.get("model_args") or {}
    if not isinstance(args, dict):
        raise ConfigError("timm config's model_args is not an object")
    unknown = sorted(set(args) - _MODEL_ARGS)
    if unknown:
        raise ConfigError(f"timm config's model_args {', '.join(unknown)[:80]} change {arch} beyond what its weights "
                          "show; vitdeploy does not read them: pass --config")
    fields = timm_preprocessing(d.get("pretrained_cfg") or {})
    if "patch_embed.proj.weight" not in state or "blocks.0.mlp.fc2.weight" not in state:
        raise ConfigError(f"the weights beside a timm {arch} config.json are not timm's VisionTransformer names "
                          "(no patch_embed.proj or blocks.0.mlp)")
    fields.update(_blocks(state, _heads(family, size, args, arch)))
    fields.update(_positions(state, fields.pop("input_size", None), fields["patch_size"], family))
    fields.update(_head(d, state, family, arch, args))
    fields["resize_size"] = _resize(fields, fields.pop("squash"))
    registers = fields["num_register_tokens"] and "dinov2_with_registers" in family.model_types
    base = family.config_from_hf({"model_type": "dinov2_with_registers" if registers else family.model_types[0]})
    return base.replace(**fields, hidden_act="quick_gelu" if "_quickgelu_" in arch else "gelu")


def timm_preprocessing(pcfg: Any) -> dict[str, Any]:
    """ViTConfig's preprocessing fields from timm's ``pretrained_cfg`` (mean, std, crop_pct, interpolation; its
    ``input_size`` and whether crop_mode is ``squash``), each validated; absent ones are left to the family."""
    if not isinstance(pcfg, dict):
        raise ConfigError("timm config's pretrained_cfg is not an object")
    out: dict[str, Any] = {}
    for key, field in (("mean", "image_mean"), ("std", "image_std")):
        if key in pcfg:
            if not (isinstance(pcfg[key], list) and all(type(v) in (int, float) for v in pcfg[key])):
                raise ConfigError(f"timm config's pretrained_cfg {key} {str(pcfg[key])[:40]} is not a list of numbers")
            out[field] = tuple(pcfg[key])
    if pcfg.get("crop_pct"):
        if type(pcfg["crop_pct"]) not in (int, float):
            raise ConfigError(f"timm config's pretrained_cfg crop_pct {str(pcfg['crop_pct'])[:40]!r} is not a number")
        out["crop_pct"] = float(pcfg["crop_pct"])
    if pcfg.get("interpolation") in _INTERPOLATIONS:
        out["interpolation"] = pcfg["interpolation"]
    size = pcfg.get("input_size")
    if size is not None:
        if not (isinstance(size, list) and len(size) == 3 and all(type(v) is int and v > 0 for v in size)):
            raise ConfigError(f"timm config's pretrained_cfg input_size {str(size)[:40]} is not [channels, height, "
                              "width]")
        out["input_size"] = (size[1], size[2])
    mode = pcfg.get("crop_mode", "center")
    if mode not in ("center", "squash"):
        raise ConfigError(f"timm config's pretrained_cfg crop_mode {str(mode)[:40]!r} is not one vitdeploy's "
                          "preprocessing makes (center, squash)")
    out["squash"] = mode == "squash"
    return out


def _resize(fields: dict[str, Any], squash: bool) -> tuple[int, int] | None:
    """timm's ``center`` crop_mode: the shorter side to size / crop_pct, then the crop (crop_pct's rule, no
    resize_size); ``squash``: both sides to size / crop_pct, the aspect ratio not kept, then the crop."""
    if not squash:
        return None
    (height, width), crop = to_2tuple(fields["image_size"]), fields.get("crop_pct") or 1.0
    return math.floor(height / crop), math.floor(width / crop)


def _heads(family: Family, size: str, args: dict[str, Any], arch: str) -> int:
    heads = {**TIMM_HEADS, **family.timm_heads}.get(size)
    if heads is None:
        raise ConfigError(f"timm architecture {arch}: its size {size!r} is not one vitdeploy knows the heads of "
                          f"({', '.join(TIMM_HEADS)}): pass --config")
    value = args.get("num_heads", heads)
    if type(value) is not int or value <= 0:
        raise ConfigError(f"timm config's model_args num_heads {str(value)[:20]!r} is not a positive integer")
    return value


def _blocks(state: StateDict, heads: int) -> dict[str, Any]:
    """The blocks' options from the tensors: widths, depth, patch, tokens, LayerScale, SwiGLU, pre-norm."""
    patch = state["patch_embed.proj.weight"]
    width = int(state["blocks.0.mlp.fc2.weight"].shape[1])
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    registers = state.get("reg_token")
    return {
        "hidden_size": int(patch.shape[0]), "num_channels": int(patch.shape[1]),
        "patch_size": (int(patch.shape[2]), int(patch.shape[3])), "num_attention_heads": heads,
        "num_hidden_layers": len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
        "intermediate_size": width,  # SwiGLU: packed (one fc1 of twice the width) or unpacked (fc1_g, fc1_x)
        "use_swiglu_ffn": "blocks.0.mlp.fc1_g.weight" in state or (fc1 is not None and fc1.shape[0] == 2 * width),
        "layerscale_value": 1.0 if "blocks.0.ls1.gamma" in state else None,
        "num_register_tokens": int(registers.shape[1]) if registers is not None else 0,
        "class_token": "cls_token" in state, "distillation_token": "dist_token" in state,
        "pre_norm": "norm_pre.weight" in state, "patch_bias": "patch_embed.proj.bias" in state,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state, "pooling": "map" if "attn_pool.latent" in state else "cls",
    }


def _positions(state: StateDict, size: tuple[int, int] | None, patch: tuple[int, int],
               family: Family) -> dict[str, Any]:
    """The input size (``pretrained_cfg``'s, else the position table's) and, where it differs from the table's
    grid (a DINOv2 only), that grid. timm's table has rows for [CLS] and DeiT's token unless ``no_embed_class``."""
    rows = int(state["pos_embed"].shape[1]) if "pos_embed" in state else 0
    with_position = sum(k in state for k in ("cls_token", "dist_token"))
    side = math.isqrt(rows) if math.isqrt(rows) ** 2 == rows else math.isqrt(max(rows - with_position, 0))
    if side == 0 or side * side not in (rows, rows - with_position):
        raise ConfigError(f"timm pos_embed has {rows} rows: not a square grid of patches (with {with_position} "
                          "token rows or none)")
    trained = (side * patch[0], side * patch[1])
    size = to_2tuple(size) if size is not None else trained
    if size == trained:
        return {"image_size": trained, "position_grid": None}
    if not family.resizes_positions:
        raise ConfigError(f"timm config's input_size {size} is not the {trained} its position table was made for: "
                          "only DINOv2 interpolates positions")
    return {"image_size": size, "position_grid": (side, side)}


def _head(d: dict[str, Any], state: StateDict, family: Family, arch: str, args: dict[str, Any]) -> dict[str, Any]:
    """The task and head: timm's ``head`` a classifier (of [CLS], DeiT's two tokens or the pooling head's output)
    or, for an image-text CLIP tag, the projection; no head: the embedding."""
    pool = d.get("global_pool", args.get("global_pool"))
    expected = "map" if "attn_pool.latent" in state else "token"
    if pool not in (None, expected):
        raise ConfigError(f"timm global_pool {str(pool)[:20]!r} of {arch} is not one vitdeploy reads ({expected} for "
                          "this model)")
    classifier_input = ("map" if expected == "map" else "cls_distilled" if "dist_token" in state else "cls")
    head = state.get("head.weight")
    if head is None:
        if "dist_token" in state:
            raise ConfigError(f"timm {arch} without its heads averages [CLS] and the distillation token, an "
                              "embedding vitdeploy does not make: load it with its classifier")
        return {"task": "embedding", "projection_dim": 0, "classifier_input": classifier_input}
    labels = int(head.shape[0])
    fields: dict[str, Any] = {"num_labels": labels, "classifier_input": classifier_input, "projection_dim": 0}
    tag = str((d.get("pretrained_cfg") or {}).get("tag") or arch.partition(".")[2])
    if family.name == "clip" and tag and not _FINE_TUNED.search(tag):
        return {**fields, "task": "embedding", "projection_dim": labels}
    names = d.get("label_names")
    if isinstance(names, list) and len(names) == labels and all(isinstance(n, str) for n in names):
        fields["id2label"] = dict(enumerate(names))
    return {**fields, "task": "classification"}
