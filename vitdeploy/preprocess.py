"""Image files -> normalized NCHW float32 batches, with the config's resize, crop, mean and std
(or, for a model with its preprocessing in the graph, the resized uint8 NHWC pixels).

Uses Pillow and numpy only (no torch), so a serving install can preprocess.
Pillow's decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) is left on.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vitdeploy.errors import VitDeployError

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from vitdeploy.config import ViTConfig

MAX_IMAGE_SIDE = 1024  # an artifact's input side; ViT-H/14 at 518 is the largest we know of
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
# timm's eval crops lie in 0.875..1 (a few models 0.9-0.96); below half the image, crop_pct is a mistake
# or an attack: 0.001 would ask for a resize of 224k x 224k pixels before the crop
CROP_PCT_RANGE = (0.5, 1.0)
MAX_RESIZE_PIXELS = 40_000_000  # the largest resize before a crop (160 MB as Pillow holds RGB); serve sets its own
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageError(VitDeployError):
    """An image that cannot be read."""


@dataclass(frozen=True)
class Preprocessing:
    """The numbers preprocessing needs; built from a ViTConfig or an artifact's metadata."""

    image_size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    crop_pct: float | None = None
    interpolation: str = "bilinear"
    # (height, width) every image is resized to, its aspect ratio not kept, before the centre crop
    # (DeiTImageProcessor's 256x256); None: crop_pct's rule. Within image_size..image_size / 0.5.
    resize_size: tuple[int, int] | None = None

    @classmethod
    def from_config(cls, config: ViTConfig) -> Preprocessing:
        return cls(config.image_hw, tuple(config.image_mean), tuple(config.image_std), config.crop_pct,
                   config.interpolation, config.resize_size)

    @classmethod
    def from_dict(cls, d: Any) -> Preprocessing:
        """Type and check an artifact's preprocessing (untrusted: it comes from a file). VitDeployError,
        one line, for a value that would make every image fail, cost unbounded memory or give NaN."""
        def bad(problem: str) -> VitDeployError:
            return VitDeployError(f"the artifact's preprocessing {problem}: re-export the model with "
                                  "`vitdeploy export`")

        if not isinstance(d, dict):
            raise bad(f"is a {type(d).__name__}, not an object")
        size = d.get("image_size")
        if not (isinstance(size, list) and len(size) == 2 and all(
                type(v) is int and 1 <= v <= MAX_IMAGE_SIDE for v in size)):
            raise bad(f"image_size {size!r} is not [height, width] from 1 to {MAX_IMAGE_SIDE}")
        mean, std = _numbers(d.get("mean")), _numbers(d.get("std"))
        if mean is None:
            raise bad(f"mean {d.get('mean')!r} is not 1 or 3 finite numbers")
        if std is None or min(std) <= 0:
            raise bad(f"std {d.get('std')!r} is not 1 or 3 finite numbers above 0")
        crop = d.get("crop_pct")
        low, high = CROP_PCT_RANGE
        if crop is not None and not (type(crop) in (int, float) and low <= crop <= high):
            raise bad(f"crop_pct {crop!r} is not within {low:g}..{high:g} (the crops image models are trained with)")
        interpolation = d.get("interpolation", "bilinear")
        if interpolation not in INTERPOLATIONS:
            raise bad(f"interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        resize = d.get("resize_size")  # absent in artifacts written before it: crop_pct's rule
        if resize is not None and not (isinstance(resize, list) and len(resize) == 2 and all(
                type(r) is int and s <= r <= s / CROP_PCT_RANGE[0] for r, s in zip(resize, size, strict=True))):
            raise bad(f"resize_size {str(resize)[:40]} is not [height, width] from image_size {size} to "
                      f"{1 / CROP_PCT_RANGE[0]:g} times it")
        return cls((size[0], size[1]), mean, std, None if crop is None else float(crop), interpolation,
                   None if resize is None else (resize[0], resize[1]))

    def to_dict(self) -> dict[str, Any]:
        d = {"image_size": list(self.image_size), "mean": list(self.mean), "std": list(self.std),
             "crop_pct": self.crop_pct, "interpolation": self.interpolation}
        if self.resize_size is not None:  # written only where set: older readers see what they know
            d["resize_size"] = list(self.resize_size)
        return d

    def __call__(self, image: PILImage.Image) -> np.ndarray:
        """One PIL image -> [3, H, W] float32: :meth:`pixels`, then :meth:`normalize`."""
        return self.normalize(self.pixels(image)[None])[0]

    def pixels(self, image: PILImage.Image, max_pixels: int | None = MAX_RESIZE_PIXELS) -> np.ndarray:
        """One PIL image -> [H, W, 3] uint8, resized (and centre-cropped) as HF's ViT image processor
        documents it: PIL resize of the 8-bit image, so each pixel is rounded to 8 bits here, before
        any rescaling. This is also the input of a model exported with its preprocessing in the graph.
        ImageError when the resize before the crop (:meth:`resized_size`) would exceed ``max_pixels``."""
        from PIL import Image

        resample = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                    "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}[self.interpolation]
        th, tw = self.image_size
        nw, nh = self.resized_size(*image.size)
        if max_pixels is not None and nw * nh > max_pixels:
            raise ImageError(f"an image of {image.size[0]}x{image.size[1]} pixels would be resized to {nw}x{nh} "
                             f"before its centre crop ({self.crop_rule}), over {max_pixels} pixels: "
                             "crop it nearer to the model's aspect ratio first")
        image = image.resize((nw, nh), resample)
        if (nw, nh) != (tw, th):  # a centre crop (timm's eval transform)
            left, top = (nw - tw) // 2, (nh - th) // 2
            image = image.crop((left, top, left + tw, top + th))
        return np.asarray(image, dtype=np.uint8)

    @property
    def crop_rule(self) -> str:
        """The resize before the crop, in words (for messages)."""
        if self.resize_size is not None:
            return f"resize to {self.resize_size[1]}x{self.resize_size[0]}"
        return f"crop_pct {self.crop_pct}"

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) an image of ``width`` x ``height`` is resized to before the centre crop:
        ``resize_size`` where set, whatever the image; the model's size without ``crop_pct``; else the shorter
        side scaled to size / crop_pct (so a thin image's long side grows with its aspect ratio). Known before
        any pixel is touched, to be charged or refused."""
        th, tw = self.image_size
        if self.resize_size is not None:
            return self.resize_size[1], self.resize_size[0]
        if self.crop_pct is None:
            return tw, th
        if th == tw:  # torchvision's and HF's shortest-edge resize (timm, CLIP, DINOv2): the long side truncated
            short = math.floor(th / self.crop_pct + 1e-6)
            if width <= height:
                return short, max(short, int(short * height / max(1, width)))
            return max(short, int(short * width / max(1, height))), short
        ratio = max(th / self.crop_pct / max(1, height), tw / self.crop_pct / max(1, width))
        return max(tw, round(width * ratio)), max(th, round(height * ratio))

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """[N, H, W, 3] uint8 -> [N, 3, H, W] float32: rescale by 1/255, then (x - mean) / std."""
        arr = np.asarray(pixels, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))


def _numbers(value: Any) -> tuple[float, ...] | None:
    """1 or 3 finite numbers (a per-channel mean or std), or None."""
    if not (isinstance(value, list | tuple) and len(value) in (1, 3)):
        return None
    if not all(type(v) in (int, float) and math.isfinite(v) for v in value):
        return None
    return tuple(float(v) for v in value)


def open_image(source: str | Path | bytes) -> PILImage.Image:
    """Decode a file (or bytes) to RGB; grayscale, palette and RGBA are converted."""
    from PIL import Image, UnidentifiedImageError

    name = "image bytes" if isinstance(source, bytes) else str(source)
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as e:
        raise ImageError(f"cannot open image {name}: {e.strerror or e}") from None
    try:
        with fp, Image.open(fp) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "P", "PA"):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            return img.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ImageError(f"image {name} is too large to decode safely: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name} is not a readable image ({type(e).__name__}: {e})") from None


def load_images(paths: Sequence[str | Path | bytes], prep: Preprocessing, uint8: bool = False) -> np.ndarray:
    """Image files -> [N, 3, H, W] float32 (``uint8``: [N, H, W, 3] uint8 pixels, not normalized)."""
    if not paths:
        raise ImageError("no images given")
    return np.stack([_load_one(p, prep, uint8) for p in paths])


def _load_one(path: str | Path | bytes, prep: Preprocessing, uint8: bool) -> np.ndarray:
    """One image, preprocessed; an ImageError names the file (of thousands in a folder, which one is too thin)."""
    image = open_image(path)
    try:
        return prep.pixels(image) if uint8 else prep(image)
    except ImageError as e:
        if isinstance(path, bytes):
            raise
        raise ImageError(f"{path}: {e}") from None


def find_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder``, recursively, sorted; an error if the folder has none."""
    root = Path(folder)
    if not root.is_dir():
        raise ImageError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageError(f"image folder {root} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def labelled_images(folder: str | Path) -> tuple[list[Path], list[str]]:
    """An ImageFolder-style tree (one sub-folder per class) -> files and their class names."""
    files = find_images(folder)
    root = Path(folder)
    classes = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "" for p in files]
    if any(c == "" for c in classes):
        raise ImageError(f"{root}: images must sit in one sub-folder per class (DIR/CLASS/image.png)")
    return files, classes


def batches(paths: Iterable[Path], prep: Preprocessing, batch_size: int, uint8: bool = False) -> Iterator[np.ndarray]:
    chunk: list[Path] = []
    for p in paths:
        chunk.append(p)
        if len(chunk) == batch_size:
            yield load_images(chunk, prep, uint8)
            chunk = []
    if chunk:
        yield load_images(chunk, prep, uint8)
