import json

import pytest

from vitdeploy.config import PRESETS, ViTConfig, preset


def test_defaults_are_the_seeds():
    c = ViTConfig()
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (768, 12, 12, 3072)
    assert (c.hidden_act, c.hidden_dropout_prob, c.attention_probs_dropout_prob) == ("gelu", 0.0, 0.0)
    assert (c.initializer_range, c.layer_norm_eps, c.is_encoder_decoder) == (0.02, 1e-12, False)
    assert (c.image_size, c.patch_size, c.num_channels) == (224, 16, 3)
    assert preset("vit-base-patch16-224") == c


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"hidden_size": 100, "num_attention_heads": 12}, "hidden_size"),
        ({"image_size": 225}, "image_size"),
        ({"patch_size": 0}, "patch_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"intermediate_size": -1}, "intermediate_size"),
        ({"crop_pct": 1.5}, "crop_pct"),
    ],
)
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ViTConfig(**kwargs)


def test_pairs_and_hf_json_round_trip(tmp_path):
    c = ViTConfig(image_size=(96, 64), patch_size=(32, 16), hidden_size=64, num_attention_heads=4,
                  id2label={0: "cat", 1: "dog"})
    assert c.num_patches == 3 * 4 and c.num_labels == 2
    c.save(tmp_path / "config.json")
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "vit" and raw["id2label"] == {"0": "cat", "1": "dog"}
    assert ViTConfig.from_json_file(tmp_path / "config.json") == c


def test_reads_hf_config_json(hf_folders):
    import transformers

    path = hf_folders["p32-w80-nobias"] / "config.json"
    ours = ViTConfig.from_json_file(path)
    theirs = transformers.ViTConfig.from_json_file(str(path))
    assert ours.hidden_size == theirs.hidden_size == 80
    assert ours.qkv_bias is False and ours.image_hw == (96, 64)
    assert ours.num_labels == theirs.num_labels == 5


def test_presets():
    assert len(PRESETS) == 10
    large = preset("vit-large-patch32-224")
    sizes = (large.hidden_size, large.num_hidden_layers, large.num_attention_heads, large.patch_size)
    assert sizes == (1024, 24, 16, 32)
    with pytest.raises(ValueError, match="unknown preset 'vit-giant"):
        preset("vit-giant-patch16-224")


@pytest.mark.parametrize("kwargs", [{}, {"patch_size": (8, 16), "image_size": (64, 96), "num_labels": 7}])
def test_flops_match_torch_flop_counter(kwargs):
    """The analytic count equals what torch's FlopCounterMode sees in a forward pass of our model."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vitdeploy.model import ViTForImageClassification

    cfg = ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
                    **{"image_size": 32, "patch_size": 8, "num_labels": 10, **kwargs})
    model = ViTForImageClassification(cfg).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(2, 3, *cfg.image_hw))
    assert counter.get_total_flops() == cfg.flops(batch=2)
    # HF transformers' own model (eager attention) does every row of the last block too
    import transformers

    theirs = transformers.ViTForImageClassification._from_config(
        transformers.ViTConfig(**cfg.to_dict()), attn_implementation="eager").eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        theirs(pixel_values=torch.zeros(2, 3, *cfg.image_hw))
    assert counter.get_total_flops() == cfg.flops(batch=2, full_last_layer=True)
    vit_b = preset("vit-base-patch16-224")
    assert vit_b.flops(full_last_layer=True) == 35_127_656_448  # 17.6 GMAC, as usually quoted
    assert vit_b.flops() == 32_696_930_304  # the last block computes [CLS] alone past K and V
