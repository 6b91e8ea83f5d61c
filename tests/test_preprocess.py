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


def test_matches_hf_image_processor(images):
    """Same resize (bilinear, straight to size) and mean/std as HF's ViTImageProcessor."""
    from transformers import ViTImageProcessor

    files = find_images(images)
    hf = ViTImageProcessor(size={"height": 224, "width": 224}, resample=Image.Resampling.BILINEAR)
    ref = hf([Image.open(f).convert("RGB") for f in files[:1]], return_tensors="np")["pixel_values"]
    ours = load_images(files[:1], Preprocessing())
    assert np.abs(ours - ref).max() < 1e-5


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


def test_decompression_bomb_guard_stays_on(tmp_path, monkeypatch):
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100 // 2)  # 300*300 > 2x the limit
    with pytest.raises(ImageError, match="too large"):
        open_image(tmp_path / "big.png")
