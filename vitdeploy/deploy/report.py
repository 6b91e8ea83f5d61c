"""The bundle's report: one row per artifact (precision, size, accuracy, best path, latency, verdict, the
commands that reproduce it), the machine, the stages, the golden sets; written as report.json and
report.html, and summed up on the terminal."""

from __future__ import annotations

import base64
import hashlib
import json
import shlex
import time
from pathlib import Path
from typing import Any

from vitdeploy import __version__
from vitdeploy.deploy.bundle import (
    DONE,
    FAILED,
    NOT_POSSIBLE,
    REPORT_FORMAT,
    REPORT_HTML,
    REPORT_JSON,
    SKIPPED,
    Artifact,
    Bundle,
    model_name,
)


def _q(value: Any) -> str:
    return shlex.quote(str(value))


def deploy_command(b: Bundle) -> str:
    o = b.options
    parts = ["vitdeploy deploy --model", _q(b.source), "--out", _q(b.out), "--precision", ",".join(o.precisions)]
    for flag, value in (("--config", o.config), ("--seed", o.seed), ("--calib-dir", o.calib_dir), ("--data", o.data),
                        ("--compute-capability", ",".join(o.compute_capabilities) or None), ("--task", o.task)):
        if value is not None:
            parts += [flag, _q(value)]
    parts += ["--normalize"] if o.normalize else []
    if o.calib_dir is not None:
        parts += ["--calib-samples", str(o.calib_samples)]
    parts += ["--trt", o.trt, "--max-batch", str(o.max_batch), "--bench-iters", str(o.bench_iters), "--bench-warmup",
              str(o.bench_warmup), "--tune-iters", str(o.tune_iters), "--tune-seconds", f"{o.tune_seconds:g}"]
    return " ".join(parts)


def row_commands(b: Bundle, a: Artifact) -> list[str]:
    """The single commands that make and measure this row, as a reader would type them."""
    o, path = b.options, _q(a.path)
    cmds: list[str] = []
    if a.kind == "onnx":
        export = ["vitdeploy export --model", _q(b.source), "--output", path, "--precision", a.precision,
                  "--dynamic-batch"]
        export += ["--config", _q(o.config)] if o.config else []
        export += ["--seed", str(o.seed)] if o.seed is not None else []
        export += ["--task", o.task] if o.task else []
        export += ["--normalize"] if o.normalize else []
        if a.precision in ("int8", "fp8"):
            export += ["--calib-dir", _q(o.calib_dir), "--calib-samples", str(o.calib_samples)]
        cmds.append(" ".join(export))
    else:
        build = ["vitdeploy build", _q(a.onnx), "--output", path, "--trt", "rtx" if a.flavour == "tensorrt_rtx"
                 else "tensorrt", "--min-batch 1", "--opt-batch", str(min(8, o.max_batch)), "--max-batch",
                 str(o.max_batch)]
        build += ["--compute-capability", ",".join(a.targets)] if a.flavour == "tensorrt_rtx" else []
        cmds.append(" ".join(build))
    cmds.append(f"vitdeploy verify {path}" + (" --backend onnxruntime --device cpu" if a.kind == "onnx" else ""))
    backend = "onnxruntime" if a.kind == "onnx" else "tensorrt"
    if o.data is not None:
        fp32 = next((x for x in b.onnx_files() if x.precision == "fp32"), None)
        against = f" --reference {_q(fp32.path)}" if fp32 is not None and fp32 is not a else ""
        cmds.append(f"vitdeploy eval --model {path} --data {_q(o.data)} --backend {backend} --batch {o.eval_batch}"
                    + against)
    if a.kind == "onnx":
        cmds.append(f"vitdeploy tune {path} --batch {o.tune_batch} --iters {o.tune_iters}")
    batches = ",".join(map(str, o.bench_batches))
    cmds.append(f"vitdeploy bench {path} --batch {batches} --warmup {o.bench_warmup} --iters {o.bench_iters}"
                + (" --device cpu" if a.kind == "onnx" else ""))
    triton = (b.record("triton", model_name(a.path)) or {}).get("result")
    if triton:
        args = triton["args"]
        cmds.append(f"vitdeploy triton {path} --repo {_q(b.out / 'triton')} --name {model_name(a.path)} --max-batch "
                    f"{args['max_batch']} --kind {args['kind']} --triton-backend {args['triton_backend']}")
    return cmds


def _unit(b: Bundle, stage: str, name: str) -> dict[str, Any]:
    return b.record(stage, name) or {}


