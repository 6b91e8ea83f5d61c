"""Checkpoints -> our model: presets, HF folders, timm weights, our own files and Hub ids.

Every family of vitdeploy.families loads from its HF folders (a ``clip``/``siglip`` folder: its vision
half), Hub ids in the local cache, bare safetensors beside a config.json, and presets; each family's key
map puts its HF names into ours. timm weights (timm's VisionTransformer names) of every family load from a
timm folder (timm's ``save_for_hf``/``push_to_hf_hub``: config.json and model.safetensors) with no config
given: its ``architecture`` names the family (vitdeploy.families.timm_folder), its tensors' shapes the sizes,
its ``pretrained_cfg`` the preprocessing; bare timm weights load with ``--config``/``--preset``.

Only safetensors and ``torch.load(weights_only=True)`` are used: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitdeploy.config import ViTConfig, is_preset, preset
from vitdeploy.errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from vitdeploy.model import ViTForImageClassification

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")
_OWN_FORMAT = "vitdeploy"


@dataclass
class LoadedCheckpoint:
    """What a source resolved to: the model plus where it came from (for artifact metadata)."""

    model: ViTForImageClassification
    source: str
    kind: str  # preset | hf | timm | vitdeploy
    sha256: str | None


# -- state-dict conversion (plain functions) -----------------------------------------------
def timm_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ``VisionTransformer`` keys -> HF ``ViTForImageClassification`` keys (fused qkv split): our names,
    which are HF ViT's (vitdeploy.families.base.timm_keys, every family's)."""
    from vitdeploy.families.base import timm_keys

    return timm_keys(state)


def _unwrap(state: Any) -> dict[str, torch.Tensor]:
    import torch

    if isinstance(state, dict):
        for wrapper in ("state_dict", "model", "model_state_dict", "module"):
            if wrapper in state and isinstance(state[wrapper], dict):
                return _unwrap(state[wrapper])
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if tensors:
            prefix = "module."
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix):]: v for k, v in tensors.items()}
            return tensors
    raise CheckpointError("the file holds no state dict of tensors")


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    from vitdeploy.families import detect_family

    if any(k.startswith("vit.") for k in state) or detect_family(state) is not None:
        return "hf"
    if "cls_token" in state or any(k.startswith("blocks.") for k in state):
        return "timm"
    if any(k.startswith(("embeddings.", "vision_model.", "encoder.")) for k in state):
        return "hf"
    raise CheckpointError(
        "unrecognised checkpoint layout: expected HF keys (vit.embeddings..., dinov2..., vision_model...) "
        "or timm keys (blocks.N...)"
    )


def to_our_names(state: dict[str, torch.Tensor], layout: str, config: ViTConfig,
                 source: str) -> tuple[dict[str, torch.Tensor], ViTConfig]:
    """A checkpoint's state dict in our names (its family's key map), and the config it loads with."""
    from vitdeploy.families import hf_to_ours, timm_to_ours

    if layout == "timm":  # every family's timm names (vitdeploy.families.base.timm_keys), with timm's eps etc.
        state, config = timm_to_ours(state, config)
    else:
        state = hf_to_ours(state, config)
    if config.task == "classification" and "classifier.weight" not in state:
        raise CheckpointError(f"{source} has no classifier head (a base model): use it for embeddings "
                              "(--task embedding)")
    return state, config


