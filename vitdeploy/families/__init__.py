"""The ViT family: one registration per family (vit, deit, dinov2, clip, siglip), looked up by HF model_type.

Adding the next family is one module here and its tests: its config reader, key map, presets and
preprocessing defaults (see ``base.Family``); the model's blocks take the options it sets.
"""

from __future__ import annotations

import re
from typing import Any

from vitdeploy.config import ViTConfig
from vitdeploy.errors import ConfigError
from vitdeploy.families import clip, deit, dinov2, siglip, vit
from vitdeploy.families.base import EMBEDDING_KEYS, HEAD_KEYS, Family, StateDict, timm_projection

FAMILIES: tuple[Family, ...] = (vit.FAMILY, deit.FAMILY, dinov2.FAMILY, clip.FAMILY, siglip.FAMILY)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_BY_TYPE)


def family_for(model_type: Any) -> Family:
    """The family that reads ``model_type``; one ConfigError naming it and the supported list otherwise."""
    family = _BY_TYPE.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise ConfigError(f"model_type {model_type!r} is not supported: vitdeploy reads "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return family


def config_from_hf(d: dict[str, Any]) -> ViTConfig:
    """An HF ``config.json`` of any supported family as a ViTConfig."""
    return family_for(d.get("model_type", "vit")).config_from_hf(d)


def hf_to_ours(state: StateDict, config: ViTConfig) -> StateDict:
    """An HF checkpoint's state dict in our names, for ``config``'s family and task (an embedding model
    reads past a classifier checkpoint's heads; a classifier past SigLIP's pooling head, as HF's does)."""
    return _for_task(family_for(config.model_type).hf_keys(state), config)


def timm_to_ours(state: StateDict, config: ViTConfig) -> tuple[StateDict, ViTConfig]:
    """timm weights of ``config``'s family in our names, and the config with what timm's variants of the
    family set differently from HF's (its LayerNorm eps, activation, classifier input: a timm classifier with
    an attention-pooling head reads its output). With a projection (CLIP), timm's ``head`` is that projection."""
    family = family_for(config.model_type)
    if family.timm_keys is None:
        raise ConfigError(f"timm weights of a {config.model_type} model are not supported: load its Hugging Face "
                          "checkpoint instead")
    config = config.replace(**family.timm_config)
    if config.task == "classification" and "attn_pool.latent" in state:
        config = config.replace(classifier_input="map")
    ours = family.timm_keys(state)
    if config.task == "embedding" and config.projection_dim:
        ours = timm_projection(ours)
    return _for_task(ours, config), config


def family_for_timm(architecture: str) -> tuple[Family, str] | None:
    """The family of a timm architecture name (``vit_base_patch14_dinov2``, a ``.tag`` dropped) and its size
    name (``base``); None for a name no family registers."""
    for family in reversed(FAMILIES):  # the most specific first (ViT's plain names last)
        for pattern in family.timm_architectures:
            regex = re.escape(pattern).replace(r"\{size\}", "(?P<size>[a-z0-9]+)").replace(r"\{n\}", r"\d+")
            if m := re.fullmatch(regex, architecture.split(".")[0]):
                return family, m.group("size")
    return None


def timm_architectures() -> str:
    """The timm architecture names vitdeploy reads, for an error message."""
    return ", ".join(p.replace("{size}", "*").replace("{n}", "N") for f in FAMILIES for p in f.timm_architectures)


def _for_task(state: StateDict, config: ViTConfig) -> StateDict:
    if config.task == "embedding":
        unused = HEAD_KEYS
    else:  # a classifier reading the attention-pooling head keeps it
        unused = re.compile(r"^visual_projection\.") if config.pooling_head else EMBEDDING_KEYS
    return {k: v for k, v in state.items() if not unused.match(k)}


def detect_family(state: StateDict) -> Family | None:
    """The family whose HF names a state dict has (for a weights file given without a config)."""
    for family in reversed(FAMILIES):  # the most specific first
        if family.detect(state):
            return family
    return None


def preset_names() -> tuple[str, ...]:
    return tuple(name for f in FAMILIES for name in f.presets)


def family_preset(name: str, **overrides: Any) -> ViTConfig | None:
    """A family member's preset (random init at its real size), or None for an unknown name."""
    for family in FAMILIES:
        if name in family.presets:
            config = family.presets[name]()
            return config.replace(**overrides) if overrides else config
    return None