def _note(u: dict[str, Any]) -> str | None:
    return u.get("reason") if u.get("status") in (FAILED, NOT_POSSIBLE) else None


def artifact_row(b: Bundle, a: Artifact) -> dict[str, Any]:
    """One row of the bundle's table; figures None (with a note) where a stage could not give them."""
    verify, acc, bench = (_unit(b, s, a.name) for s in ("verify", "accuracy", "bench"))
    rows = (bench.get("result") or {}).get("rows", [])
    by_batch = {str(r["batch"]): r for r in rows}
    vres, ares = verify.get("result") or {}, acc.get("result") or {}
    verdict = vres.get("verdict") or ("FAILED" if verify.get("status") == FAILED else "not verified")
    return {
        "artifact": b.rel(a.path), "name": a.name, "kind": a.kind, "precision": a.precision,
        "bytes": a.path.stat().st_size, "flavour": a.flavour or None, "targets": a.targets or None,
        "accuracy": ares.get("accuracy"), "accuracy_note": _note(acc),
        # top-1 (classifiers) or kNN top-1 (embeddings); against FP32: its cosine or its top-1 agreement
        "measure": ares.get("measure", "top-1"), "vs_fp32": ares.get("reference"),
        "verdict": verdict, "verdict_detail": vres.get("detail") or verify.get("reason", ""),
        "paths": {k: r["backend"] for k, r in by_batch.items()},
        "latency_ms": {k: r["latency_ms"]["median"] for k, r in by_batch.items()},
        "throughput": {k: r["throughput"] for k, r in by_batch.items()},
        "bench_note": _note(bench), "commands": row_commands(b, a),
    }


