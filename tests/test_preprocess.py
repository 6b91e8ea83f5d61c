import numpy as np
import pytest
from PIL import Image

from vitdeploy.config import ViTConfig
from vitdeploy.preprocess import ImageError, Preprocessing, find_images, load_images, open_image


def test_formats_and_modes_become_normalized_nchw(images):
    files = find_images(images)
    assert len(files) == 6 and {f.suffix for f in files} == {".jpg", ".png", ".webp"}
    prep = Preprocessing.from_config(ViTConfig(hidden_size=32, num_attention_heads=2))
    batch = load_images(files, prep)
    assert batch.shape == (6, 3, 224, 224) and batch.dtype == np.float32
    assert batch.min() >= -1.0 and batch.max() <= 1.0


def _hf_processor(backend: str):
    """HF's ViT image processor on the given backend, on any transformers we support: in 4.x
    ``ViTImageProcessor`` is the PIL one and ``ViTImageProcessorFast`` the torchvision one; in 5.x
    ``ViTImageProcessor`` is torchvision's (PIL only as a fallback without torchvision) and
    ``ViTImageProcessorPil`` the PIL one."""
    import transformers

    kwargs = {"size": {"height": 224, "width": 224}, "resample": Image.Resampling.BILINEAR}
    if backend == "pil":
        return getattr(transformers, "ViTImageProcessorPil", transformers.ViTImageProcessor)(**kwargs)
    pytest.importorskip("torchvision", reason="HF's torchvision image-processing backend needs torchvision")
    if hasattr(transformers, "ViTImageProcessorPil"):  # 5.x: the default class is the torchvision one
        return transformers.ViTImageProcessor(**kwargs)
    if not hasattr(transformers, "ViTImageProcessorFast"):
        pytest.skip(f"transformers {transformers.__version__} has no torchvision ViT image processor")
    return transformers.ViTImageProcessorFast(**kwargs)


def test_matches_hf_image_processor(images):
    """HF's documented algorithm (bilinear resize straight to size, rescale by 1/255, normalize with
    mean/std), as its PIL backend runs it: the same numbers."""
    files = find_images(images)
    ref = _hf_processor("pil")([open_image(f) for f in files], return_tensors="np")["pixel_values"]
    ours = load_images(files, Preprocessing())
    assert ours.shape == ref.shape and np.abs(ours - ref).max() < 1e-5


def test_hf_torchvision_backend_within_one_level(images):
    """transformers 5.x's default ViTImageProcessor resizes with torchvision (an antialiased uint8
    kernel of its own), whose rounding differs from PIL's by one 8-bit level on some pixels: 0.0078
    after normalizing with std 0.5 (seen with transformers 5.17 on an H200 host). Same algorithm,
    another resampler, so the tolerance is one level, and no more."""
    files = find_images(images)
    ref = _hf_processor("torchvision")([open_image(f) for f in files], return_tensors="np")["pixel_values"]
    ours = load_images(files, Preprocessing())
    one_level = 1 / 255 / 0.5
    assert np.abs(ours - ref).max() <= one_level + 1e-5


def test_torch_uint8_resize_within_one_level(images):
    """The kernel under HF's torchvision backend (torchvision resizes a uint8 CPU tensor with torch's
    antialiased bilinear interpolate), run here without torchvision: the same one-level bound, and
    it is reached, so the tolerance above is needed and tight."""
    import torch

    prep = Preprocessing()
    diffs = []
    for f in find_images(images):
        rgb = np.array(open_image(f))  # a writable copy for torch.from_numpy
        t = torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()
        resized = torch.nn.functional.interpolate(t, size=(224, 224), mode="bilinear", antialias=True)
        theirs = prep.normalize(resized.permute(0, 2, 3, 1).numpy())
        diffs.append(np.abs(load_images([f], prep) - theirs).max())
    one_level = 1 / 255 / 0.5
    assert max(diffs) <= one_level + 1e-5 and max(diffs) > one_level / 2


