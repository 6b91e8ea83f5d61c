"""DINOv2 (HF ``dinov2`` and ``dinov2_with_registers``): patch 14, LayerScale on both residual branches,
SwiGLU in the giant size, optional register tokens after [CLS] (without positions), and position
embeddings trained at 518 (37x37) that are interpolated bicubically to the input grid, in float32 as HF
does, once (vitdeploy.model bakes the table, so no Resize reaches the graph).
``Dinov2ForImageClassification`` classifies [CLS] concatenated with the mean of the patch tokens; the
embedding is [CLS] after the final LayerNorm (HF's ``pooler_output``)."""

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

DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "hidden_act": "gelu",
            "layer_norm_eps": 1e-6, "patch_size": 14, "mlp_ratio": 4, "image_size": 518, "layerscale_value": 1.0,
            "use_swiglu_ffn": False}
# BitImageProcessor: shortest edge 256, a 224 centre crop, bicubic, ImageNet mean/std
PREPROCESSING = {"image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "crop_pct": 0.875,
                 "interpolation": "bicubic"}
INPUT_SIZE = 224  # the input a DINOv2 checkpoint is exported at unless told (its processor's crop)


def mlp_width(hidden: int, mlp_ratio: float, swiglu: bool) -> int:
    """HF's MLP hidden width; SwiGLU keeps two thirds of it, rounded up to a multiple of 8."""
    width = int(hidden * mlp_ratio)
    return (int(width * 2 / 3) + 7) // 8 * 8 if swiglu else width


def config_from_hf(d: dict[str, Any]) -> ViTConfig:
    merged = {**DEFAULTS, **d}
    patch = to_2tuple(merged["patch_size"])
    trained = to_2tuple(merged["image_size"])
    grid = (trained[0] // patch[0], trained[1] // patch[1])
    # the input: 224 for a checkpoint trained larger (its processor's crop), else what it was trained at
    size = trained if max(trained) <= INPUT_SIZE else (INPUT_SIZE, INPUT_SIZE)
    if size[0] % patch[0] or size[1] % patch[1]:
        size = (size[0] // patch[0] * patch[0], size[1] // patch[1] * patch[1])
    swiglu = bool(merged["use_swiglu_ffn"])
    return build(
        d, **{**PREPROCESSING, **hf_common(merged), **hf_labels(d)}, model_type=str(d.get("model_type", "dinov2")),
        intermediate_size=mlp_width(merged["hidden_size"], merged["mlp_ratio"], swiglu), use_swiglu_ffn=swiglu,
        image_size=size, position_grid=grid, layerscale_value=float(merged["layerscale_value"]),
        num_register_tokens=int(d.get("num_register_tokens", 4 if d.get("model_type") == "dinov2_with_registers"
                                      else 0)),
        task=hf_task(d), classifier_input="cls_patch_mean",
        # HF resizes dinov2_with_registers' positions with antialias=True, dinov2's without
        position_antialias=d.get("model_type") == "dinov2_with_registers")


def hf_keys(state: StateDict) -> StateDict:
    state = rename(state, [(r"^(dinov2_with_registers|dinov2)\.", "")], drop=(r"embeddings\.mask_token$",))
    layer = r"^encoder\.layer\.(\d+)\."
    rules = [
        (r"^embeddings\.", "vit.embeddings."),
        (r"^layernorm\.", "vit.layernorm."),
        (layer + r"norm1\.", r"vit.encoder.layer.\1.layernorm_before."),
        (layer + r"norm2\.", r"vit.encoder.layer.\1.layernorm_after."),
        (layer + r"mlp\.(fc1|weights_in)\.", r"vit.encoder.layer.\1.intermediate.dense."),
        (layer + r"mlp\.(fc2|weights_out)\.", r"vit.encoder.layer.\1.output.dense."),
        (r"^encoder\.", "vit.encoder."),
    ]
    return rename(state, rules)


def _preset(hidden: int, layers: int, heads: int, registers: int = 0, swiglu: bool = False) -> ViTConfig:
    return config_from_hf({"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                           "use_swiglu_ffn": swiglu, "num_register_tokens": registers,
                           "model_type": "dinov2_with_registers" if registers else "dinov2"})


FAMILY = Family(
    name="dinov2", model_types=("dinov2", "dinov2_with_registers"), config_from_hf=config_from_hf,
    hf_keys=hf_keys, resizes_positions=True,
    presets={"dinov2-small": lambda: _preset(384, 12, 6), "dinov2-base": lambda: _preset(768, 12, 12),
             "dinov2-large": lambda: _preset(1024, 24, 16), "dinov2-giant": lambda: _preset(1536, 40, 24, swiglu=True),
             "dinov2-with-registers-small": lambda: _preset(384, 12, 6, 4),
             "dinov2-with-registers-base": lambda: _preset(768, 12, 12, 4),
             "dinov2-with-registers-large": lambda: _preset(1024, 24, 16, 4),
             "dinov2-test": lambda: _preset(32, 2, 2), "dinov2-with-registers-test": lambda: _preset(32, 2, 2, 4)},
    detect=lambda state: any(".layer_scale1." in k or k.startswith("dinov2") for k in state),
    timm_keys=timm_keys,  # timm's vit_*_patch14_dinov2 and *_reg4_dinov2: HF's eps, GELU and SwiGLU
    timm_architectures=("vit_{size}_patch{n}_dinov2", "vit_{size}_patch{n}_reg{n}_dinov2"), timm_heads={"giant": 24},
)
