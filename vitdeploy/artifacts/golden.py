"""The golden set: a few encoded images, the logits torch FP32 gave for them, and the tolerance for the
artifact's precision. It travels with every artifact so that the artifact can prove itself wherever it
lands: export stores it in the ONNX metadata (``vitdeploy.golden``), ``build`` copies it into the engine
sidecar with the rest of the metadata, ``triton`` writes it as ``golden.json`` beside the model.

The check runs the whole path: decode the stored PNG, preprocess it with the artifact's own metadata,
run the runtime, compare with the stored logits image by image. Images are PNG (lossless, so every
decoder yields the same pixels) at a size other than the model's input, so the resize is part of what
is checked. The whole set, base64 and all, stays under :data:`MAX_BYTES`.

This module is numpy, Pillow and the preprocessing only: no torch, no ONNX, no runtime.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vitdeploy.errors import VitDeployError
from vitdeploy.metrics import TOLERANCES, compare_logits

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from vitdeploy.preprocess import Preprocessing

FORMAT = "vitdeploy-golden/1"
META_KEY = "golden"  # ArtifactMetadata.extra key: ``vitdeploy.golden`` in the ONNX metadata_props
FILE_NAME = "golden.json"  # in a Triton model folder
MAX_BYTES = 200_000  # the whole JSON text
MAX_READ_BYTES = 1_000_000  # a file claiming more is refused unread
MAX_IMAGES = 16
MAX_SIDE = 1024  # a stored image larger than this is refused before decoding
DEFAULT_IMAGES = 4
TOP_K = 5
# Top-1 must match where the reference's best logit leads the runner-up by more than this x the
# logits' scale. fp32/fp16: tune's decisive margin (0.05). int8/fp8 may move each logit by up to
# 0.5/0.8 x scale (their max-abs tolerance), so a lead must be larger before a flip is drift.
TOP1_MARGIN = {"fp32": 0.05, "fp16": 0.05, "bf16": 0.1, "int8": 0.25, "fp8": 0.4}
# A runtime may compute in a lossier format than its file (OpenVINO's bf16 hint, which tune may choose):
# the lossier format's tolerance applies then. bf16 is tune's guard (8 significant bits, fp16 has 11).
COMPUTE_TOLERANCES = {**TOLERANCES, "bf16": {"max_abs_rel": 0.1, "min_cosine": 0.995}}
LOSSINESS = ("fp32", "fp16", "bf16", "int8", "fp8")


class GoldenError(VitDeployError):
    """A golden set that is malformed, or an artifact that fails its own."""


def tolerance_for(precision: str) -> dict[str, float]:
    """The check's tolerance: export's parity tolerance for ``precision`` (:data:`TOLERANCES`), per image,
    plus the top-1 margin."""
    if precision not in COMPUTE_TOLERANCES:
        raise GoldenError(f"no golden tolerance for precision {precision!r}: use fp32, fp16, int8 or fp8")
    return {**COMPUTE_TOLERANCES[precision], "top1_margin": TOP1_MARGIN[precision]}


def tightened(stored: Mapping[str, float], floor: Mapping[str, float]) -> dict[str, float]:
    """``floor``'s fields, each replaced by ``stored``'s where that is tighter: a stored tolerance may only
    be tighter than the one of the artifact's real precision, never looser. A ``min_*`` field is a lower
    bound (higher is tighter); every other field is an upper bound (lower is tighter)."""
    return {k: (max if k.startswith("min_") else min)(float(stored.get(k, v)), v) for k, v in floor.items()}


def lossier(a: str, b: str | None) -> str:
    """The lossier of two number formats (``a`` when ``b`` is None or unknown)."""
    if b is None or b not in LOSSINESS or a not in LOSSINESS:
        return a
    return max(a, b, key=LOSSINESS.index)


# --- results ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GoldenRow:
    """One golden image's check."""

    image: str
    expected: int  # the reference's top-1 class
    got: int
    top1_checked: bool  # the reference is decisive on this image (see TOP1_MARGIN)
    max_abs: float
    scale: float  # max |reference logit|, at least 1
    cosine: float
    problem: str = ""  # why it fails; empty when within tolerance

    @property
    def ok(self) -> bool:
        return not self.problem

    @property
    def error(self) -> float:
        """Max abs error relative to the logits' scale."""
        return self.max_abs / self.scale

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GoldenRow:
        return cls(str(d["image"]), int(d["expected"]), int(d["got"]), bool(d["top1_checked"]),
                   float(d["max_abs"]), float(d["scale"]), float(d["cosine"]), str(d.get("problem", "")))


