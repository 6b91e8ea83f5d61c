"""Export time, peak memory and file size of vit-base-patch16-224 in FP32/FP16/INT8, and ONNX
Runtime CPU latency of each at batch 1 against HF transformers' torch model with its default
attention (SDPA), all on the same threads, in one run; the CPU is named in the output.

    python benchmarks/export.py [--out bench-results] [--iters 20]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path


def _export(args: tuple[str, str, str, str]) -> dict:
    """In a child process, so its peak RSS is the export's own."""
    ckpt, out, precision, calib = args
    from vitdeploy.exporters import ExportOptions, export_onnx

    t0 = time.perf_counter()
    report = export_onnx(ckpt, out, options=ExportOptions(
        dynamic_batch=True, precision=precision, calib_dir=Path(calib) if precision == "int8" else None,
        calib_samples=64))
    return {"precision": precision, "seconds": time.perf_counter() - t0, "file_mb": report.file_bytes / 1e6,
            "nodes": report.node_count, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "verification": report.verification.summary() if report.verification else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from vitdeploy import save_model
    from vitdeploy.checkpoints import resolve
    from vitdeploy.datasets import write_digits

    work = Path(tempfile.mkdtemp(prefix="vitdeploy-export-"))
    train, _ = write_digits(work / "digits")
    ckpt = args.out / "vit-b16.safetensors"
    save_model(resolve("vit-base-patch16-224", seed=0).model, ckpt)
    rows = []
    ctx = mp.get_context("spawn")
    for precision in ("fp32", "fp16", "int8"):
        with ctx.Pool(1) as pool:
            rows.append(pool.apply(_export, ((str(ckpt), str(args.out / f"vit-b16-{precision}.onnx"), precision,
                                              str(train)),)))

    from safetensors.torch import load_file, save_file

    from vitdeploy.bench import HFRuntime, measure
    from vitdeploy.engines import open_runtime
    from vitdeploy.sysinfo import usable_cpus

    threads = usable_cpus()

    hf = work / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(resolve(ckpt).model.config.to_json())
    save_file(load_file(ckpt), hf / "model.safetensors")
    with HFRuntime(hf, "sdpa", threads) as rt:
        base = measure(rt, 1, warmup=3, iters=args.iters).latency_ms.mean
    for row in rows:
        time.sleep(0.5)  # the previous runtime's thread pool stops spinning
        with open_runtime(args.out / f"vit-b16-{row['precision']}.onnx", backend="onnxruntime", device="cpu",
                          threads=threads) as rt:
            row["ort_cpu_ms_b1"] = measure(rt, 1, warmup=3, iters=args.iters).latency_ms.mean
        row["speedup_vs_hf_default"] = base / row["ort_cpu_ms_b1"]
    from vitdeploy.sysinfo import cpu_flags, cpu_model

    result = {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "threads": threads, "hf_default_sdpa_ms_b1": base,
              "rows": rows}
    print(json.dumps(result, indent=2))
    (args.out / "export.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
