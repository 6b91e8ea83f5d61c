"""Every checkpoint source against HF transformers' logits; and the errors a user sees."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from vitdeploy import load_model, save_model
from vitdeploy.checkpoints import resolve
from vitdeploy.errors import CheckpointError

from .conftest import PARITY_CONFIGS, hf_reference, to_timm_state


def _hf_logits(folder, x):
    import transformers

    with torch.no_grad():
        return transformers.ViTForImageClassification.from_pretrained(folder).eval()(x).logits


def _x(model, n=2):
    h, w = model.config.image_hw
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(3))


def test_preset_random_init_is_seedable():
    a = load_model("vit-tiny-patch32-224", seed=1)
    b = load_model("vit-tiny-patch32-224", seed=1)
    c = load_model("vit-tiny-patch32-224", seed=2)
    assert not a.training and a.config.hidden_size == 192
    ka = a.state_dict()["classifier.weight"]
    assert torch.equal(ka, b.state_dict()["classifier.weight"])
    assert not torch.equal(ka, c.state_dict()["classifier.weight"])


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_timm_weights_match_hf_with_timm_eps(tmp_path, fmt):
    """timm layout (fused qkv, eps 1e-6) -> our model == HF's model built with eps 1e-6."""
    kw = PARITY_CONFIGS["p16-w48"]
    ref = hf_reference(kw, seed=4, layer_norm_eps=1e-6)
    ref.save_pretrained(tmp_path / "hf")
    timm_state = to_timm_state(load_file(tmp_path / "hf" / "model.safetensors"))
    path = tmp_path / f"timm.{fmt}"
    if fmt == "safetensors":
        save_file(timm_state, path)
    else:
        torch.save({"state_dict": timm_state}, path)
    cfg = load_model(tmp_path / "hf").config  # architecture only; eps comes from the timm layout
    ours = load_model(path, config=cfg.replace(layer_norm_eps=1e-12))
    assert ours.config.layer_norm_eps == 1e-6
    x = _x(ours)
    assert (ours(x) - _hf_logits(tmp_path / "hf", x)).abs().max().item() < 1e-4


def test_own_checkpoint_round_trip(tmp_path, hf_folders):
    m = load_model(hf_folders["p32-w80-nobias"])
    save_model(m, tmp_path / "mine.safetensors")
    back = resolve(tmp_path / "mine.safetensors")
    assert back.kind == "vitdeploy" and back.model.config == m.config
    x = _x(m)
    assert torch.equal(back.model(x), m(x))


def test_pytorch_model_bin_folder(tmp_path, hf_folders):
    src = hf_folders["p16-w48"]
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    torch.save(load_file(src / "model.safetensors"), tmp_path / "pytorch_model.bin")
    x = _x(load_model(src))
    assert (load_model(tmp_path)(x) - _hf_logits(src, x)).abs().max().item() < 1e-4