@dataclass
class GoldenVerdict:
    """Every golden image's check, against the tolerance of the artifact's precision."""

    precision: str
    tolerance: dict[str, float]
    rows: list[GoldenRow]
    task: str = "classification"  # embedding: rows checked by cosine and relative max error, no top-1

    @property
    def passed(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def is_embedding(self) -> bool:
        return self.task == "embedding"

    @property
    def failures(self) -> list[GoldenRow]:
        return [r for r in self.rows if not r.ok]

    def reason(self) -> str:
        """One line: the first failing image and its drift (empty when passed)."""
        bad = self.failures
        if not bad:
            return ""
        more = f" (and {len(bad) - 1} more of {len(self.rows)} images)" if len(bad) > 1 else ""
        return f"golden image {bad[0].image!r} drifted: {bad[0].problem}{more}"

    def summary(self) -> str:
        worst = max(self.rows, key=lambda r: r.error)
        state = "passed" if self.passed else "FAILED"
        return (f"{state}: {len(self.rows) - len(self.failures)}/{len(self.rows)} golden images within "
                f"{self.precision} tolerance; worst max abs {worst.error:.3g} x scale, "
                f"min cosine {min(r.cosine for r in self.rows):.6f}")

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "task": self.task, "precision": self.precision, "tolerance": self.tolerance,
                "rows": [r.to_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GoldenVerdict:
        task = str(d.get("task", "classification"))  # verdicts cached before the field: classifiers' and embeddings'
        if task not in ("classification", "embedding"):
            raise ValueError(f"task {task!r} is not classification or embedding")
        return cls(str(d["precision"]), {str(k): float(v) for k, v in dict(d["tolerance"]).items()},
                   [GoldenRow.from_dict(r) for r in d["rows"]], task)


def _row(name: str, ref: np.ndarray, out: np.ndarray, tol: Mapping[str, float], embedding: bool = False) -> GoldenRow:
    """One image's check. An embedding (``embedding``) has no top-1: its cosine and its max error relative
    to its own largest value (an L2-normalized vector's values are far below 1, the logits' floor)."""
    expected = int(np.argmax(ref))
    if not np.all(np.isfinite(out)):
        return GoldenRow(name, expected, -1, True, math.inf, 1.0, 0.0, "the logits hold NaN or infinite values")
    c = compare_logits(ref[None], out[None])
    if embedding:
        c.scale = float(np.abs(ref).max()) or 1.0
    got = int(np.argmax(out))
    lead = float(np.diff(np.sort(ref)[-2:])[0]) if ref.size > 1 and not embedding else math.inf
    checked = not embedding and lead > tol["top1_margin"] * c.scale
    error = cosine = ""
    if c.max_abs > tol["max_abs_rel"] * c.scale:
        error = (f"max abs error {c.max_abs / c.scale:.3g} x {'its largest value' if embedding else 'scale'} > "
                 f"{tol['max_abs_rel']:g}")
    if not c.cosine >= tol["min_cosine"]:
        cosine = f"cosine {c.cosine:.6f} < {tol['min_cosine']:g}"
    problems = [cosine, error] if embedding else [error, cosine]  # an embedding's first measure is its cosine
    if checked and got != expected:
        problems.append(f"top-1 class {got} where the reference gives {expected}")
    return GoldenRow(name, expected, got, checked, c.max_abs, c.scale, c.cosine, "; ".join(p for p in problems if p))


# --- the set ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GoldenImage:
    name: str
    png: bytes
    logits: np.ndarray  # float32 [num_labels], torch FP32 through decode -> preprocessing -> model

    @property
    def top_k(self) -> list[int]:
        return [int(i) for i in np.argsort(-self.logits, kind="stable")[:TOP_K]]


@dataclass
class GoldenSet:
    images: list[GoldenImage]
    precision: str
    tolerance: dict[str, float]
    source: str = ""  # where the images came from
    reference: str = "torch fp32"
    format: str = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        """classification (logits: top-1 checked) or embedding (cosine and relative error only)."""
        return str(self.extra.get("task", "classification"))

    def decoded(self) -> list[PILImage.Image]:
        """The stored images, decoded to RGB (the first step of the checked path)."""
        from vitdeploy.preprocess import open_image

        return [open_image(im.png) for im in self.images]

    def check(self, outputs: np.ndarray, compute: str | None = None, precision: str | None = None) -> GoldenVerdict:
        """Compare a runtime's logits for :meth:`decoded` (in order) with the stored ones. ``precision``: the
        artifact's real precision, read from its graph (None: the set's own claim, for a set just made); the
        stored tolerance applies only where it is tighter than that precision's. ``compute``: the format the
        runtime computes in, when lossier than the artifact's (that format's tolerance applies then)."""
        out = np.asarray(outputs, dtype=np.float32)
        want = (len(self.images), self.images[0].logits.size)
        if out.shape != want:
            raise GoldenError(f"the runtime gave logits of shape {out.shape} for the golden set, expected {want}: "
                              "the artifact and its golden set describe different models")
        real = precision or self.precision
        effective = lossier(real, compute)
        tol = tolerance_for(effective) if effective != real else tightened(self.tolerance, tolerance_for(real))
        embedding = self.task == "embedding"
        rows = [_row(im.name, im.logits, out[i], tol, embedding) for i, im in enumerate(self.images)]
        return GoldenVerdict(effective, dict(tol), rows, self.task)

    # -- (de)serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format, "precision": self.precision, "tolerance": self.tolerance, "source": self.source,
            "reference": self.reference, **self.extra,
            "images": [{"name": im.name, "png": base64.b64encode(im.png).decode("ascii"),
                        "logits": base64.b64encode(im.logits.astype("<f4").tobytes()).decode("ascii"),
                        "top_k": im.top_k} for im in self.images],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @property
    def nbytes(self) -> int:
        return len(self.to_json())

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "golden set") -> GoldenSet:
        """Parse and validate (the text comes from a file: untrusted)."""
        if len(text) > MAX_READ_BYTES:
            raise GoldenError(f"{where} is {len(text)} bytes, over the {MAX_READ_BYTES} a golden set may take: "
                              "re-export the artifact with `vitdeploy export`")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GoldenError(f"{where} is not JSON ({type(e).__name__}): re-export with `vitdeploy export`") from None
        except RecursionError:  # json's parser recurses per nesting level
            raise GoldenError(f"{where} is nested too deep to be a golden set: re-export with `vitdeploy export`"
                              ) from None
        return cls.from_dict(data, where)

    @classmethod
    def from_dict(cls, data: Any, where: str = "golden set") -> GoldenSet:
        fix = "re-export the artifact with `vitdeploy export`"
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise GoldenError(f"{where} is not a vitdeploy golden set ({FORMAT}): {fix}")
        try:
            precision = str(data["precision"])
            tol = {k: float(v) for k, v in dict(data["tolerance"]).items()}
            if set(tol) != set(tolerance_for(precision)) or not all(math.isfinite(v) and v >= 0 for v in tol.values()):
                raise ValueError(f"tolerance {tol}")
            entries = data["images"]
            if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_IMAGES:
                raise ValueError(f"needs 1 to {MAX_IMAGES} images")
            images = [_image_from_dict(e) for e in entries]
            if len({im.logits.size for im in images}) != 1:
                raise ValueError("images have logits of different lengths")
            if data.get("task", "classification") not in ("classification", "embedding"):
                raise ValueError(f"task {data.get('task')!r} is not classification or embedding")
            known = {"format", "precision", "tolerance", "source", "reference", "images"}
            return cls(images, precision, tol, str(data.get("source", "")), str(data.get("reference", "")),
                       extra={k: v for k, v in data.items() if k not in known})
        except (KeyError, TypeError, ValueError, binascii.Error, VitDeployError) as e:
            raise GoldenError(f"{where} is malformed ({type(e).__name__}: {e}): {fix}") from None

    def write(self, path: str | Path) -> None:
        """As ``golden.json`` (atomically)."""
        from vitdeploy.io import atomic_write_bytes

        atomic_write_bytes(path, self.to_json().encode())

    @classmethod
    def read(cls, path: str | Path) -> GoldenSet:
        p = Path(path)
        if p.stat().st_size > MAX_READ_BYTES:
            raise GoldenError(f"{p} is over {MAX_READ_BYTES} bytes: not a golden set")
        return cls.from_json(p.read_bytes(), where=str(p))

    # -- in artifact metadata ----------------------------------------------------------------------
    @classmethod
    def from_extra(cls, extra: Mapping[str, Any], where: str = "the artifact's metadata") -> GoldenSet | None:
        """The golden set an artifact's metadata carries (its ``extra`` entries), or None."""
        text = extra.get(META_KEY)
        if not text:
            return None
        return cls.from_json(text, where=f"golden set in {where}")

    def attach(self, extra: dict[str, Any]) -> None:
        """Store this set in an artifact's metadata ``extra`` entries."""
        extra[META_KEY] = self.to_json()


def _image_from_dict(e: Any) -> GoldenImage:
    from PIL import Image

    name = str(e["name"])
    if not name.isprintable() or len(name) > 200:
        raise ValueError("image name")
    png = base64.b64decode(e["png"], validate=True)
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"image {name!r} is not a PNG")
    with Image.open(io.BytesIO(png)) as im:  # reads the header only
        if max(im.size) > MAX_SIDE:
            raise ValueError(f"image {name!r} is {im.size[0]}x{im.size[1]}, over {MAX_SIDE} pixels a side")
    logits = np.frombuffer(base64.b64decode(e["logits"], validate=True), dtype="<f4").astype(np.float32)
    if logits.size < 1 or not np.all(np.isfinite(logits)):
        raise ValueError(f"image {name!r} has no finite logits")
    return GoldenImage(name, png, logits)


