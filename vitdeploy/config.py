"""ViTConfig: HF ViTConfig's fields and defaults, HF config.json round-trip, and named presets.

The ViT family (DeiT, DINOv2, CLIP and SigLIP image towers) is the same config with its block options
set (tokens, LayerScale, SwiGLU, pre-norm, pooling, projection): ``vitdeploy.families`` reads each
family's HF config.json into these fields.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitdeploy.errors import ConfigError

IntOrPair = int | tuple[int, int]
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu")
CLASSIFIER_INPUTS = ("cls", "cls_distilled", "cls_patch_mean", "patch_mean", "patch_mean_before_norm", "map")
POOLINGS = ("cls", "map")
TASKS = ("classification", "embedding")
HF_NUM_LABELS = 2  # transformers' default, which its config.json leaves out
OWN_CONFIG = "vitdeploy_config"  # marks a config.json written by ViTConfig for a non-ViT family

# HF's ViTImageProcessor: resample=2 (PIL bilinear) and 3 (bicubic)
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "lanczos"}
_RESAMPLE_PIL = {v: k for k, v in _PIL_RESAMPLE.items()}


def to_2tuple(x: IntOrPair | list[int]) -> tuple[int, int]:
    """An int or an (height, width) pair as a pair (timm's and HF's to_2tuple)."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ConfigError(f"expected an int or a (height, width) pair, got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


