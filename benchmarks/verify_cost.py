"""What the golden set costs: the bytes it adds to an artifact, and the time of the first-load check
(decode, preprocessing, the runtime on the golden images, the verdict cached) and of a later load
that finds the verdict cached, for vit-base-patch16-224 (random weights, FP32) on this CPU.

    python benchmarks/verify_cost.py [--onnx vitb.onnx] [--out bench-results]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", type=Path, default=None, help="An exported ViT-B/16 (default: export one now).")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from vitdeploy import sysinfo
    from vitdeploy.engines import open_runtime
    from vitdeploy.exporters import ExportOptions, export_onnx, read_onnx_metadata
    from vitdeploy.verify import first_load_check, verified_path

    with tempfile.TemporaryDirectory() as tmp:
        path = args.onnx
        if path is None:
            path = export_onnx("vit-base-patch16-224", Path(tmp) / "vitb.onnx",
                               options=ExportOptions(dynamic_batch=True)).path
        golden = read_onnx_metadata(path).golden
        if golden is None:
            raise SystemExit(f"{path} carries no golden set: export it with this vitdeploy")
        rows = []
        for backend in ("onnxruntime", "openvino"):
            verified_path(path).unlink(missing_ok=True)
            with open_runtime(path, backend=backend) as rt:
                t0 = time.perf_counter()
                first = first_load_check(path, rt)
                t1 = time.perf_counter()
                again = first_load_check(path, rt)
                t2 = time.perf_counter()
            assert first is not None and first.passed and again is not None and again.cached
            rows.append({"runtime": rt.describe(), "first_load_s": t1 - t0, "check_s": first.results[0].seconds,
                         "cached_s": t2 - t1})
        verified_path(path).unlink(missing_ok=True)
    result = {"cpu": sysinfo.cpu_model(), "cpu_flags": sysinfo.cpu_flags(), "onnx_bytes": path.stat().st_size
              if path.exists() else None, "golden_bytes": golden.nbytes, "golden_images": len(golden.images),
              "golden_source": golden.source, "rows": rows}
    print(f"{result['cpu']}: golden set {golden.nbytes / 1e3:.1f} kB ({len(golden.images)} images, "
          f"{golden.source}) in the ViT-B/16 FP32 ONNX")
    for r in rows:
        print(f"  {r['runtime']}: first load {r['first_load_s']:.2f} s (the check {r['check_s']:.2f} s), "
              f"cached {r['cached_s'] * 1e3:.0f} ms")
    (args.out / "verify_cost.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
