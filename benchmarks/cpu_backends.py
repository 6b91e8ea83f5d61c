"""CPU paths side by side on vit-base-patch16-224, in one run, as ratios, with the CPU targets.

    python benchmarks/cpu_backends.py [--out bench-results] [--iters 20] [--batches 1,8] [--threads N]
                                      [--model vit-base-patch16-224]

Every row runs on the CPU (torch device="cpu", ONNX Runtime's CPU provider, OpenVINO CPU) with the
same number of threads, and says so. Rows: HF transformers FP32 with its default attention (SDPA)
and with eager attention (ratios are against the default, what a user runs today); our torch model
FP32 and bf16; our ONNX FP32 / FP16 / INT8 Q/DQ on ONNX Runtime (INT8 with activation Q/DQ as uint8
and as written) and OpenVINO (f32 and bf16 hints, INT8, THROUGHPUT streams); the same for INT8 with
INT8 attention (``export --attention int8``: Q/DQ on Q·Kᵀ, the Softmax output and P·V; rows "int8-attn",
their OpenVINO rows naming the element types its attention subgraph reads, "i8" where attention runs in
int8); and "auto": the path `vitdeploy tune` chose for each file on this machine (tuned in this run).
Each row's peak memory is its own (RSS above the process's before its runtime was opened). Then: INT8
top-1 agreement with FP32 on the trained digits model for every INT8 path, the achieved INT8 GOP/s
against the u8 x s8 matrix-product ceiling `cpu_roofline.py` measures, and the targets:

- auto within 5% of the fastest path measured, at each batch size, per file;
- at batch 1 on ViT-B/16, the fastest path at least 10x HF transformers default (issue 31, on an AMX
  Xeon; 6x was the earlier target on AVX-512 VNNI CPUs), with >= 99% top-1 agreement with FP32 on digits;
  batch 8 reported beside it;
- INT8 GOP/s at least 60% of the u8 x s8 ceiling.

Needs the dev extra (transformers, scikit-learn) and optionally openvino. Smoke-run it on a small
model with ``--model vit-tiny-patch16-224 --iters 3``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.bench import (
    BenchReport,
    BenchResult,
    HFRuntime,
    add_speedups,
    measure,
    release_memory,
    rss_mb,
    side_by_side,
)
from vitdeploy.engines import open_runtime
from vitdeploy.engines.base import Runtime
from vitdeploy.exporters import ExportOptions, export_onnx


def interleaved(names: list[str], factories: dict[str, Callable[[], Runtime]], batch: int, rounds: int,
                iters: int) -> dict[str, float]:
    """Open every runtime in ``names``, then time them side by side in alternating rounds (the timer
    ``vitdeploy tune`` uses): ms per image (median)."""
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    runtimes: dict[str, Runtime] = {}
    try:
        for name in names:
            runtimes[name] = factories[name]()
            for _ in range(2):
                runtimes[name].infer(x)
        runs = side_by_side(runtimes, x, rounds, iters)
    finally:
        for rt in runtimes.values():
            rt.close()
    return {name: float(np.median(v)) for name, v in runs.items()}


FILES_TUNED = ("fp32", "int8", "int8-attn")


def export_files(ckpt: Path, out: Path, stem: str, train: Path, calib: int) -> dict[str, Path]:
    """FP32, FP16, INT8 with attention float, and INT8 with INT8 attention (``--attention auto``: where the
    accuracy check refuses it, the file's attention is float and the note says why)."""
    onnx: dict[str, Path] = {}
    for name, prec, attention in (("fp32", "fp32", "auto"), ("fp16", "fp16", "auto"), ("int8", "int8", "float"),
                                  ("int8-attn", "int8", "auto")):
        t = time.perf_counter()
        opts = ExportOptions(dynamic_batch=True, precision=prec, calib_dir=train if prec == "int8" else None,
                             calib_samples=calib, attention=attention)
        report = export_onnx(ckpt, out / f"{stem}-{name}.onnx", options=opts)
        onnx[name] = report.path
        notes = [n for n in report.notes if n.startswith("attention:")]
        print(f"exported {name} in {time.perf_counter() - t:.1f} s {'; '.join(notes)}", file=sys.stderr)
    return onnx


def quantized_rows(onnx: dict[str, Path], threads: int, has_ov: bool) -> list[tuple[str, Callable[[], Runtime]]]:
    """The INT8 files on ONNX Runtime (Q/DQ as uint8 and as written) and on OpenVINO, and FP32 on OpenVINO."""
    rows: list[tuple[str, Callable[[], Runtime]]] = []
    for name in ("int8", "int8-attn"):
        for qdq in ("uint8", "int8"):
            rows.append((f"onnx {name} (Q/DQ {'as uint8' if qdq == 'uint8' else 'as written'})",
                         lambda n=name, q=qdq: open_runtime(onnx[n], backend="onnxruntime", device="cpu",
                                                            threads=threads, qdq_activations=q)))
    if has_ov:
        for name, hint, mode in (("fp32", "f32", "LATENCY"), ("fp32", "bf16", "LATENCY"), ("int8", "f32", "LATENCY"),
                                 ("int8", "bf16", "LATENCY"), ("int8", "f32", "THROUGHPUT"),
                                 ("int8-attn", "f32", "LATENCY"), ("int8-attn", "bf16", "LATENCY"),
                                 ("int8-attn", "f32", "THROUGHPUT"), ("int8-attn", "bf16", "THROUGHPUT")):
            rows.append((f"onnx {name} (openvino {hint}{', streams' if mode == 'THROUGHPUT' else ''})",
                         lambda n=name, h=hint, m=mode: open_runtime(onnx[n], backend="openvino", threads=threads,
                                                                     precision_hint=h, hint=m)))
    return rows


def digits_agreement(checkpoint: Path | None, work: Path, train: Path, test: Path, threads: int,
                     has_ov: bool) -> tuple[Any, dict[str, Any]]:
    """Top-1 agreement with FP32 of every INT8 path (attention float and INT8 attention) on the trained
    digits model -> (FP32's evaluation, per path: runtime, accuracy, agreement)."""
    from vitdeploy import save_model
    from vitdeploy.datasets import train_digits_vit
    from vitdeploy.evaluate import evaluate_folder
    from vitdeploy.tune import tune

    dckpt = checkpoint or work / "digits.safetensors"
    if checkpoint is None:
        save_model(train_digits_vit(train), dckpt)
    d32 = export_onnx(dckpt, work / "d32.onnx", options=ExportOptions(dynamic_batch=True)).path
    with open_runtime(d32, backend="onnxruntime") as rt:
        e32 = evaluate_folder(rt, test)
    agreement = {}
    for name, attention in (("int8", "float"), ("int8-attn", "int8")):
        d8 = export_onnx(dckpt, work / f"d-{name}.onnx", options=ExportOptions(
            dynamic_batch=True, precision="int8", calib_dir=train, calib_samples=256, attention=attention)).path
        tune(d8, threads=[threads], iters=5)
        paths: list[tuple[str, Callable[[], Runtime]]] = [
            ("onnxruntime Q/DQ as uint8", lambda p=d8: open_runtime(p, backend="onnxruntime", qdq_activations="uint8")),
            ("onnxruntime as written", lambda p=d8: open_runtime(p, backend="onnxruntime", qdq_activations="int8")),
            ("auto (tuned)", lambda p=d8: open_runtime(p, device="cpu"))]
        if has_ov:
            paths += [(f"openvino {h}", lambda p=d8, h=h: open_runtime(p, backend="openvino", precision_hint=h))
                      for h in ("f32", "bf16")]
        for label, factory in paths:
            with factory() as rt:
                e = evaluate_folder(rt, test)
                agreement[f"{name} {label}"] = {"runtime": rt.describe(), "accuracy": e.accuracy, "agreement_with_fp32":
                                                float(np.mean(np.array(e.predictions) == np.array(e32.predictions)))}
    return e32, agreement


def machine_line() -> str:
    from vitdeploy import sysinfo

    flags = " ".join(sysinfo.cpu_flags()) or "none of the AVX2/AVX-512/VNNI/BF16/AMX flags"
    return f"CPU: {sysinfo.cpu_model()}; ISA: {flags}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for every backend (default: all usable)")
    ap.add_argument("--model", default="vit-base-patch16-224")
    ap.add_argument("--calib", type=int, default=64, help="INT8 calibration images")
    ap.add_argument("--digits-checkpoint", type=Path, default=None,
                    help="a trained digits ViT to reuse (default: train one, seconds on a quiet machine)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]

    from safetensors.torch import save_file

    from vitdeploy import save_model, sysinfo
    from vitdeploy.checkpoints import resolve
    from vitdeploy.datasets import write_digits
    from vitdeploy.sysinfo import usable_cpus
    from vitdeploy.tune import tune

    threads = args.threads or usable_cpus()
    print(machine_line(), f"; {threads} threads for every backend", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="vitdeploy-bench-"))
    train, test = write_digits(work / "digits")
    stem = args.model.replace("vit-", "").replace("-patch", "-p").replace("-224", "")
    ckpt = args.out / f"{stem}.safetensors"
    model = resolve(args.model, seed=0).model
    cfg = model.config
    save_model(model, ckpt)
    hf_folder = work / "hf"
    hf_folder.mkdir()
    (hf_folder / "config.json").write_text(cfg.to_json())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, hf_folder / "model.safetensors")
    del model

    onnx = export_files(ckpt, args.out, stem, train, args.calib)
    tuned = {}
    for prec in FILES_TUNED:
        t = time.perf_counter()
        report = tune(onnx[prec], batch=max(batches) if max(batches) > 1 else 8, threads=[threads])
        tuned[prec] = report
        print(f"tuned {prec} in {time.perf_counter() - t:.1f} s: {report.summary()}", file=sys.stderr)

    has_ov = importlib.util.find_spec("openvino") is not None
    rows: list[tuple[str, Callable[[], Runtime]]] = [
        ("HF transformers default (sdpa)", lambda: HFRuntime(hf_folder, "sdpa", threads)),
        ("HF transformers eager", lambda: HFRuntime(hf_folder, "eager", threads)),
        ("ours torch fp32", lambda: open_runtime(ckpt, device="cpu", dtype="fp32", threads=threads)),
        ("ours torch bf16", lambda: open_runtime(ckpt, device="cpu", dtype="bf16", threads=threads)),
    ]
    for prec in ("fp32", "fp16"):
        rows.append((f"onnx {prec}", lambda p=prec: open_runtime(onnx[p], backend="onnxruntime", device="cpu",
                                                                   threads=threads)))
    rows += quantized_rows(onnx, threads, has_ov)
    for prec in FILES_TUNED:
        rows.append((f"onnx {prec} auto (tuned)", lambda p=prec: open_runtime(onnx[p], device="cpu")))

    results: list[BenchResult] = []
    for name, factory in rows:
        release_memory()
        base = rss_mb()
        rt = factory()
        try:
            for batch in batches:
                iters = args.iters if batch == 1 else max(5, args.iters // 2)
                r = measure(rt, batch, warmup=3, iters=iters, name=name, base_rss_mb=base)
                print(f"  {name:40s} {r.backend:58s} {r.where}/{r.threads}t b{batch}: "
                      f"{r.latency_ms.mean / batch:8.2f} ms/img, {r.peak_host_mb:6.0f} MB", file=sys.stderr)
                results.append(r)
        finally:
            rt.close()
            del rt
    results.sort(key=lambda r: r.batch)
    add_speedups(results)  # first row of each batch: HF transformers default
    factories = dict(rows)
    seq_ms = {b: {r.name: r.latency_ms.mean / b for r in results if r.batch == b} for b in batches}

    # The rows above ran one after another, so a machine that drifts (turbo, neighbours) tilts their
    # ratios. The ratios the targets judge are timed again side by side: HF default, the fastest path,
    # and each file's fastest path and auto row, opened together and run in alternating rounds.
    side_by_side: dict[int, dict[str, float]] = {}
    for b in batches:
        names = ["HF transformers default (sdpa)", min(seq_ms[b], key=seq_ms[b].__getitem__)]
        for prec in FILES_TUNED:
            same = {k: v for k, v in seq_ms[b].items() if k.startswith(f"onnx {prec} ") and "auto" not in k}
            names += [min(same, key=same.__getitem__), f"onnx {prec} auto (tuned)"]
        names = list(dict.fromkeys(names))
        side_by_side[b] = interleaved(names, factories, b, rounds=4, iters=max(2, args.iters // 4 // b))
        print(f"  side by side b{b}: " + ", ".join(f"{k} {v:.1f}" for k, v in side_by_side[b].items()),
              file=sys.stderr)

    summary: dict[str, Any] = {"machine": sysinfo.machine(), "threads": threads, "model": args.model,
                               "gflop_per_image": cfg.flops() / 1e9}
    ms = {b: {r.name: r.latency_ms.mean / b for r in results if r.batch == b} for b in batches}
    summary["ms_per_image"] = ms
    summary["where"] = sorted({r.where for r in results})
    summary["threads_per_row"] = sorted({r.threads for r in results if r.threads})
    summary["vs_hf_default"] = {b: {k: ms[b]["HF transformers default (sdpa)"] / v for k, v in ms[b].items()}
                                for b in batches}
    summary["vs_hf_eager"] = {b: {k: ms[b]["HF transformers eager"] / v for k, v in ms[b].items()} for b in batches}
    summary["side_by_side_ms_per_image"] = side_by_side
    # auto vs the fastest other path for the same file, side by side
    targets: dict[str, Any] = {}
    for prec in FILES_TUNED:
        for b in batches:
            sbs = side_by_side[b]
            auto = f"onnx {prec} auto (tuned)"
            others = {k: v for k, v in sbs.items() if k.startswith(f"onnx {prec} ") and k != auto}
            fastest = min(others, key=others.__getitem__)
            ratio = sbs[auto] / others[fastest]
            plan = tuned[prec].plan
            tuned_pick = plan.latency if b < plan.throughput_batch else plan.throughput
            targets[f"auto {prec} b{b} vs fastest measured (side by side)"] = {
                "auto_ms": sbs[auto], "fastest": fastest, "fastest_ms": others[fastest],
                "ratio": ratio, "tune_chose": tuned_pick.label, "pass (<= 1.05)": ratio <= 1.05}
    b0 = batches[0]
    sbs0 = side_by_side[b0]
    best1 = min((k for k in sbs0 if not k.startswith("HF")), key=sbs0.__getitem__)
    hf0 = sbs0["HF transformers default (sdpa)"]
    targets[f"fastest b{b0} vs HF default (side by side)"] = {
        "path": best1, "hf_ms": hf0, "path_ms": sbs0[best1], "ratio": hf0 / sbs0[best1],
        "pass (>= 10x, ViT-B/16, issue 31's AMX target)": hf0 / sbs0[best1] >= 10}
    for b in batches[1:]:
        sbs = side_by_side[b]
        best = min((k for k in sbs if not k.startswith("HF")), key=sbs.__getitem__)
        targets[f"fastest b{b} vs HF default (side by side, reported)"] = {
            "path": best, "hf_ms_per_image": sbs["HF transformers default (sdpa)"], "path_ms_per_image": sbs[best],
            "ratio": sbs["HF transformers default (sdpa)"] / sbs[best], "images_per_s": 1e3 / sbs[best]}

    # INT8 achieved GOP/s against the u8 x s8 ceiling of the same machine
    from cpu_roofline import gemm_throughput  # beside this script, on sys.path when run as a script

    int8_rows = {b: {k: v for k, v in ms[b].items() if k.startswith("onnx int8") and "auto" not in k}
                 for b in batches}
    gops = {}
    for b in batches:
        fastest = min(int8_rows[b], key=int8_rows[b].__getitem__)
        achieved = cfg.flops() / 1e9 / (int8_rows[b][fastest] / 1e3)
        ceiling = gemm_throughput((cfg.num_patches + 1) * b, cfg.hidden_size, cfg.intermediate_size, threads)
        u8 = ceiling["onnxruntime uint8 x int8"]
        gops[b] = {"fastest_int8_path": fastest, "achieved_gop_s": achieved, "u8s8_ceiling_gop_s": u8,
                   "share": achieved / u8, "pass (>= 60%)": achieved / u8 >= 0.6, "all_formats_gop_s": ceiling}
    summary["int8_vs_roofline"] = gops
    from cpu_roofline import floor_line, int8_floor

    known = {(cfg.hidden_size, cfg.intermediate_size): gops[b0]["all_formats_gop_s"]} if b0 in gops else None
    floor = int8_floor(cfg, b0, threads, known)
    targets[f"fastest b{b0} vs HF default (side by side)"].update(
        int8_floor_ms=floor["floor_ms_per_image"], at_most=hf0 / floor["floor_ms_per_image"], floor=floor)

    # top-1 agreement with FP32 of every INT8 path, on the trained digits model
    e32, agreement = digits_agreement(args.digits_checkpoint, work, train, test, threads, has_ov)
    summary["digits"] = {"fp32_accuracy": e32.accuracy, "int8": agreement}
    for name in ("int8", "int8-attn"):
        a = agreement[f"{name} auto (tuned)"]
        targets[f"digits {name} agreement (auto)"] = {
            "agreement": a["agreement_with_fp32"], "pass (>= 99%)": a["agreement_with_fp32"] >= 0.99,
            "accuracy_drop_points": (e32.accuracy - a["accuracy"]) * 100,
            "pass (<= 0.5 points)": (e32.accuracy - a["accuracy"]) * 100 <= 0.5}
    summary["targets"] = targets

    from rich.console import Console

    report = BenchReport(results, summary["machine"], sysinfo.library_versions(),
                         {"batches": batches, "threads": threads, "model": args.model})
    con = Console(width=220)
    con.print(report.table())
    print(machine_line(), f"; {threads} threads for every backend; every row ran on: {', '.join(summary['where'])}")
    print(f"\nms per image (mean), and ratio against HF transformers default (sdpa) / eager, {args.model}:")
    print(f"  {'path':44s}" + "".join(f"{'b' + str(b) + ' ms':>10s}{'/default':>10s}{'/eager':>8s}" for b in batches))
    for name in ms[batches[0]]:
        print(f"  {name:44s}" + "".join(f"{ms[b][name]:10.2f}{summary['vs_hf_default'][b][name]:9.2f}x"
                                        f"{summary['vs_hf_eager'][b][name]:7.2f}x" for b in batches))
    print("\nINT8 against the u8 x s8 matrix-product ceiling (cpu_roofline.gemm_throughput, same run):")
    for b, g in gops.items():
        print(f"  b{b}: {g['fastest_int8_path']}: {g['achieved_gop_s']:.0f} GOP/s of {g['u8s8_ceiling_gop_s']:.0f} "
              f"({g['share']:.0%})")
    print(f"\ndigits (FP32 accuracy {e32.accuracy:.1%}): INT8 top-1 agreement with FP32:")
    for label, a in agreement.items():
        print(f"  {label:44s} {a['agreement_with_fp32']:.1%} (accuracy {a['accuracy']:.1%}) {a['runtime']}")
    print("\nside by side (alternating rounds), ms per image:")
    for b, sbs in side_by_side.items():
        print(f"  b{b}: " + ", ".join(f"{k} {v:.2f}" for k, v in sbs.items()))
    print(floor_line(hf0, floor))
    print("\ntargets:")
    for k, v in targets.items():
        print(f"  {k}: {json.dumps(v)}")
    report.write_json(args.out / "cpu_backends.json")
    (args.out / "cpu_backends_summary.json").write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