# --- making one -----------------------------------------------------------------------------------------
def synthetic_images(n: int, size: tuple[int, int], seed: int = 0) -> list[tuple[str, PILImage.Image]]:
    """``n`` deterministic images (``seed``): a colour gradient, a few shapes, coarse grain; smooth
    enough that a PNG of them stays small, varied enough that a wrong mean or resize shows."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    h, w = size
    out = []
    for i in range(n):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = ((xx / max(w - 1, 1)) * rng.uniform(0.2, 1) + (yy / max(h - 1, 1)) * rng.uniform(0.2, 1)) / 2
        arr = c0 * (1 - t[..., None]) + c1 * t[..., None]
        grain = rng.normal(0, 12, (-(-h // 8), -(-w // 8), 3))  # one value per 8x8 block
        arr += np.kron(grain, np.ones((8, 8, 1)))[:h, :w]
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            x1, y1 = x0 + int(rng.integers(w // 8 + 1, w // 2 + 2)), y0 + int(rng.integers(h // 8 + 1, h // 2 + 2))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
        out.append((f"synthetic-{i}", image))
    return out


def pick_files(files: Sequence[Path], n: int) -> list[Path]:
    """``n`` files spread evenly over a sorted list (deterministic; every class of a sorted
    ImageFolder tree has a chance)."""
    if len(files) <= n:
        return list(files)
    return [files[round(i * (len(files) - 1) / (n - 1))] if n > 1 else files[0] for i in range(n)]


def _png(image: PILImage.Image, side: int) -> bytes:
    from PIL import Image

    im = image.convert("RGB")
    if max(im.size) > side:
        scale = side / max(im.size)
        im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))),
                       Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def make_golden_set(images: Sequence[tuple[str, PILImage.Image]], prep: Preprocessing,
                    model: Callable[[np.ndarray], np.ndarray], precision: str, source: str,
                    max_bytes: int = MAX_BYTES, task: str = "classification") -> GoldenSet:
    """Encode ``images`` as PNG (at most 1.25x the model's input side, smaller until the set fits in
    ``max_bytes``) and record ``model``'s logits for them through decode -> ``prep`` -> model.
    ``model`` takes normalized float32 NCHW and returns logits (the float reference: torch FP32)."""
    from vitdeploy.preprocess import open_image

    if not images:
        raise GoldenError("a golden set needs at least one image")
    images = list(images)[:MAX_IMAGES]
    side = round(1.25 * max(prep.image_size))
    while True:
        pngs = [_png(im, side) for _, im in images]
        x = prep.normalize(np.stack([prep.pixels(open_image(p)) for p in pngs]))
        logits = np.asarray(model(x), dtype=np.float32)
        golden = GoldenSet([GoldenImage(name[:200], png, logits[i]) for i, ((name, _), png) in
                            enumerate(zip(images, pngs, strict=True))], precision, tolerance_for(precision), source,
                            extra={"task": task} if task != "classification" else {})
        if golden.nbytes <= max_bytes:
            return golden
        if side <= 16:
            raise GoldenError(f"a golden set of {len(images)} images does not fit in {max_bytes} bytes "
                              f"({golden.nbytes} with {side}-pixel images): use fewer images")
        side = max(16, int(side * 0.8))
