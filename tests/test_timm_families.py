"""timm weights of each family (timm's VisionTransformer names) load into our model with the same output as
timm's own model: DeiT distilled, DINOv2 (with registers, packed and unpacked SwiGLU), CLIP and SigLIP; with
a config given, and from timm folders (timm's save_for_hf) with none, exported through the CLI too.

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


# -- timm folders (timm's own save_for_hf: config.json + model.safetensors), loaded with no config ---------------
# name: (timm architecture with its tag, create_model arguments, our task, our output width)
FOLDERS: dict[str, tuple[str, dict[str, Any], str, int]] = {
    "deit_distilled": ("deit_tiny_distilled_patch16_224.fb_in1k", dict(img_size=32, num_classes=5, **TINY),
                       "classification", 5),
    "dinov2": ("vit_small_patch14_dinov2.lvd142m", dict(img_size=28, **TINY), "embedding", 32),
    "dinov2_classifier": ("vit_small_patch14_dinov2.lvd142m", dict(img_size=28, num_classes=3, **TINY),
                          "classification", 3),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2.lvd142m", dict(img_size=28, **TINY), "embedding", 32),
    "dinov2_giant_swiglu": ("vit_giant_patch14_dinov2.lvd142m", dict(img_size=28, **TINY), "embedding", 32),
    "clip_openai_projection": ("vit_base_patch16_clip_224.openai", dict(img_size=32, **TINY), "embedding", 512),
    "clip_laion2b_projection": ("vit_base_patch16_clip_224.laion2b", dict(img_size=32, **TINY), "embedding", 512),
    "clip_fine_tuned_classifier": ("vit_base_patch16_clip_224.laion2b_ft_in1k", dict(img_size=32, num_classes=5,
                                                                                     **TINY), "classification", 5),
    "clip_quickgelu_no_head": ("vit_base_patch16_clip_quickgelu_224.openai", dict(img_size=32, num_classes=0,
                                                                                  **TINY), "embedding", 32),
    "siglip": ("vit_base_patch16_siglip_224.webli", dict(img_size=32, num_classes=0, **TINY), "embedding", 32),
    "siglip_classifier": ("vit_base_patch16_siglip_224.webli", dict(img_size=32, num_classes=5, **TINY),
                          "classification", 5),
    "vit": ("vit_base_patch16_224.augreg_in21k_ft_in1k", dict(img_size=32, num_classes=5, **TINY),
            "classification", 5),
}


def _timm_folder(name: str, folder: Any, *, zero_projection_bias: bool = True) -> Any:
    """timm's model for FOLDERS[name], every parameter perturbed (an image-text CLIP's head bias left at the
    zeros timm's own conversion writes), saved as timm saves a folder for the Hub."""
    import torch
    from timm.models._hub import save_for_hf

    arch, kwargs, _, _ = FOLDERS[name]
    torch.manual_seed(0)
    theirs = timm.create_model(arch, pretrained=False, **kwargs).eval()
    keep = "head.bias" if zero_projection_bias and "projection" in name else None
    with torch.no_grad():
        for key, p in theirs.named_parameters():
            if key != keep:
                p.add_(torch.randn_like(p) * 0.05)
    save_for_hf(theirs, str(folder), safe_serialization=True)
    return theirs


@pytest.mark.parametrize("name", list(FOLDERS))
def test_timm_folder_loads_with_no_config_and_equals_timm(tmp_path, name):
    """A timm folder of every family loads with no --config/--preset: its family from the architecture, sizes
    from the weights, preprocessing from pretrained_cfg; our output equals timm's within 1e-4."""
    import json

    import torch

    from vitdeploy.checkpoints import resolve

    theirs = _timm_folder(name, tmp_path / "m")
    written = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "architecture" in written and "architectures" not in written  # timm's config.json, not HF's
    loaded = resolve(tmp_path / "m")
    ours, (_, _, task, width) = loaded.model, FOLDERS[name]
    assert loaded.kind == "timm" and (ours.config.task, ours.config.output_size) == (task, width)
    pcfg = written["pretrained_cfg"]
    assert ours.config.image_mean == tuple(pcfg["mean"]) and ours.config.crop_pct == pcfg["crop_pct"]
    h, w = ours.config.image_hw
    assert (3, h, w) == tuple(pcfg["input_size"])
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    assert got.shape == expected.shape == (2, width)
    assert (got - expected).abs().max().item() <= 1e-4, (got - expected).abs().max().item()
    assert expected.abs().max().item() > 0.1


@pytest.mark.parametrize("name", ["siglip_classifier", "clip_openai_projection"])
def test_export_of_a_timm_folder_equals_timm_on_onnx_runtime(tmp_path, name):
    """`vitdeploy export --model <timm folder>` (no config): ONNX Runtime's output equals timm's."""
    import numpy as np
    import torch
    from click.testing import CliRunner

    ort = pytest.importorskip("onnxruntime")
    from vitdeploy.artifacts.metadata import read_onnx_metadata
    from vitdeploy.cli import main

    theirs = _timm_folder(name, tmp_path / "m")
    out = tmp_path / "model.onnx"
    r = CliRunner().invoke(main, ["export", "--model", str(tmp_path / "m"), "--output", str(out)])
    assert r.exit_code == 0, r.output
    meta = read_onnx_metadata(out)
    assert (meta.task, meta.output_size) == FOLDERS[name][2:]
    x = np.random.default_rng(7).standard_normal((1, 3, 32, 32)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()
    assert np.abs(got - expected).max() <= 1e-4 and np.abs(expected).max() > 0.1


def test_timm_folders_vitdeploy_does_not_read_are_one_line(tmp_path):
    """An unknown architecture names itself and what is read; a CLIP projection head with a bias, and DeiT's
    head-less token average, are refused saying why (the first loads as a classifier with --task)."""
    import json

    from vitdeploy import load_model
    from vitdeploy.errors import CheckpointError, VitDeployError

    _timm_folder("siglip", tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    (tmp_path / "s" / "config.json").write_text(json.dumps({**cfg, "architecture": "vit_base_patch16_siglip_gap_224"}))
    with pytest.raises(CheckpointError, match=r"'vit_base_patch16_siglip_gap_224' is not one vitdeploy reads "
                                              r"\(vit_\*_patchN_N, .*vit_\*_patchN_siglip_N\): pass --config"):
        load_model(tmp_path / "s")
    _timm_folder("clip_openai_projection", tmp_path / "c", zero_projection_bias=False)
    with pytest.raises(VitDeployError, match="nonzero bias, so it is a classifier, not CLIP's projection"):
        load_model(tmp_path / "c")
    assert load_model(tmp_path / "c", task="classification").config.output_size == 512
    FOLDERS["deit_headless"] = ("deit_tiny_distilled_patch16_224", dict(img_size=32, num_classes=0, **TINY), "", 0)
    try:
        _timm_folder("deit_headless", tmp_path / "d")
    finally:
        del FOLDERS["deit_headless"]
    with pytest.raises(CheckpointError, match="averages \\[CLS\\] and the distillation token"):
        load_model(tmp_path / "d")
