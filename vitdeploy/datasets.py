"""scikit-learn's bundled digits as an image folder, and a tiny ViT trained on it in seconds.

Real accuracy numbers for FP32 / FP16 / INT8 need a trained model; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

DIGIT_LABELS = [str(i) for i in range(10)]


def digits_config(**overrides: Any) -> Any:
    """A small ViT at 224x224 for 10 digit classes (patch 32: 49 tokens)."""
    from vitdeploy.config import ViTConfig

    defaults: dict[str, Any] = {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
        "patch_size": 32, "image_size": 224, "num_labels": 10, "id2label": dict(enumerate(DIGIT_LABELS)),
        "image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5),
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


def train_digits_vit(train_dir: str | Path, epochs: int = 20, seed: int = 0, batch_size: int = 64) -> Any:
    """Train ``digits_config()`` on an image folder; returns the model in eval mode."""
    import torch

    from vitdeploy.checkpoints import build_model
    from vitdeploy.preprocess import Preprocessing, labelled_images, load_images

    cfg = digits_config()
    files, classes = labelled_images(train_dir)
    x = torch.from_numpy(load_images(files, Preprocessing.from_config(cfg)))
    y = torch.tensor([int(c) for c in classes])
    torch.manual_seed(seed)
    model = build_model(cfg, seed=seed).train()
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
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    """``python -m vitdeploy.datasets OUT_DIR``: digits folders and a trained checkpoint, with its accuracy."""
    import argparse
    import time

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args(argv)
    from vitdeploy.checkpoints import save_model
    from vitdeploy.engines.torch_backend import TorchRuntime
    from vitdeploy.evaluate import evaluate_folder

    train, test = write_digits(args.out / "digits")
    t0 = time.perf_counter()
    model = train_digits_vit(train, epochs=args.epochs)
    ckpt = args.out / "digits_vit.safetensors"
    save_model(model, ckpt)
    acc = evaluate_folder(TorchRuntime(ckpt), test).accuracy
    print(f"trained in {time.perf_counter() - t0:.0f} s: {ckpt}, held-out top-1 {acc * 100:.1f}% "
          f"({test}); try: vitdeploy export --model {ckpt} --output digits.onnx --precision int8 "
          f"--calib-dir {train}")


if __name__ == "__main__":
    main()