def test_pixels_then_normalize_is_the_float_path(images):
    """What a --uint8-input model receives (resized uint8 pixels) and what it computes in its graph
    (x / 255, then (x - mean) / std, NHWC -> NCHW) give the float path's numbers exactly."""
    prep = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.875)
    files = find_images(images)
    pixels = load_images(files, prep, uint8=True)
    assert pixels.dtype == np.uint8 and pixels.shape == (6, 224, 224, 3)
    np.testing.assert_array_equal(prep.normalize(pixels), load_images(files, prep))


def test_center_crop():
    prep = Preprocessing(image_size=(4, 4), mean=(0, 0, 0), std=(1, 1, 1), crop_pct=0.5, interpolation="nearest")
    arr = np.zeros((8, 16, 3), np.uint8)
    arr[2:6, 6:10] = 255  # the centre 4x4 of an 8x16 image
    out = prep(Image.fromarray(arr))
    assert out.shape == (3, 4, 4) and np.all(out == 1.0)


def test_rgba_is_composited_on_white(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert np.all(np.asarray(open_image(tmp_path / "clear.png")) == 255)


def test_errors_name_the_file(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(ImageError, match=r"notes\.png is not a readable image"):
        open_image(tmp_path / "notes.png")
    with pytest.raises(ImageError, match=r"cannot open image .*missing\.jpg"):
        open_image(tmp_path / "missing.jpg")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageError, match="holds no image files"):
        find_images(empty)


def test_a_thin_image_among_many_is_named(tmp_path):
    """predict and eval load folders of images: the thin one whose resize is refused is named by its path.
    Old code: "an image of 5000x2 pixels ...", which of thousands not said."""
    prep = Preprocessing(image_size=(64, 64), crop_pct=0.5)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "fine.png")
    Image.fromarray(np.zeros((2, 5000, 3), np.uint8)).save(tmp_path / "thin.png")
    for uint8 in (False, True):
        with pytest.raises(ImageError, match=r"thin\.png: an image of 5000x2 pixels would be resized"):
            load_images([tmp_path / "fine.png", tmp_path / "thin.png"], prep, uint8)


def test_decompression_bomb_guard_stays_on(tmp_path, monkeypatch):
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100 // 2)  # 300*300 > 2x the limit
    with pytest.raises(ImageError, match="too large"):
        open_image(tmp_path / "big.png")


@pytest.mark.parametrize("crop", [0.001, 0.3, 0.49, 1.01])
def test_crop_pct_outside_what_models_use_is_refused(crop):
    """crop_pct 0.001 in an artifact's metadata asked for a 224k x 224k resize (issue 29, item 2): only
    0.5..1 (the crops timm and HF models are trained with) is accepted, from metadata and from a config,
    with a one-line error naming the range. Old code took anything in (0, 1]."""
    from vitdeploy.config import ConfigError
    from vitdeploy.errors import VitDeployError

    prep = {"image_size": [224, 224], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}
    with pytest.raises(VitDeployError, match=r"crop_pct .* not within 0\.5\.\.1"):
        Preprocessing.from_dict({**prep, "crop_pct": crop})
    with pytest.raises(ConfigError, match=r"crop_pct must be within 0\.5\.\.1"):
        ViTConfig(hidden_size=32, num_attention_heads=2, crop_pct=crop)
    for fine in (0.5, 0.875, 0.9, 1.0):
        assert Preprocessing.from_dict({**prep, "crop_pct": fine}).crop_pct == fine


def test_thin_image_resize_is_refused_before_it_runs():
    """Under crop_pct the short side goes to size / crop_pct and the long side follows, so a thin image asks
    for a resize that grows with its aspect ratio: a 5000x2 image at 64x64 with crop_pct 0.5 is a 320000x128
    resize (41 M pixels). Refused with ImageError, which names the sizes, before Pillow allocates anything;
    an ordinary image still gives the crop."""
    prep = Preprocessing(image_size=(64, 64), crop_pct=0.5)
    thin = Image.fromarray(np.zeros((2, 5000, 3), np.uint8))
    with pytest.raises(ImageError, match=r"5000x2 pixels would be resized to 320000x128"):
        prep.pixels(thin)
    assert prep.pixels(Image.fromarray(np.zeros((300, 200, 3), np.uint8))).shape == (64, 64, 3)


