"""Build time and engine size of vit-base-patch16-224 for each precision with TensorRT-RTX
(ahead of time, no GPU needed) or full TensorRT on a GPU machine.

    python benchmarks/build_engines.py [--onnx-dir bench-results] [--targets sm89] [--trt rtx]

Uses vit-b16-{fp32,fp16,int8}.onnx from benchmarks/export.py (or exports them first).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vitdeploy.engines.tensorrt.build import BuildOptions, build_engine
from vitdeploy.sysinfo import cpu_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx-dir", type=Path, default=Path("bench-results"))
    ap.add_argument("--targets", default="sm89")
    ap.add_argument("--trt", default="auto")
    ap.add_argument("--max-batch", type=int, default=32)
    args = ap.parse_args()
    rows = []
    for precision in ("fp32", "fp16", "int8"):
        onnx = args.onnx_dir / f"vit-b16-{precision}.onnx"
        if not onnx.is_file():
            from vitdeploy.datasets import write_digits
            from vitdeploy.exporters import ExportOptions, export_onnx

            calib = write_digits(args.onnx_dir / "digits")[0] if precision == "int8" else None
            export_onnx("vit-base-patch16-224", onnx, options=ExportOptions(
                dynamic_batch=True, precision=precision, calib_dir=calib, calib_samples=64, seed=0))
        opts = BuildOptions(flavour=args.trt, compute_capabilities=[t for t in args.targets.split(",") if t],
                            min_batch=1, opt_batch=8, max_batch=args.max_batch)
        r = build_engine(onnx, onnx.with_suffix(".engine"), opts)
        rows.append({"precision": precision, "flavour": r.flavour, "version": r.trt_version, "targets": r.targets,
                     "build_s": round(r.seconds, 2), "engine_mb": round(r.engine_bytes / 1e6, 1),
                     "onnx_mb": round(onnx.stat().st_size / 1e6, 1)})
    result = {"cpu": cpu_model(), "rows": rows}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
