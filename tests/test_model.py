"""Our model against HF transformers on the same weights and inputs (loaded through saved files)."""

import pytest
import torch

from vitdeploy import load_model
from vitdeploy.config import ViTConfig
from vitdeploy.model import PatchEmbeddings, ViTForImageClassification

from .conftest import PARITY_CONFIGS


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_logits_equal_hf(hf_folders, name):
    import transformers

    ours = load_model(hf_folders[name])
    theirs = transformers.ViTForImageClassification.from_pretrained(hf_folders[name]).eval()
    h, w = ours.config.image_hw
    x = torch.randn(3, 3, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x), theirs(x).logits
    assert a.shape == (3, PARITY_CONFIGS[name]["num_labels"])
    assert (a - b).abs().max().item() < 1e-4
    assert b.abs().max().item() > 0.1  # the comparison is not between two near-zero tensors


def test_state_dict_keys_are_hf_checkpoint_keys(hf_folders):
    from safetensors.torch import load_file

    folder = hf_folders["p16-w48"]
    theirs = set(load_file(folder / "model.safetensors"))
    ours = set(ViTForImageClassification(ViTConfig.from_json_file(folder / "config.json")).state_dict())
    assert ours == theirs
    assert "vit.encoder.layer.0.attention.attention.query.weight" in ours


def test_init_follows_initializer_range():
    torch.manual_seed(0)
    m = ViTForImageClassification(ViTConfig(hidden_size=256, num_attention_heads=4, intermediate_size=512,
                                            num_hidden_layers=1, initializer_range=0.05))
    w = m.vit.encoder.layer[0].intermediate.dense.weight
    assert abs(w.std().item() - 0.05 * 0.88) < 0.005  # trunc-normal at +-2 std has std 0.88 sigma
    assert m.vit.encoder.layer[0].intermediate.dense.bias.abs().max() == 0
    assert torch.equal(m.vit.layernorm.weight, torch.ones(256))


def test_patch_embeddings_size_check():
    pe = PatchEmbeddings(ViTConfig(hidden_size=32, num_attention_heads=2))
    with pytest.raises(ValueError, match=r"^Input image size \(200\*224\) doesn't match model \(224\*224\)\.$"):
        pe(torch.zeros(1, 3, 200, 224))


def test_sdpa_path_matches_explicit_attention(tiny_checkpoint):
    m = load_model(tiny_checkpoint)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        a = m(x)
        m.set_sdpa(True)
        b = m(x)
    assert (a - b).abs().max().item() < 1e-5


@pytest.mark.parametrize("sdpa", [False, True])
def test_cls_only_last_block_is_row_zero_of_the_full_pass(hf_folders, sdpa):
    """The classifier's last block computes [CLS] alone: the same numbers as HF's full pass, row 0."""
    import transformers

    name = next(iter(PARITY_CONFIGS))
    ours = load_model(hf_folders[name])
    ours.set_sdpa(sdpa)
    theirs = transformers.ViTModel.from_pretrained(hf_folders[name], add_pooling_layer=False).eval()
    h, w = ours.config.image_hw
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, cls = ours.vit(x), ours.vit(x, cls_only=True)
        hf = theirs(x).last_hidden_state
    assert full.shape == hf.shape and cls.shape == (2, 1, ours.config.hidden_size)
    assert (full - hf).abs().max().item() < 1e-4
    assert (cls[:, 0] - full[:, 0]).abs().max().item() < 1e-5
