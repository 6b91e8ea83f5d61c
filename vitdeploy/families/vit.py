"""ViT (HF ``vit``; timm ``vit_*_patch{16,32}_224``): the shared blocks with their defaults."""

from __future__ import annotations

from typing import Any

from vitdeploy.config import ViTConfig
from vitdeploy.families.base import Family, StateDict, timm_keys


def config_from_hf(d: dict[str, Any]) -> ViTConfig:
    return ViTConfig.from_fields(d)


def hf_keys(state: StateDict) -> StateDict:
    return dict(state)  # our names are HF ViT's


FAMILY = Family(
    name="vit", model_types=("vit",), config_from_hf=config_from_hf, hf_keys=hf_keys,
    detect=lambda state: any(k.startswith("vit.") for k in state),
    timm_keys=timm_keys, timm_config={"layer_norm_eps": 1e-6},
    timm_architectures=("vit_{size}_patch{n}_{n}", "deit_{size}_patch{n}_{n}"),  # DeiT without its token: a ViT
)
