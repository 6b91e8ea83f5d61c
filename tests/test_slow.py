"""ViT-B-sized checks (python -m pytest -m slow): parity with HF and every precision's export."""

import pytest
import torch

pytestmark = pytest.mark.slow


def test_vit_base_parity_with_hf(tmp_path):
    import transformers

    from vitdeploy import load_model

    from .conftest import hf_reference

    ref = hf_reference({"num_labels": 1000}, seed=0)  # transformers' defaults: ViT-B/16 at 224
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        theirs = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()(x).logits
        assert (ours(x) - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_vit_base_exports(tmp_path, digits, precision):
    from vitdeploy.exporters import ExportOptions, export_onnx

    report = export_onnx("vit-base-patch16-224", tmp_path / "b.onnx", options=ExportOptions(
        dynamic_batch=True, precision=precision, calib_dir=digits["train"] if precision == "int8" else None,
        calib_samples=32, seed=0))
    assert report.op_histogram["LayerNormalization"] == 25 and report.op_histogram["Softmax"] == 12
    assert report.verification.cosine > 0.98
