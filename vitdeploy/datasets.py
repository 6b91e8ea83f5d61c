"""scikit-learn's bundled digits as an image folder, and a tiny ViT trained on it in seconds, in the shape
of any family (DeiT, DINOv2, CLIP, SigLIP: their tokens, blocks and heads at a tiny width).

Real accuracy numbers for FP32 / FP16 / INT8 need a trained model; nothing is downloaded. An embedding
family (CLIP, SigLIP, DINOv2 as a backbone) is trained through a cosine-softmax head on its embedding
(:class:`CosineHead`, as retrieval models are trained), which is dropped after: the checkpoint gives
embeddings, scored by k-nearest neighbours under the cosine they were trained for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

DIGIT_LABELS = [str(i) for i in range(10)]
# each family's block options at the digits model's size (vitdeploy.families sets the same from HF configs)
FAMILY_SHAPES: dict[str, dict[str, Any]] = {
    "vit": {},
    "deit": {"model_type": "deit", "distillation_token": True, "classifier_input": "cls_distilled"},
    "dinov2": {"model_type": "dinov2", "layerscale_value": 1.0, "classifier_input": "cls_patch_mean",
               "layer_norm_eps": 1e-6},
    "dinov2-registers": {"model_type": "dinov2_with_registers", "layerscale_value": 1.0, "num_register_tokens": 4,
                         "layer_norm_eps": 1e-6, "task": "embedding"},
    "clip": {"model_type": "clip_vision_model", "pre_norm": True, "patch_bias": False, "hidden_act": "quick_gelu",
             "projection_dim": 32, "layer_norm_eps": 1e-5, "task": "embedding"},
    "siglip": {"model_type": "siglip_vision_model", "class_token": False, "pooling": "map",
               "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "task": "embedding"},
}


def digits_config(family: str = "vit", **overrides: Any) -> Any:
    """A small ViT at 224x224 for 10 digit classes (patch 32: 49 tokens), in ``family``'s shape."""
    from vitdeploy.config import ViTConfig
    from vitdeploy.errors import ConfigError

    if family not in FAMILY_SHAPES:
        raise ConfigError(f"no digits model for family {family!r}: choose one of {', '.join(FAMILY_SHAPES)}")
    defaults: dict[str, Any] = {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
        "patch_size": 32, "image_size": 224, "num_labels": 10, "id2label": dict(enumerate(DIGIT_LABELS)),
        "image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5), **FAMILY_SHAPES[family],
    }
    defaults.update(overrides)
    return ViTConfig(**defaults)


def write_digits(folder: str | Path, test_fraction: float = 0.25, seed: int = 0) -> tuple[Path, Path]:
    """digits (8x8, 16 grey levels) -> folder/{train,test}/<digit>/<i>.png at 32x32. Returns both dirs."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.images))
    n_test = int(len(order) * test_fraction)
    root = Path(folder)
    for split, idx in (("test", order[:n_test]), ("train", order[n_test:])):
        for i in idx:
            img = (data.images[i] * (255.0 / 16.0)).astype(np.uint8)
            out = root / split / str(int(data.target[i]))
            out.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, mode="L").resize((32, 32), Image.Resampling.NEAREST).save(out / f"{i}.png")
    return root / "train", root / "test"


def cosine_head(features: int, classes: int, scale: float = 16.0) -> Any:
    """NormFace's classifier: ``scale`` times the cosine between the L2-normalized embedding and each
    class's L2-normalized weight. Trained through it, an embedding's nearest neighbours by cosine share
    its class (a plain linear head separates classes by direction and length, and kNN reads only
    direction: the CLIP-shaped digits model reached 85% kNN top-1 through one, with near ties that
    any perturbation flips)."""
    import torch

    class CosineHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(classes, features) * features ** -0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            norm = torch.nn.functional.normalize
            return scale * norm(x, dim=-1) @ norm(self.weight, dim=-1).T

    return CosineHead()


def train_digits_vit(train_dir: str | Path, epochs: int = 20, seed: int = 0, batch_size: int = 64,
                     family: str = "vit") -> Any:
    """Train ``digits_config(family)`` on an image folder; returns the model in eval mode. An embedding
    model learns through a cosine head on its embedding (:func:`cosine_head`), returned without it."""
    import torch

    from vitdeploy.checkpoints import build_model
    from vitdeploy.preprocess import Preprocessing, labelled_images, load_images

    cfg = digits_config(family)
    files, classes = labelled_images(train_dir)
    x = torch.from_numpy(load_images(files, Preprocessing.from_config(cfg)))
    y = torch.tensor([int(c) for c in classes])
    torch.manual_seed(seed)
    base = build_model(cfg, seed=seed)
    model = base if cfg.task == "classification" else torch.nn.Sequential(
        base, cosine_head(cfg.output_size, len(DIGIT_LABELS)))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return base.eval()


def main(argv: list[str] | None = None) -> None:
    """``python -m vitdeploy.datasets OUT_DIR``: digits folders and a trained checkpoint, with its accuracy."""
    import argparse
    import time

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--family", choices=list(FAMILY_SHAPES), default="vit",
                    help="train the digits model in this family's shape (its tokens, blocks and head)")
    args = ap.parse_args(argv)
    from vitdeploy.checkpoints import save_model
    from vitdeploy.engines.torch_backend import TorchRuntime
    from vitdeploy.evaluate import evaluate_folder

    train, test = write_digits(args.out / "digits")
    t0 = time.perf_counter()
    model = train_digits_vit(train, epochs=args.epochs, family=args.family)
    name = "digits_vit" if args.family == "vit" else f"digits_{args.family.replace('-', '_')}"
    ckpt = args.out / f"{name}.safetensors"
    save_model(model, ckpt)
    if model.config.task == "classification":
        score = f"held-out top-1 {evaluate_folder(TorchRuntime(ckpt), test).accuracy * 100:.1f}% ({test})"
    else:
        score = f"held-out 1-nearest-neighbour top-1 {knn_top1(model, train, test) * 100:.1f}% ({test})"
    print(f"trained in {time.perf_counter() - t0:.0f} s: {ckpt}, {score}; try: vitdeploy export --model {ckpt} "
          f"--output {name}.onnx --precision int8 --calib-dir {train}")


def knn_top1(model: Any, train_dir: str | Path, test_dir: str | Path) -> float:
    """1-nearest-neighbour top-1 (cosine) of an embedding model's vectors: test images against train images."""
    import torch

    from vitdeploy.preprocess import Preprocessing, labelled_images, load_images

    prep = Preprocessing.from_config(model.config)
    vectors = []
    for folder in (train_dir, test_dir):
        files, classes = labelled_images(folder)
        with torch.no_grad():
            v = model(torch.from_numpy(load_images(files, prep))).numpy()
        vectors.append((v / np.linalg.norm(v, axis=1, keepdims=True), np.asarray(classes)))
    (train_v, train_c), (test_v, test_c) = vectors
    nearest = (test_v @ train_v.T).argmax(axis=1)
    return float(np.mean(train_c[nearest] == test_c))


if __name__ == "__main__":
    main()
