"""timm weights of each family (timm's VisionTransformer names) load into our model with the same output as
timm's own model: DeiT distilled, DINOv2 (with registers, packed and unpacked SwiGLU), CLIP and SigLIP.

timm needs a torch newer than this project's venv pins, so these run where timm imports (a venv of their
own: torch 2.14.1, torchvision 0.29.1, timm) and skip, saying so, elsewhere.
"""

from __future__ import annotations

from typing import Any

import pytest

timm = pytest.importorskip("timm", reason="timm is not installed here (it needs torch >= 2.14): the timm "
                                           "parity of the family key maps is checked in a venv with timm")
pytestmark = pytest.mark.timm

TINY = dict(embed_dim=32, depth=2, num_heads=2)
HF_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)


def _swiglu_vit() -> Any:
    """A DINOv2-shaped ViT with timm's unpacked SwiGLU (``mlp.fc1_g`` and ``mlp.fc1_x``)."""
    from timm.layers import SwiGLU
    from timm.models.vision_transformer import VisionTransformer
    from torch import nn

    return VisionTransformer(img_size=28, patch_size=14, mlp_ratio=2.0, mlp_layer=SwiGLU, act_layer=nn.SiLU,
                             init_values=1e-5, num_classes=0, **TINY)


def _cases() -> dict[str, tuple[Any, dict[str, Any], dict[str, Any]]]:
    """name: (the timm model's maker, the HF config.json fields our config is read from, overrides)."""
    deit = {**HF_TINY, "model_type": "deit", "intermediate_size": 128, "image_size": 32, "patch_size": 16,
            "num_labels": 5, "architectures": ["DeiTForImageClassificationWithTeacher"]}
    dino = {**HF_TINY, "model_type": "dinov2", "mlp_ratio": 4, "image_size": 28, "patch_size": 14}
    clip = {**HF_TINY, "model_type": "clip_vision_model", "intermediate_size": 128, "image_size": 32,
            "patch_size": 16}
    siglip = {**HF_TINY, "model_type": "siglip_vision_model", "intermediate_size": 128, "image_size": 32,
              "patch_size": 16}
    create = timm.create_model
    return {
        "deit_distilled": (lambda: create("deit_tiny_distilled_patch16_224", img_size=32, num_classes=5, **TINY),
                           deit, {}),
        "dinov2": (lambda: create("vit_small_patch14_dinov2", img_size=28, num_classes=0, **TINY), dino, {}),
        "dinov2_reg4": (lambda: create("vit_small_patch14_reg4_dinov2", img_size=28, num_classes=0, **TINY),
                        {**dino, "model_type": "dinov2_with_registers", "num_register_tokens": 4}, {}),
        "dinov2_swiglu_packed": (lambda: create("vit_giant_patch14_dinov2", img_size=28, num_classes=0, **TINY),
                                 {**dino, "use_swiglu_ffn": True}, {"intermediate_size": 85}),
        "swiglu_unpacked": (_swiglu_vit, {**dino, "use_swiglu_ffn": True}, {"intermediate_size": 64}),
        "clip_classifier": (lambda: create("vit_base_patch16_clip_224", img_size=32, num_classes=5, **TINY),
                            {**clip, "architectures": ["CLIPForImageClassification"], "num_labels": 5},
                            {"hidden_act": "gelu"}),
        "clip_quickgelu": (lambda: create("vit_base_patch16_clip_quickgelu_224", img_size=32, num_classes=0,
                                          **TINY), {**clip, "architectures": ["CLIPVisionModel"]}, {}),
        "siglip": (lambda: create("vit_base_patch16_siglip_224", img_size=32, num_classes=0, **TINY), siglip, {}),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_timm_weights_of_each_family_equal_timm(tmp_path, name):
    import torch
    from safetensors.torch import save_file

    from vitdeploy import load_model
    from vitdeploy.config import ViTConfig

    make, fields, overrides = _cases()[name]
    torch.manual_seed(0)
    theirs = make().eval()
    with torch.no_grad():  # every parameter away from its init value (LayerScale's 1e-5, zero tokens)
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(path))
    config = ViTConfig.from_dict(fields).replace(**overrides)
    ours = load_model(path, config=config)
    h, w = ours.config.image_hw
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    assert got.shape == expected.shape == (2, ours.config.output_size)
    assert (got - expected).abs().max().item() <= 1e-4, (got - expected).abs().max().item()
    assert expected.abs().max().item() > 0.1