def with_options(config: ViTConfig, *, task: str | None = None, normalize: bool | None = None,
                 image_size: int | None = None, trained: bool = True) -> ViTConfig:
    """``config`` with an export's choices: the task, L2-normalized embeddings, another input size
    (``trained``: weights exist whose positions were learned at the config's size)."""
    from vitdeploy.families import family_for

    changes: dict[str, Any] = {}
    family = family_for(config.model_type)
    if task is not None and task != config.task:
        if task not in family.tasks:
            raise CheckpointError(f"a {config.model_type} model gives {' or '.join(family.tasks)}, not {task}: "
                                  f"use --task {family.tasks[0]}")
        changes["task"] = task
    if normalize is not None:
        changes["normalize"] = normalize
    if image_size is not None and (image_size, image_size) != config.image_hw:
        if trained and not family.resizes_positions:
            raise CheckpointError(
                f"--image-size {image_size}: a {config.model_type} model's position embeddings are trained at "
                f"{config.image_hw[0]}x{config.image_hw[1]}; only DINOv2 interpolates them to another size")
        changes["image_size"] = image_size
        if config.resize_size is not None:  # the resize before the crop, in the same ratio to the input
            (h, w), (rh, rw) = config.image_hw, config.resize_size
            changes["resize_size"] = (round(image_size * rh / h), round(image_size * rw / w))
        if trained:
            changes["position_grid"] = config.position_grid or (config.image_hw[0] // config.patch_hw[0],
                                                                config.image_hw[1] // config.patch_hw[1])
    return config.replace(**changes) if changes else config


# -- reading files ---------------------------------------------------------------------------
def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and (for safetensors) the header metadata of one weights file."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({e})") from None
    if path.suffix in (".pth", ".pt", ".bin"):
        import pickle

        import torch

        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"checkpoint {path} cannot be read as a weights-only torch file ({first})"
            ) from None
        return _unwrap(state), {}
    raise CheckpointError(f"checkpoint {path} has an unknown suffix: use one of {', '.join(_WEIGHT_SUFFIXES)}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _config_from_arg(config: ViTConfig | str | Path | None) -> ViTConfig | None:
    if config is None or isinstance(config, ViTConfig):
        return config
    text = str(config)
    if is_preset(text):
        return preset(text)
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return ViTConfig.from_json_file(path)
    try:
        return preset(text)
    except ValueError:
        raise CheckpointError(f"config {text!r} is neither a preset name nor a config.json file") from None


def build_model(config: ViTConfig, state: dict[str, torch.Tensor] | None = None,
                seed: int | None = None) -> ViTForImageClassification:
    """Our model for ``config``; ``state`` (HF key names) loaded strictly, else seeded random init."""
    import torch

    from vitdeploy.model import ViTForImageClassification

    if state is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0 if seed is None else seed)
            model = ViTForImageClassification(config)
    else:
        with torch.device("meta"):
            model = ViTForImageClassification(config)
        load_state_dict_strict(model, state)
    return model.eval()


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load with every missing key, unexpected key and shape mismatch listed in one error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
        if items:
            shown = ", ".join(items[:12]) + (f", ... ({len(items) - 12} more)" if len(items) > 12 else "")
            problems.append(f"{label} ({len(items)}): {shown}")
    if problems:
        raise CheckpointError("checkpoint does not match the model config; " + "; ".join(problems))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)


# -- folders ----------------------------------------------------------------------------------
def _weights_in(folder: Path) -> Path:
    for name in _HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return index
    raise CheckpointError(
        f"model folder {folder} has no weights: expected model.safetensors or pytorch_model.bin"
    )


