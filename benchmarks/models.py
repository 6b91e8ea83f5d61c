"""The docs/models.md table: each family member at its real size (random init from HF's own configs),
loaded by vitdeploy from the files HF's save_pretrained writes, against HF transformers.

Per model: the largest difference of vitdeploy's torch model and of its FP32 ONNX (ONNX Runtime) to HF
transformers' output (logits or embedding) on the same inputs, and the cosine to HF of the FP16, INT8 and
FP8 exports (INT8/FP8 calibrated on the digits images: random weights, so only the graph's agreement is
measured here, not accuracy). The machine and library versions are printed with the table.

    python benchmarks/models.py [--models vit-b16,dinov2-b14] [--precisions fp32,fp16] [--out bench-results]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# name: (HF class, its config class, the config's fields as on the Hub, what the output is)
MODELS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "vit-b16": ("ViTForImageClassification", "ViTConfig", {}, "logits"),
    "deit-b16-distilled": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", {}, "logits"),
    "dinov2-b14": ("Dinov2Model", "Dinov2Config", {"image_size": 518}, "pooler_output"),
    "dinov2-b14-reg": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", {"image_size": 518},
                       "pooler_output"),
    "clip-b16": ("CLIPVisionModelWithProjection", "CLIPVisionConfig", {"patch_size": 16, "projection_dim": 512},
                 "image_embeds"),
    "clip-l14": ("CLIPVisionModelWithProjection", "CLIPVisionConfig",
                 {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                  "patch_size": 14, "projection_dim": 768}, "image_embeds"),
    "siglip-b16": ("SiglipVisionModel", "SiglipVisionConfig", {"patch_size": 16}, "pooler_output"),
}


def hf_folder(name: str, root: Path) -> tuple[Any, Path]:
    """The HF model with random weights (seed 0, perturbed off its init values), saved as a user's folder."""
    import torch
    import transformers

    cls_name, cfg_name, fields, _ = MODELS[name]
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**fields)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    folder = root / name
    model.save_pretrained(folder)
    return model, folder


def hf_output(model: Any, name: str, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return getattr(model(pixel_values=torch.from_numpy(x)), MODELS[name][3]).numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def measure_model(name: str, root: Path, precisions: list[str], calib: Path) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from vitdeploy import load_model
    from vitdeploy.exporters import ExportOptions, export_onnx

    theirs, folder = hf_folder(name, root)
    ours = load_model(folder)
    h, w = ours.config.image_hw
    x = np.random.default_rng(0).standard_normal((2, 3, h, w)).astype(np.float32)
    ref = hf_output(theirs, name, x)
    with torch.no_grad():
        row: dict[str, Any] = {"model": name, "task": ours.config.task, "output": ref.shape[1],
                               "torch_max_abs": float(np.abs(ours(torch.from_numpy(x)).numpy() - ref).max())}
    del theirs
    for precision in precisions:
        out = root / f"{name}-{precision}.onnx"
        t0 = time.perf_counter()
        try:
            report = export_onnx(folder, out, options=ExportOptions(
                batch=2, precision=precision, calib_dir=calib if precision in ("int8", "fp8") else None,
                calib_samples=32))
        except Exception as e:  # a row per failure, the table goes on
            row[precision] = f"failed: {str(e).splitlines()[0][:120]}"
            continue
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        feed = x.astype(np.float16) if "float16" in session.get_inputs()[0].type else x
        got = session.run(None, {"pixel_values": feed})[0].astype(np.float32)
        row[precision] = {"max_abs": float(np.abs(got - ref).max()), "cosine": cosine(got, ref),
                          "export_s": round(time.perf_counter() - t0, 1),
                          "golden": report.golden.passed if report.golden else None}
        for f in root.glob(f"{name}-{precision}.onnx*"):
            f.unlink()
    return row


def render(rows: list[dict[str, Any]], precisions: list[str]) -> str:
    head = "| model | task | output | torch vs HF max abs | " + " | ".join(
        f"{p} ONNX vs HF" for p in precisions) + " |"
    lines = [head, "|" + "---|" * (4 + len(precisions))]
    for r in rows:
        cells = []
        for p in precisions:
            v = r.get(p)
            cells.append(v if isinstance(v, str) else f"max abs {v['max_abs']:.2g}, cosine {v['cosine']:.6f}"
                         if v else "-")
        lines.append(f"| {r['model']} | {r['task']} | {r['output']} | {r['torch_max_abs']:.2g} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--precisions", default="fp32,fp16,int8,fp8")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args()
    from vitdeploy.datasets import write_digits
    from vitdeploy.sysinfo import cpu_model

    precisions = args.precisions.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="vitdeploy-models-"))
    train, _ = write_digits(root / "digits")
    rows = []
    for name in args.models.split(","):
        rows.append(measure_model(name, root, precisions, train))
        print(json.dumps(rows[-1]), flush=True)
    import onnxruntime
    import torch
    import transformers

    print(f"\n{render(rows, precisions)}\n\nCPU: {cpu_model()}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, onnxruntime {onnxruntime.__version__}")
    (args.out / "models.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