@dataclass
class ViTConfig:
    """Architecture plus the preprocessing that belongs with the weights.

    The first block of fields and their defaults are HF ``ViTConfig``'s.
    Preprocessing: resize the shorter side to ``image_size / crop_pct`` then centre-crop to
    ``image_size`` (timm's recipe); ``crop_pct=None`` resizes straight to ``image_size``
    (HF ``ViTImageProcessor``), then ``(x / 255 - mean) / std``.
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    is_encoder_decoder: bool = False
    image_size: IntOrPair = 224
    patch_size: IntOrPair = 16
    num_channels: int = 3
    qkv_bias: bool = True
    num_labels: int = 1000
    id2label: dict[int, str] | None = None
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    crop_pct: float | None = None
    interpolation: str = "bilinear"
    # (height, width) to resize to, the aspect ratio not kept, before the centre crop (DeiT's processor:
    # 256x256 then 224); None: crop_pct's rule. Within image_size..image_size / 0.5 (preprocess.Preprocessing)
    resize_size: tuple[int, int] | None = None
    # the family's block options (timm's VisionTransformer arguments); the defaults are HF's ViT
    model_type: str = "vit"  # the HF model_type the weights came as (vitdeploy.families)
    class_token: bool = True
    distillation_token: bool = False  # DeiT: a second token after [CLS]
    num_register_tokens: int = 0  # DINOv2 with registers: tokens after [CLS], without positions
    layerscale_value: float | None = None  # LayerScale on both residual branches (DINOv2)
    use_swiglu_ffn: bool = False  # SwiGLU MLP; intermediate_size is its hidden width (DINOv2 giant)
    pre_norm: bool = False  # a LayerNorm before the blocks (CLIP)
    patch_bias: bool = True  # the patch convolution has a bias (not CLIP's)
    # what the classifier reads: cls | cls_distilled (DeiT's two heads) | cls_patch_mean (DINOv2) | patch_mean
    # (SigLIP: the patch tokens' mean) | patch_mean_before_norm (CLIP: that mean before the final LayerNorm)
    # | map (timm's SigLIP classifier: the attention-pooling head's output)
    classifier_input: str = "cls"
    pooling: str = "cls"  # the embedding: cls (the [CLS] row) | map (SigLIP's attention-pooling head)
    projection_dim: int = 0  # a projection without bias on the embedding (CLIP's image_embeds); 0: none
    position_grid: tuple[int, int] | None = None  # trained position grid, interpolated to the input's
    position_antialias: bool = False  # that interpolation antialiased (HF's dinov2_with_registers; not dinov2)
    task: str = "classification"  # classification (logits) | embedding (one vector per image)
    normalize: bool = False  # embeddings L2-normalized in the model
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.image_size, list):
            self.image_size = tuple(self.image_size)  # type: ignore[assignment]
        if isinstance(self.patch_size, list):
            self.patch_size = tuple(self.patch_size)  # type: ignore[assignment]
        if self.position_grid is not None:
            self.position_grid = to_2tuple(self.position_grid)
        if self.resize_size is not None:
            self.resize_size = to_2tuple(self.resize_size)
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            if self.num_labels != len(self.id2label):
                self.num_labels = len(self.id2label)
        self.image_mean = tuple(float(v) for v in self.image_mean)  # type: ignore[assignment]
        self.image_std = tuple(float(v) for v in self.image_std)  # type: ignore[assignment]
        self.validate()

    # -- checks -------------------------------------------------------------------------
    def validate(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "num_channels", "num_labels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ViTConfig.{name} must be a positive integer, got {value!r}")
        for name in ("image_size", "patch_size"):
            pair = to_2tuple(getattr(self, name))
            if min(pair) <= 0:
                raise ConfigError(f"ViTConfig.{name} must be positive, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"ViTConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        (ih, iw), (ph, pw) = self.image_hw, self.patch_hw
        if ih % ph or iw % pw:
            raise ConfigError(
                f"ViTConfig.image_size {self.image_hw} must be divisible by patch_size {self.patch_hw}"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"ViTConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.layer_norm_eps <= 0:
            raise ConfigError(f"ViTConfig.layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"ViTConfig.hidden_act {self.hidden_act!r} is not one of {', '.join(ACTIVATIONS)}")
        if len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            raise ConfigError("ViTConfig.image_mean and image_std need one value per channel")
        if any(s <= 0 for s in self.image_std):
            raise ConfigError("ViTConfig.image_std values must be positive")
        if self.crop_pct is not None and not 0.5 <= self.crop_pct <= 1.0:  # preprocess.CROP_PCT_RANGE
            raise ConfigError(f"ViTConfig.crop_pct must be within 0.5..1 (the crops image models are trained "
                              f"with), got {self.crop_pct!r}")
        if self.resize_size is not None and not all(
                s <= r <= 2 * s for r, s in zip(self.resize_size, self.image_hw, strict=True)):
            raise ConfigError(f"ViTConfig.resize_size {self.resize_size} must lie between image_size "
                              f"{self.image_hw} and twice it (a resize before a centre crop)")
        if self.interpolation not in _RESAMPLE_PIL:
            raise ConfigError(
                f"ViTConfig.interpolation {self.interpolation!r} is not one of {sorted(_RESAMPLE_PIL)}"
            )
        self._validate_family()

    def _validate_family(self) -> None:
        for name, allowed in (("classifier_input", CLASSIFIER_INPUTS), ("pooling", POOLINGS), ("task", TASKS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"ViTConfig.{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("num_register_tokens", "projection_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1 << 16:
                raise ConfigError(f"ViTConfig.{name} must be a count from 0, got {value!r}")
        if self.layerscale_value is not None and not self.layerscale_value > 0:
            raise ConfigError(f"ViTConfig.layerscale_value must be positive, got {self.layerscale_value!r}")
        if self.position_grid is not None and min(self.position_grid) <= 0:
            raise ConfigError(f"ViTConfig.position_grid must be positive, got {self.position_grid!r}")
        if self.distillation_token and not self.class_token:
            raise ConfigError("ViTConfig.distillation_token needs class_token")
        if not self.class_token and self.pooling == "cls":
            raise ConfigError("a model without a class token (SigLIP) pools its embedding with pooling='map'")
        if not self.class_token and self.task == "classification" and self.classifier_input.startswith("cls"):
            raise ConfigError("a classifier without a class token (SigLIP) reads the mean of its patch tokens: "
                              "classifier_input='patch_mean' (or its pooling head's output: 'map')")
        if self.classifier_input == "map" and self.pooling != "map":
            raise ConfigError("ViTConfig.classifier_input 'map' reads the attention-pooling head: it needs "
                              "pooling='map'")
        if self.classifier_input == "cls_distilled" and not self.distillation_token:
            raise ConfigError("ViTConfig.classifier_input 'cls_distilled' needs distillation_token")
        if self.normalize and self.task != "embedding":
            raise ConfigError("ViTConfig.normalize applies to task='embedding' only")

    # -- derived ------------------------------------------------------------------------
    @property
    def image_hw(self) -> tuple[int, int]:
        return to_2tuple(self.image_size)

    @property
    def patch_hw(self) -> tuple[int, int]:
        return to_2tuple(self.patch_size)

    @property
    def num_patches(self) -> int:
        (ih, iw), (ph, pw) = self.image_hw, self.patch_hw
        return (ih // ph) * (iw // pw)

    @property
    def pooling_head(self) -> bool:
        """Whether the output passes the attention-pooling head (SigLIP's embedding; timm's SigLIP classifier)."""
        return self.pooling == "map" and (self.task == "embedding" or self.classifier_input == "map")

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: [CLS], DeiT's distillation token, DINOv2's registers."""
        return int(self.class_token) + int(self.distillation_token) + self.num_register_tokens

    @property
    def seq_len(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @property
    def embedding_size(self) -> int:
        """The width of the embedding (CLIP: its projection's)."""
        return self.projection_dim or self.hidden_size

    @property
    def output_size(self) -> int:
        """Values per image of the model's output: num_labels for a classifier, else the embedding's width."""
        return self.num_labels if self.task == "classification" else self.embedding_size

    @property
    def labels(self) -> list[str]:
        """One label per class, ``LABEL_i`` where the config names none (as HF does)."""
        names = self.id2label or {}
        return [names.get(i, f"LABEL_{i}") for i in range(self.num_labels)]

    def flops(self, batch: int = 1, *, full_last_layer: bool = False) -> int:
        """Floating-point operations of one forward pass of our classifier (2 per multiply-add of every
        matrix product: patch projection, Q/K/V, Q·Kᵀ, P·V, attention output, MLP, classifier on
        [CLS]). Its last block computes only the [CLS] row past the keys and values;
        ``full_last_layer=True`` counts every row there, as HF transformers' forward pass does."""
        (ph, pw), h, s, i = self.patch_hw, self.hidden_size, self.seq_len, self.intermediate_size
        patch = self.num_patches * self.num_channels * ph * pw * h
        mlp = 3 if self.use_swiglu_ffn else 2  # SwiGLU: gate and up to i, down from i
        layer = 4 * s * h * h + 2 * s * s * h + mlp * s * h * i
        # [CLS] only: K and V of every row; Q, Q·Kᵀ, P·V, attention output and MLP of one row
        cls_only = (self.classifier_input if self.task == "classification" else self.pooling) == "cls"
        last = layer if full_last_layer or not cls_only else 2 * s * h * h + 2 * h * h + 2 * s * h + mlp * h * i
        # the head (family heads beyond ViT's are counted approximately: their matrix products only)
        head = h * self.num_labels if self.task == "classification" else h * self.projection_dim
        if self.task == "classification" and self.classifier_input in ("cls_distilled", "cls_patch_mean"):
            head *= 2
        probe = 0
        if self.pooling_head:  # SigLIP's probe: its Q once per batch,
            head += h * h + 2 * s * h * h + 2 * s * h + 2 * h * i  # K and V of every row, output, MLP
            probe = h * h
        return 2 * batch * (patch + (self.num_hidden_layers - 1) * layer + last + head) + 2 * probe

    def replace(self, **changes: Any) -> ViTConfig:
        return dataclasses.replace(self, **changes)

    # -- HF config.json -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """HF ``config.json`` fields, plus our preprocessing keys (HF ignores unknown keys)."""
        d: dict[str, Any] = {"architectures": ["ViTForImageClassification"]}
        if self.model_type != "vit":  # a family member's config is ours, not HF's: read back as is
            d = {"architectures": [], OWN_CONFIG: True}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "id2label"):
                continue
            value = getattr(self, f.name)
            d[f.name] = list(value) if isinstance(value, tuple) else value
        if self.model_type != "vit" and self.id2label is None:
            return d  # ours, read back as is: no invented names
        labels = self.labels
        d["id2label"] = {str(i): name for i, name in enumerate(labels)}
        d["label2id"] = {name: i for i, name in enumerate(labels)}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"a config is a JSON object, not a {type(d).__name__}")
        if d.get("model_type", "vit") != "vit" and not d.get(OWN_CONFIG):
            from vitdeploy.families import config_from_hf

            return config_from_hf(d)  # each family reads its own HF config.json; others are refused
        if "transformers_version" in d and "id2label" not in d and "num_labels" not in d:
            return cls.from_fields(d, num_labels=HF_NUM_LABELS)  # transformers leaves its default out
        return cls.from_fields(d)

    @classmethod
    def from_fields(cls, d: dict[str, Any], **overrides: Any) -> ViTConfig:
        """A config from a dict of our field names (HF ViT's are ours); unknown keys kept in ``extra``."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "id2label" in d and "num_labels" not in d:
            kwargs["num_labels"] = len(d["id2label"])
        extra = {k: v for k, v in d.items() if k not in known}
        try:
            return cls(**{**kwargs, **overrides}, extra=extra)
        except TypeError as e:  # a field of the wrong type (a string for a number, ...)
            raise ConfigError(f"config has a field of the wrong type: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> ViTConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
        except RecursionError:
            raise ConfigError(f"cannot read config {path}: nested too deep") from None
        return cls.from_dict(d)

    def save(self, path: str | Path) -> None:
        from vitdeploy.io import atomic_write_bytes

        atomic_write_bytes(Path(path), self.to_json().encode())

    def apply_preprocessor_config(self, d: dict[str, Any]) -> ViTConfig:
        """Take mean/std/resample and the resize from an HF ``preprocessor_config.json``: a shortest-edge
        resize then a centre crop (CLIPImageProcessor, BitImageProcessor for DINOv2) is ``crop_pct =
        crop / shortest_edge``; a resize to height x width without a crop (ViT, SigLIP) is ``crop_pct=None``."""
        if not isinstance(d, dict):
            raise ConfigError("preprocessor_config.json is not a JSON object")
        changes: dict[str, Any] = {}
        for key in ("image_mean", "image_std"):
            if key in d:
                if not (isinstance(d[key], list) and all(type(v) in (int, float) for v in d[key])):
                    raise ConfigError(f"preprocessor_config.json's {key} {str(d[key])[:40]} is not a list of numbers")
                changes[key] = tuple(d[key])
        if d.get("resample") in _PIL_RESAMPLE:
            changes["interpolation"] = _PIL_RESAMPLE[d["resample"]]
        if d.get("crop_pct"):
            if type(d["crop_pct"]) not in (int, float):  # a string or a boolean: no crop anyone trained with
                raise ConfigError(f"preprocessor_config.json's crop_pct {str(d['crop_pct'])[:40]!r} is not a number")
            changes["crop_pct"] = float(d["crop_pct"])
        elif "size" in d:
            changes["crop_pct"] = _hf_crop_pct(d)
            changes["resize_size"] = self._hf_resize_size(d) if changes["crop_pct"] is not None else None
        return self.replace(**changes) if changes else self

    def _hf_resize_size(self, d: dict[str, Any]) -> tuple[int, int] | None:
        """A resize to height x width before the crop (DeiTImageProcessor), scaled from its crop to the model's
        input; None for a shortest-edge resize."""
        size, crop = d.get("size"), d.get("crop_size")
        if not (isinstance(size, dict) and "height" in size and "shortest_edge" not in size):
            return None
        pairs = [(size.get(k), crop if isinstance(crop, int) else (crop or {}).get(k)) for k in ("height", "width")]
        if not all(type(s) is int and type(c) is int and 0 < c <= s for s, c in pairs):
            raise ConfigError(f"preprocessor_config.json's size {str(size)[:60]} and crop_size {str(crop)[:60]} "
                              "are not a resize then a smaller centre crop")
        height, width = (round(side * s / c) for side, (s, c) in zip(self.image_hw, pairs, strict=True))
        return height, width


def _hf_crop_pct(d: dict[str, Any]) -> float | None:
    """An HF image processor's resize and crop as timm's crop_pct (None: resized straight to the input)."""
    size, crop = d.get("size"), d.get("crop_size")
    shortest = size if isinstance(size, int) else size.get("shortest_edge") if isinstance(size, dict) else None
    if isinstance(size, dict) and shortest is None and "height" in size:
        shortest = size["height"] if d.get("do_center_crop") else None  # DeiT: 256x256, then a 224 crop
    if not d.get("do_center_crop", True) or shortest is None or crop is None:
        return None
    side = crop if isinstance(crop, int) else crop.get("height") if isinstance(crop, dict) else None
    if not (isinstance(side, int) and isinstance(shortest, int) and 0 < side <= shortest):
        raise ConfigError(f"preprocessor_config.json's size {size!r} and crop_size {crop!r} are not a resize "
                          "then a smaller centre crop")
    return side / shortest


# name -> (hidden, layers, heads, mlp). timm/HF's published sizes.
_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (192, 12, 3, 768),
    "small": (384, 12, 6, 1536),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "huge": (1280, 32, 16, 5120),
}
_PRESET_RE = re.compile(r"^vit-(tiny|small|base|large|huge)-patch(16|32)-224$")
PRESETS: tuple[str, ...] = tuple(
    f"vit-{size}-patch{patch}-224" for size in _SIZES for patch in (16, 32)
)


def preset(name: str, **overrides: Any) -> ViTConfig:
    """A named configuration such as ``vit-base-patch16-224`` (the default model), or a family member's
    (``dinov2-base``, ``clip-vit-base-patch16``, ...: vitdeploy.families)."""
    m = _PRESET_RE.match(name)
    if not m:
        from vitdeploy.families import family_preset, preset_names

        found = family_preset(name, **overrides)
        if found is None:
            raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join((*PRESETS, *preset_names()))}")
        return found
    hidden, layers, heads, mlp = _SIZES[m.group(1)]
    return ViTConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=mlp, patch_size=int(m.group(2)), image_size=224, **overrides,
    )


def is_preset(name: str) -> bool:
    from vitdeploy.families import preset_names

    return bool(_PRESET_RE.match(name)) or name in preset_names()