def _read_folder_weights(weights: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if weights.name.endswith(".index.json"):
        shards = sorted(set(json.loads(weights.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(read_state_dict(weights.parent / shard)[0])
        return state, {}
    return read_state_dict(weights)


def _timm_config(d: dict[str, Any], state: dict[str, torch.Tensor]) -> ViTConfig:
    """A timm folder's config.json with its weights (vitdeploy.families.timm_folder), errors as CheckpointError."""
    from vitdeploy.errors import ConfigError
    from vitdeploy.families.timm_folder import timm_folder_config

    try:
        return timm_folder_config(d, state)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _is_timm_config(raw: Any) -> bool:
    """timm's config.json (``save_for_hf``) names an ``architecture``; HF's names ``architectures``."""
    return isinstance(raw, dict) and "architecture" in raw


def _json_file(path: Path) -> Any:
    """A checkpoint's JSON file (untrusted): one-line CheckpointError when it is not JSON or nested too deep."""
    try:
        return json.loads(path.read_text())
    except RecursionError:
        raise CheckpointError(f"{path} is nested too deep to be a model's configuration") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not JSON ({type(e).__name__}: {' '.join(str(e).split())[:80]})") from None


def _load_folder(folder: Path, config: ViTConfig | None,
                 options: dict[str, Any]) -> tuple[ViTForImageClassification, str, Path]:
    cfg_file = folder / "config.json"
    raw = _json_file(cfg_file) if cfg_file.is_file() else {}
    weights = _weights_in(folder)
    state = None
    if config is None:
        if not raw:
            raise CheckpointError(f"model folder {folder} has no config.json: pass --config or --preset")
        if _is_timm_config(raw):  # read with its weights' shapes
            state, _ = _read_folder_weights(weights)
            config = _timm_config(raw, state)
        else:  # an HF config.json is checked before the weights are read
            config = ViTConfig.from_dict(raw)
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            config = config.apply_preprocessor_config(_json_file(pre))
    config = with_options(config, **options)
    if state is None:
        state, _ = _read_folder_weights(weights)
    layout = detect_layout(state)
    state, config = to_our_names(state, layout, config, str(folder))
    return build_model(config, state), layout, weights


# -- public -----------------------------------------------------------------------------------
def resolve(source: str | Path, config: ViTConfig | str | Path | None = None, seed: int | None = None, *,
            task: str | None = None, normalize: bool | None = None, image_size: int | None = None) -> LoadedCheckpoint:
    """Resolve ``source`` to a model in eval mode; see :func:`load_model`. ``task``, ``normalize`` and
    ``image_size`` change what the checkpoint is read as (:func:`with_options`)."""
    cfg = _config_from_arg(config)
    options: dict[str, Any] = {"task": task, "normalize": normalize, "image_size": image_size}
    text = str(source)
    path = Path(text).expanduser()
    if is_preset(text) and not path.exists():
        base = with_options(cfg if cfg is not None else preset(text), **options, trained=False)
        return LoadedCheckpoint(build_model(base, seed=seed), text, "preset", None)
    if path.is_dir():
        model, layout, weights = _load_folder(path, cfg, options)
        return LoadedCheckpoint(model, text, layout, _sha256(weights))
    if path.is_file():
        return _load_file(path, cfg, options)
    if path.suffix in _WEIGHT_SUFFIXES or text.startswith((".", "/", "~")):
        raise CheckpointError(f"checkpoint {text} does not exist")
    if re.match(r"^[\w.-]+/[\w.-]+$", text):
        folder = _hub_snapshot(text)
        model, layout, weights = _load_folder(folder, cfg, options)
        return LoadedCheckpoint(model, text, layout, _sha256(weights))
    from vitdeploy.config import PRESETS

    raise CheckpointError(
        f"unknown model {text!r}: give a preset ({', '.join(PRESETS[:4])}, ...), a model folder, "
        "a weights file or a Hugging Face Hub id such as google/vit-base-patch16-224"
    )


def _load_file(path: Path, cfg: ViTConfig | None, options: dict[str, Any]) -> LoadedCheckpoint:
    """One weights file: ours (its config inside), or HF/timm weights with a config beside it or given."""
    state, meta = read_state_dict(path)
    if meta.get("format") == _OWN_FORMAT and "config" in meta:
        own = with_options(cfg or ViTConfig.from_dict(json.loads(meta["config"])), **options)
        if own.task == "embedding":
            from vitdeploy.families.base import HEAD_KEYS

            state = {k: v for k, v in state.items() if not HEAD_KEYS.match(k)}
        elif "classifier.weight" not in state:
            raise CheckpointError(f"{path.name} is an embedding model (no classifier head): use --task embedding")
        return LoadedCheckpoint(build_model(own, state), str(path), "vitdeploy", _sha256(path))
    layout = detect_layout(state)
    if cfg is None:
        sibling = path.parent / "config.json"
        raw = _json_file(sibling) if sibling.is_file() and layout == "timm" else None
        if _is_timm_config(raw):
            cfg = _timm_config(raw, state)
        elif sibling.is_file() and layout == "hf":
            cfg = ViTConfig.from_json_file(sibling)
        else:
            raise CheckpointError(
                f"{path.name} holds {layout} weights without a config: pass --preset NAME or --config FILE"
            )
    state, cfg = to_our_names(state, layout, with_options(cfg, **options), path.name)
    return LoadedCheckpoint(build_model(cfg, state), str(path), layout, _sha256(path))


def _hub_snapshot(repo_id: str) -> Path:
    """A Hub repo's files through huggingface_hub's cache (downloads when online)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - a declared dependency
        raise CheckpointError("loading a Hub id needs huggingface_hub: pip install huggingface_hub") from None
    patterns = ["config.json", "preprocessor_config.json", "*.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin"]
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        # the environment is read per call (huggingface_hub reads it once, at import)
        cache_dir = os.environ.get("HF_HUB_CACHE") or None
        folder = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline, cache_dir=cache_dir)
    except (LocalEntryNotFoundError, FileNotFoundError):
        raise CheckpointError(
            f"{repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
            "download it once online, or pass a local folder"
        ) from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"cannot fetch {repo_id} from the Hugging Face Hub: {str(e).splitlines()[0]}") from None
    except Exception as e:  # network errors come in many types; all end the same way for a user
        raise CheckpointError(f"cannot fetch {repo_id} from the Hugging Face Hub: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return Path(folder)


@dataclass(frozen=True)
class SourceFiles:
    """The files :func:`resolve` reads for a source, for a resume key to hash: ``root`` (paths are keyed
    relative to it), ``files``, and a Hub id's resolved revision (its snapshot's commit hash)."""

    root: Path | None
    files: list[Path]
    revision: str | None = None


def source_files(source: str | Path, config: str | Path | None = None) -> SourceFiles:
    """Every file :func:`resolve` reads for ``source``: a weights file and, without ``config``, the
    config.json beside it; every file of a model folder; a Hub id's snapshot in the local cache as
    ``refs/main`` resolves it now (downloading it when online, as loading it would); none for a preset
    (its name and seed are its identity). CheckpointError for a Hub id that cannot be resolved."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        sibling = path.parent / "config.json"
        return SourceFiles(path.parent, [path, *([sibling] if config is None and sibling.is_file() else [])])
    if path.is_dir():
        return SourceFiles(path, sorted(f for f in path.rglob("*") if f.is_file()))
    if not (is_preset(text) and not path.exists()) and re.match(r"^[\w.-]+/[\w.-]+$", text):
        folder = _hub_snapshot(text)
        return SourceFiles(folder, sorted(f for f in folder.rglob("*") if f.is_file()), folder.name)
    return SourceFiles(None, [])


def load_model(source: str | Path, config: ViTConfig | str | Path | None = None,
               seed: int | None = None, **options: Any) -> ViTForImageClassification:
    """A ViT (any family of vitdeploy.families) in eval mode from a preset, HF folder, timm weights, our
    checkpoint or a Hub id.

    ``config`` (a ViTConfig, preset name or config.json) is needed for bare timm/HF weight files
    and overrides a preset's architecture; ``seed`` fixes a preset's random init; ``options``: ``task``,
    ``normalize``, ``image_size`` (see :func:`resolve`).
    """
    return resolve(source, config, seed, **options).model


def save_model(model: ViTForImageClassification, path: str | Path) -> None:
    """Weights and config in one safetensors file that :func:`load_model` reads back."""
    from safetensors.torch import save_file

    from vitdeploy.io import atomic_path

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": _OWN_FORMAT, "config": model.config.to_json()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata=meta)