RESIZE_BASE = {"image_size": [224, 224], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.875,
               "interpolation": "bicubic"}


def test_resize_size_round_trips_and_old_artifacts_read_as_before():
    """DeiT's resize to height x width before the crop is ``resize_size`` in the artifact's preprocessing:
    written only where set, so an artifact written before it (no key) reads as it did (crop_pct's rule)."""
    old = Preprocessing.from_dict(RESIZE_BASE)
    assert old.resize_size is None and "resize_size" not in old.to_dict()
    assert old.resized_size(640, 427) == (383, 256)  # the short side to 256, the aspect ratio kept
    deit = Preprocessing.from_dict({**RESIZE_BASE, "resize_size": [256, 288]})
    assert deit.resize_size == (256, 288) and Preprocessing.from_dict(deit.to_dict()) == deit
    # whatever the image, the resize is resize_size's (width, height): a thin one costs no more
    for size in ((640, 427), (5000, 2), (2, 5000), (1, 1)):
        assert deit.resized_size(*size) == (288, 256)
    assert deit.pixels(Image.fromarray(np.zeros((2, 5000, 3), np.uint8))).shape == (224, 224, 3)
    assert Preprocessing.from_dict({**RESIZE_BASE, "resize_size": None}).resize_size is None


@pytest.mark.parametrize("resize", [[223, 256], [256, 449], [256], [256, 256, 256], [256.0, 256], [True, 256],
                                    "256", 256, {"height": 256}, [10**12, 256], [-256, 256]])
def test_a_bad_resize_size_is_refused_in_one_line(resize):
    """Untrusted like every field of an artifact: a pair of integers from the input size to twice it (a
    resize before a centre crop, with the pixel budget of crop_pct 0.5 at most)."""
    from vitdeploy.errors import VitDeployError

    with pytest.raises(VitDeployError, match="resize_size") as e:
        Preprocessing.from_dict({**RESIZE_BASE, "resize_size": resize})
    assert "\n" not in str(e.value) and "re-export" in str(e.value)


def test_resize_size_from_preprocessor_config_and_its_checks():
    """A processor that resizes to height x width then crops (DeiTImageProcessor) sets resize_size, scaled from
    its crop to the model's input; a shortest-edge one (CLIP, DINOv2) or one without a crop (ViT, SigLIP)
    leaves it unset; a crop larger than the resize, or a resize past twice the input, is refused."""
    from vitdeploy.errors import ConfigError

    base = ViTConfig(hidden_size=32, num_attention_heads=2, resize_size=(256, 256))
    deit = {"size": {"height": 256, "width": 256}, "crop_size": {"height": 224, "width": 224},
            "do_center_crop": True}
    assert base.apply_preprocessor_config(deit).resize_size == (256, 256)
    wide = {**deit, "size": {"height": 256, "width": 320}}
    assert base.apply_preprocessor_config(wide).resize_size == (256, 320)
    clip = {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}}
    assert base.apply_preprocessor_config(clip).resize_size is None
    vit = {"size": {"height": 224, "width": 224}, "do_center_crop": False}
    assert base.apply_preprocessor_config(vit).resize_size is None
    for bad in ({**deit, "crop_size": {"height": 300, "width": 224}}, {**deit, "size": {"height": "256",
                                                                                         "width": 256}}):
        with pytest.raises(ConfigError, match="size"):
            base.apply_preprocessor_config(bad)
    with pytest.raises(ConfigError, match="resize_size"):
        base.apply_preprocessor_config({**deit, "size": {"height": 256, "width": 512}})
