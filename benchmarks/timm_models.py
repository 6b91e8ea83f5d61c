"""The docs/models.md timm table: each family's timm model at its real size, saved as a timm folder and loaded
by vitdeploy with no config, against timm's own output.

Per model: timm's model (``pretrained=False``, seed 0, every weight perturbed off its init value as
benchmarks/models.py does for HF; an image-text CLIP's projection bias left at the zeros timm's conversion
writes), saved with timm's ``save_for_hf`` (config.json + model.safetensors), loaded with
``vitdeploy.load_model(folder)``; the largest difference to timm's output on two random-normal inputs at the
model's size, of vitdeploy's torch model and (where onnxruntime imports) of its FP32 ONNX on ONNX Runtime.
Needs timm (and so torch >= 2.14): run it in a venv with timm. Nothing is downloaded.

    python benchmarks/timm_models.py [--models deit_base_distilled_patch16_224,...] [--no-onnx]
                                     [--out bench-results]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# timm architecture with the tag whose head it builds (CLIP's openai: the projection; others as timm defaults)
MODELS = ("deit_base_distilled_patch16_224.fb_in1k", "vit_base_patch14_dinov2.lvd142m",
          "vit_base_patch14_reg4_dinov2.lvd142m", "vit_base_patch16_clip_224.openai",
          "vit_large_patch14_clip_224.openai", "vit_base_patch16_siglip_224.webli",
          "vit_base_patch16_224.augreg2_in21k_ft_in1k")


def timm_folder(name: str, root: Path) -> tuple[Any, Path]:
    """timm's model with random weights (seed 0, perturbed), saved as timm saves a folder for the Hub."""
    import timm
    import torch
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if not (key == "head.bias" and "_clip_" in name and not p.any()):  # CLIP's projection: no bias
                p.add_(torch.randn_like(p) * 0.02)
    folder = root / name
    save_for_hf(model, str(folder), safe_serialization=True)
    return model, folder


def onnx_max_abs(folder: Path, out: Path, x: np.ndarray, ref: np.ndarray) -> dict[str, Any] | str:
    """The FP32 export's largest difference to timm on ONNX Runtime, or why there is none."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime does not import here"
    from vitdeploy.exporters import ExportOptions, export_onnx

    t0 = time.perf_counter()
    try:
        report = export_onnx(folder, out, options=ExportOptions(batch=x.shape[0], precision="fp32"))
    except Exception as e:  # a cell per failure, the table goes on
        return f"failed: {str(e).splitlines()[0][:120]}"
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]
    out.unlink()
    return {"max_abs": float(np.abs(got - ref).max()), "export_s": round(time.perf_counter() - t0, 1),
            "golden": report.golden.passed if report.golden else None}


def measure(name: str, root: Path, onnx: bool) -> dict[str, Any]:
    import torch

    from vitdeploy.checkpoints import resolve

    theirs, folder = timm_folder(name, root)
    loaded = resolve(folder)
    ours, c = loaded.model, loaded.model.config
    h, w = c.image_hw
    x = np.random.default_rng(0).standard_normal((2, 3, h, w)).astype(np.float32)
    with torch.no_grad():
        ref = theirs(torch.from_numpy(x)).numpy()
        got = ours(torch.from_numpy(x)).numpy()
    del theirs
    row: dict[str, Any] = {"model": name, "family": c.model_type, "task": c.task, "output": int(ref.shape[1]),
                           "input": f"{h}x{w}", "timm_max_value": float(np.abs(ref).max()),
                           "torch_max_abs": float(np.abs(got - ref).max())}
    if onnx:
        row["fp32_onnx"] = onnx_max_abs(folder, root / f"{name}.onnx", x, ref)
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    return row


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| timm model | read as | task, output | input | torch vs timm, max abs | FP32 ONNX vs timm, max abs |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        v = r.get("fp32_onnx")
        onnx = "-" if v is None else v if isinstance(v, str) else f"{v['max_abs']:.1e}"
        lines.append(f"| `{r['model']}` | {r['family']} | {r['task']}, {r['output']} | {r['input']} | "
                     f"{r['torch_max_abs']:.1e} | {onnx} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--no-onnx", action="store_true", help="skip the FP32 ONNX export and its ONNX Runtime run")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args()
    import timm
    import torch

    from vitdeploy.sysinfo import cpu_model

    args.out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="vitdeploy-timm-"))
    rows = []
    for name in args.models.split(","):
        rows.append(measure(name, root, not args.no_onnx))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{render(rows)}\n\nCPU: {cpu_model()}; torch {torch.__version__}, timm {timm.__version__}")
    (args.out / "timm_models.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