def fastest(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The verified row with the lowest latency at the smallest benchmarked batch, and its figures."""
    ok = [r for r in rows if r["verdict"] == "passed" and r["latency_ms"]]
    if not ok:
        return None
    first = min(int(k) for k in ok[0]["latency_ms"])
    best = min(ok, key=lambda r: r["latency_ms"].get(str(first), float("inf")))
    return {"artifact": best["artifact"], "precision": best["precision"], "batch": first,
            "path": best["paths"][str(first)], "latency_ms": best["latency_ms"][str(first)],
            "throughput": best["throughput"]}


def golden_sets(b: Bundle) -> list[dict[str, Any]]:
    """The distinct golden sets the ONNX files carry (INT8 files take theirs from the calibration images),
    each image with the reference's top-5 (labels and softmax probabilities)."""
    import numpy as np

    from vitdeploy.artifacts.metadata import read_onnx_metadata
    from vitdeploy.verify import artifact_golden

    sets: dict[str, dict[str, Any]] = {}
    for a in b.onnx_files():
        golden = artifact_golden(a.path)
        if golden is None:
            continue
        digest = hashlib.sha256(b"".join(im.png for im in golden.images)).hexdigest()
        if digest in sets:
            sets[digest]["artifacts"].append(b.rel(a.path))
            continue
        meta = read_onnx_metadata(a.path)
        labels, images = meta.labels, []
        for im in golden.images:
            if meta.is_embedding:  # a vector has no classes: its size and norm
                images.append({"name": im.name, "png": base64.b64encode(im.png).decode("ascii"), "top5": [],
                               "embedding": {"size": int(im.logits.size),
                                             "norm": float(np.linalg.norm(im.logits.astype(np.float64)))}})
                continue
            p = np.exp(im.logits - im.logits.max())
            p /= p.sum()
            top = [{"label": labels[i] if i < len(labels) else str(i), "index": i, "probability": float(p[i])}
                   for i in im.top_k]
            images.append({"name": im.name, "png": base64.b64encode(im.png).decode("ascii"), "top5": top})
        sets[digest] = {"source": golden.source, "reference": golden.reference, "artifacts": [b.rel(a.path)],
                        "images": images}
    return list(sets.values())


def model_task(b: Bundle) -> dict[str, Any]:
    """The task the bundle's ONNX files record (the first one's metadata), and its output."""
    from vitdeploy.artifacts.metadata import read_onnx_metadata

    for a in b.onnx_files():
        meta = read_onnx_metadata(a.path)
        return {"task": meta.task, "output_name": meta.output_name, "output_size": meta.output_size,
                "normalized": meta.normalized}
    return {"task": b.options.task or "classification", "output_name": None, "output_size": None,
            "normalized": b.options.normalize}


def build_report(b: Bundle) -> dict[str, Any]:
    from vitdeploy import sysinfo

    rows = [artifact_row(b, a) for a in b.artifacts]
    return {
        "format": REPORT_FORMAT, "vitdeploy": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": model_task(b),
        "source": b.source, "out": str(b.out.resolve()), "options": b.options.to_dict(), "command": deploy_command(b),
        "machine": sysinfo.machine(), "libraries": sysinfo.library_versions(), "stages": b.stages,
        "seconds": round(time.perf_counter() - b.started, 3), "rows": rows, "fastest": fastest(rows),
        "golden": golden_sets(b), "units": b.units,
    }


def write_reports(b: Bundle) -> None:
    """report.json (the golden images left out: they are in the artifacts) and report.html."""
    from vitdeploy.deploy.report_html import render
    from vitdeploy.io import atomic_write_bytes

    report = build_report(b)
    b.report = report
    lean = {**report, "golden": [{**g, "images": [{k: v for k, v in im.items() if k != "png"} for im in g["images"]]}
                                 for g in report["golden"]]}
    atomic_write_bytes(b.out / REPORT_JSON, (json.dumps(lean, indent=1) + "\n").encode())
    atomic_write_bytes(b.out / REPORT_HTML, render(report).encode())
    b.log(f"  report   wrote {REPORT_JSON} and {REPORT_HTML}")


# --- the terminal ---------------------------------------------------------------------------------------
def _ms(row: dict[str, Any], batch: str) -> str:
    v = row["latency_ms"].get(batch)
    return f"{v:.2f}" if v is not None else "-"


def summary_table(report: dict[str, Any], width: int | None = None, wide: bool = False) -> Any:
    """The rows as a rich Table with the columns that fit ``width``."""
    from vitdeploy.tables import Column, fit_table

    batches = [str(x) for x in report["options"]["bench_batches"]]
    embedding = report.get("model", {}).get("task") == "embedding"
    columns = [Column("artifact", 0, "left", True), Column("precision", 1, "left"), Column("MB", 3),
               Column("kNN top-1" if embedding else "accuracy", 1),
               Column("cos to fp32" if embedding else "agree fp32", 2), Column("best path", 2, "left", True),
               *[Column(f"b{x} ms", 0) for x in batches], Column("verified", 0, "left", True)]
    rows = []
    for r in report["rows"]:
        acc = f"{r['accuracy'] * 100:.2f}%" if r["accuracy"] is not None else "-"
        paths = sorted(set(r["paths"].values()))
        rows.append([r["artifact"], r["precision"], f"{r['bytes'] / 1e6:.1f}", acc, vs_fp32_text(r),
                     "\n".join(paths) or "-", *[_ms(r, x) for x in batches], r["verdict"]])
    return fit_table("vitdeploy deploy: artifacts (median latency per batch)", columns, rows, width, wide)


def vs_fp32_text(row: dict[str, Any]) -> str:
    """A row against FP32 in its task's measure: the mean (lowest) cosine of its embeddings, or its top-1
    agreement; "-" for FP32 itself or without --data."""
    ref = row.get("vs_fp32")
    if not ref:
        return "-"
    if ref["measure"] == "cosine":
        return f"{ref['mean']:.4f} ({ref['lowest']:.4f})"
    return f"{ref['mean'] * 100:.1f}%"


def summary_lines(report: dict[str, Any], out: Path) -> list[str]:
    """Stage counts, then the last two lines: the bundle, and the fastest verified path on this machine."""
    lines = []
    for s in report["stages"]:
        counts = ", ".join(f"{s[k]} {k}" for k in (DONE, SKIPPED, FAILED, NOT_POSSIBLE) if s.get(k))
        idle = "written" if s["name"] == "report" else "nothing to do"
        lines.append(f"{s['name']}: {counts or idle} ({s['seconds']:.1f} s)")
    for u in report["units"].values():
        if u["status"] in (FAILED, NOT_POSSIBLE):
            lines.append(f"{u['stage']} {u['unit']}: {u['status']}: {u['reason']}")
    lines.append(f"bundle: {out} ({REPORT_HTML}, {REPORT_JSON}, triton/) in {report['seconds']:.1f} s")
    f = report["fastest"]
    if f is None:
        lines.append("fastest verified path here: none (no artifact was both verified and benchmarked here)")
    else:
        thr = ", ".join(f"{v:.1f} img/s at batch {k}" for k, v in f["throughput"].items())
        lines.append(f"fastest verified path here: {f['artifact']} on {f['path']}: {f['latency_ms']:.2f} ms at "
                     f"batch {f['batch']} ({thr})")
    return lines
