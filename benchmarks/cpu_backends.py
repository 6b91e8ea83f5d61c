"""CPU backends side by side on vit-base-patch16-224, in one run, as ratios.

    python benchmarks/cpu_backends.py [--out bench-results] [--iters 20] [--batches 1,8]

Measures HF transformers torch eager FP32 (the baseline a user has today), our torch model
(FP32, bf16), our ONNX FP32 / FP16 / INT8 Q/DQ through ONNX Runtime (the INT8 file both with its
activation Q/DQ run as uint8, the default on x86, and as written) and OpenVINO (FP32 and its
bf16 hint). Prints the table, the machine, and the target ratios; top-1 agreement of the INT8 path
is measured on the trained digits model (random ViT-B weights have no meaningful top-1).
Needs the dev extra (transformers, scikit-learn) and optionally openvino.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vitdeploy.bench import add_speedups, measure
from vitdeploy.engines import open_runtime
from vitdeploy.engines.base import InputSpec, Runtime
from vitdeploy.exporters import ExportOptions, export_onnx


class HFRuntime(Runtime):
    """transformers' ViTForImageClassification, eager attention, FP32: what users run today."""

    backend = "hf-transformers"

    def __init__(self, folder: Path) -> None:
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.ViTForImageClassification.from_pretrained(
            folder, attn_implementation="eager").eval()
        self.spec = InputSpec("pixel_values", "float32", (3, 224, 224), 1, 256)
        self.metadata = None

    def describe(self) -> str:
        return "hf-transformers[cpu, eager] (fp32)"

    def _run(self, batch: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(self.torch.from_numpy(batch)).logits.numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--model", default="vit-base-patch16-224")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]

    from vitdeploy import save_model
    from vitdeploy.checkpoints import resolve
    from vitdeploy.datasets import write_digits

    work = Path(tempfile.mkdtemp(prefix="vitdeploy-bench-"))
    train, test = write_digits(work / "digits")
    ckpt = args.out / "vit-b16.safetensors"
    model = resolve(args.model, seed=0).model
    save_model(model, ckpt)
    hf_folder = work / "hf"
    hf_folder.mkdir()
    (hf_folder / "config.json").write_text(model.config.to_json())
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, hf_folder / "model.safetensors")

    onnx = {}
    for prec in ("fp32", "fp16", "int8"):
        t = time.perf_counter()
        opts = ExportOptions(dynamic_batch=True, precision=prec, calib_dir=train if prec == "int8" else None,
                             calib_samples=64)
        onnx[prec] = export_onnx(ckpt, args.out / f"vit-b16-{prec}.onnx", options=opts).path
        print(f"exported {prec} in {time.perf_counter() - t:.1f} s", file=sys.stderr)

    runtimes: list[tuple[str, Runtime]] = [("HF transformers", HFRuntime(hf_folder)),
                                           ("ours torch", open_runtime(ckpt, dtype="fp32")),
                                           ("ours torch", open_runtime(ckpt, dtype="bf16"))]
    for prec in ("fp32", "fp16", "int8"):
        runtimes.append((f"onnx {prec}", open_runtime(onnx[prec], backend="onnxruntime")))
    # the int8 Q/DQ file as written (int8 activations), beside the default (uint8 on x86, see the backend)
    runtimes.append(("onnx int8", open_runtime(onnx["int8"], backend="onnxruntime", qdq_activations="int8")))
    if importlib.util.find_spec("openvino"):
        runtimes.append(("onnx fp32", open_runtime(onnx["fp32"], backend="openvino", precision_hint="f32")))
        runtimes.append(("onnx fp32", open_runtime(onnx["fp32"], backend="openvino", precision_hint="bf16")))
        runtimes.append(("onnx int8", open_runtime(onnx["int8"], backend="openvino", precision_hint="f32")))

    results = []
    for batch in batches:
        for name, rt in runtimes:
            iters = args.iters if batch == 1 else max(5, args.iters // 2)
            r = measure(rt, batch, warmup=3, iters=iters, name=name)
            print(f"  {name:18s} {r.backend:40s} b{batch}: {r.latency_ms.median / batch:8.2f} ms/img",
                  file=sys.stderr)
            results.append(r)
    add_speedups(results)

    # top-1 agreement of the INT8 Q/DQ artifact with FP32, on the trained digits model
    from vitdeploy.datasets import train_digits_vit
    from vitdeploy.evaluate import evaluate_folder

    dckpt = work / "digits.safetensors"
    save_model(train_digits_vit(train), dckpt)
    d32 = export_onnx(dckpt, work / "d32.onnx", options=ExportOptions(dynamic_batch=True)).path
    d8 = export_onnx(dckpt, work / "d8.onnx", options=ExportOptions(
        dynamic_batch=True, precision="int8", calib_dir=train, calib_samples=256)).path
    e32 = evaluate_folder(open_runtime(d32), test)
    agreement = {}
    for label, rt in [("onnxruntime int8", open_runtime(d8)),
                      ("onnxruntime int8 as written", open_runtime(d8, qdq_activations="int8"))] + (
            [("openvino int8", open_runtime(d8, backend="openvino", precision_hint="f32"))]
            if importlib.util.find_spec("openvino") else []):
        e = evaluate_folder(rt, test)
        agreement[label] = {"accuracy": e.accuracy, "agreement_with_fp32": float(
            np.mean(np.array(e.predictions) == np.array(e32.predictions)))}

    from rich.console import Console

    from vitdeploy import sysinfo
    from vitdeploy.bench import BenchReport

    report = BenchReport(results, sysinfo.machine(), sysinfo.library_versions(), {"batches": batches})
    Console(width=200).print(report.table())
    ratios = {}
    for batch in batches:
        rows = [r for r in results if r.batch == batch]
        hf = rows[0].latency_ms.mean
        ort32 = next(r for r in rows if r.name == "onnx fp32" and r.backend.startswith("onnxruntime")).latency_ms.mean
        best = min(rows, key=lambda r: r.latency_ms.mean)
        ratios[f"batch {batch}"] = {
            "onnx_fp32_vs_hf": hf / ort32, "best": f"{best.name} {best.backend}",
            "best_vs_hf": hf / best.latency_ms.mean, "best_vs_onnx_fp32": ort32 / best.latency_ms.mean,
            "ms_per_image": {f"{r.name} {r.backend} {r.precision}": r.latency_ms.mean / batch for r in rows},
        }
    summary = {"machine": report.machine, "ratios": ratios, "digits_agreement": agreement,
               "digits_fp32_accuracy": e32.accuracy}
    print(json.dumps(summary, indent=2))
    report.write_json(args.out / "cpu_backends.json")
    (args.out / "cpu_backends_summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