def _populate_hub_cache(cache, repo_id, files):
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<rev>/...}."""
    rev = "0" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)


def test_hub_ids_resolve_offline_from_the_cache(tmp_path, monkeypatch, hf_folders):
    cache = tmp_path / "hub"
    src = hf_folders["p16-w48"]
    _populate_hub_cache(cache, "google/vit-test", {
        "config.json": (src / "config.json").read_bytes(),
        "model.safetensors": (src / "model.safetensors").read_bytes(),
        "preprocessor_config.json": json.dumps({"image_mean": [0.485, 0.456, 0.406],
                                                "image_std": [0.229, 0.224, 0.225], "resample": 3}).encode(),
    })
    timm_cfg = {"architecture": "vit_tiny_patch16_224", "num_classes": 4,
                "pretrained_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.9, "interpolation": "bicubic"}}
    ref = hf_reference({"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3,
                        "intermediate_size": 768, "num_labels": 4}, layer_norm_eps=1e-6)
    ref.save_pretrained(tmp_path / "ref")
    timm_bytes = tmp_path / "timm.safetensors"
    save_file(to_timm_state(load_file(tmp_path / "ref" / "model.safetensors")), timm_bytes)
    _populate_hub_cache(cache, "timm/vit_tiny_patch16_224.test", {
        "config.json": json.dumps(timm_cfg).encode(), "model.safetensors": timm_bytes.read_bytes()})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    hf = resolve("google/vit-test")
    assert hf.kind == "hf" and hf.model.config.interpolation == "bicubic"
    assert hf.model.config.image_mean == (0.485, 0.456, 0.406)
    x = _x(hf.model)
    assert (hf.model(x) - _hf_logits(src, x)).abs().max().item() < 1e-4

    tm = resolve("timm/vit_tiny_patch16_224.test")
    assert tm.kind == "timm" and tm.model.config.crop_pct == 0.9 and tm.model.config.layer_norm_eps == 1e-6
    x = _x(tm.model)
    assert (tm.model(x) - _hf_logits(tmp_path / "ref", x)).abs().max().item() < 1e-4

    with pytest.raises(CheckpointError, match="google/vit-missing is not in the Hugging Face cache"):
        load_model("google/vit-missing")


def test_mismatched_keys_are_listed(tmp_path, hf_folders):
    state = load_file(hf_folders["p16-w48"] / "model.safetensors")
    state.pop("vit.layernorm.weight")
    state["vit.extra.weight"] = torch.zeros(1)
    state["classifier.bias"] = torch.zeros(3)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((hf_folders["p16-w48"] / "config.json").read_text())
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path)
    msg = str(e.value)
    assert "missing keys (1): vit.layernorm.weight" in msg
    assert "unexpected keys (1): vit.extra.weight" in msg
    assert "classifier.bias: checkpoint (3,) vs model (7,)" in msg


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_model(path, config="vit-tiny-patch16-224")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("vit-giant-patch16-224", "unknown model 'vit-giant-patch16-224'"),
        ("missing/weights.safetensors", "does not exist"),
        ("./nowhere", "does not exist"),
    ],
)
def test_bad_sources(source, message):
    with pytest.raises(CheckpointError, match=message):
        load_model(source)


def test_corrupt_and_configless_files(tmp_path, hf_folders):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_model(bad, config="vit-tiny-patch16-224")
    timm = tmp_path / "timm.safetensors"
    save_file(to_timm_state(load_file(hf_folders["p16-w48"] / "model.safetensors")), timm)
    with pytest.raises(CheckpointError, match="pass --preset NAME or --config FILE"):
        load_model(timm)


@pytest.mark.parametrize("name,text,words", [
    ("config.json", "[" * 100_000 + "]" * 100_000, "nested too deep"),
    ("config.json", "{nope", "is not JSON"),
    ("preprocessor_config.json", "[" * 100_000 + "]" * 100_000, "nested too deep"),
    ("preprocessor_config.json", '{"crop_pct": "abc"}', "crop_pct 'abc' is not a number"),
    ("preprocessor_config.json", '{"crop_pct": true}', "crop_pct 'True' is not a number"),
    ("preprocessor_config.json", '{"crop_pct": 0.4}', "crop_pct must be within 0.5..1"),
    ("preprocessor_config.json", '{"image_mean": 5}', "image_mean 5 is not a list of numbers"),
    ("timm", '{"crop_pct": "abc"}', "crop_pct 'abc' is not a number"),
    ("timm", '{"mean": ["a", 1, 2]}', "mean ['a', 1, 2] is not a list of numbers"),
])
def test_a_checkpoints_hostile_config_files_are_one_line_errors(hf_folders, tmp_path, name, text, words):
    """A model folder's config.json and preprocessor_config.json (and a timm config's pretrained_cfg) are
    untrusted: nested deep, not JSON, or a crop_pct or mean of the wrong type is one VitDeployError naming it.
    Old code: RecursionError, ValueError or TypeError tracebacks."""
    import shutil

    from vitdeploy.errors import VitDeployError

    folder = shutil.copytree(hf_folders["p16-w48"], tmp_path / "m")
    if name == "timm":
        cfg = {"architecture": "vit_tiny_patch16_224", "num_classes": 7, "pretrained_cfg": json.loads(text)}
        (folder / "config.json").write_text(json.dumps(cfg))
    else:
        (folder / name).write_text(text)
    with pytest.raises(VitDeployError, match=words.replace("[", r"\[").replace("]", r"\]")):
        load_model(folder)
