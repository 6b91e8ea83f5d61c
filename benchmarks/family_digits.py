"""INT8 and FP8 against FP32 on trained weights: the digits model in each family's shape (issue 30).

For each family, ``python -m vitdeploy.datasets WORK/FAMILY --family FAMILY`` trains the digits model in
its shape (a checkpoint already there is reused: training is the slow part). Each of the family's tasks
is exported in FP32, FP16, INT8 and FP8 (INT8/FP8 calibrated on the digits training images) with ``vitdeploy export``
and scored on the held-out digits with ``vitdeploy eval --json``, the others with ``--reference``
the FP32 export: classifiers by top-1 and top-1 agreement, embeddings by kNN top-1 (k=1, cosine,
leave-one-out over the held-out folder) and the mean cosine to FP32. Pass (issue 30): top-1 or kNN top-1
at most 1 point below FP32's, and for embeddings a mean cosine of at least 0.99. Rows go to
OUT/family_digits.json as they are measured, so a stopped run keeps what it has.

    python benchmarks/family_digits.py [--families vit,dinov2] [--attention auto] [--work DIR] [--out bench-results]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# family: the tasks measured. The digits models of CLIP, SigLIP and DINOv2 with registers are trained as
# embedding models (their classifiers load and export, tests/test_families.py, but are not trained here).
FAMILIES: dict[str, tuple[str, ...]] = {
    "vit": ("classification",),
    "deit": ("classification",),
    "dinov2": ("classification", "embedding"),
    "dinov2-registers": ("embedding",),
    "clip": ("embedding",),
    "siglip": ("embedding",),
}
MAX_DROP = 0.01  # top-1 / kNN top-1 at most 1 point below FP32
MIN_COSINE = 0.99


def run(cmd: list[str], log: Path) -> str:
    """Run one command, its output appended to ``log``; a failure raises with the output's last line."""
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
    done = subprocess.run(cmd, capture_output=True, text=True)
    with log.open("a") as f:
        f.write(done.stdout + done.stderr)
    if done.returncode:
        last = (done.stderr or done.stdout).strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"{Path(cmd[0]).name} {cmd[1]}: {last[-1].removeprefix('Error: ')[:200]}")
    return done.stdout


def train(family: str, work: Path) -> Path:
    """The family's trained digits checkpoint under ``work``, trained now unless already there."""
    ckpt = work / ("digits_vit.safetensors" if family == "vit" else f"digits_{family.replace('-', '_')}.safetensors")
    if not ckpt.exists():
        run([sys.executable, "-m", "vitdeploy.datasets", str(work), "--family", family], work / "log.txt")
    return ckpt


def export_and_eval(ckpt: Path, task: str, precision: str, attention: str, work: Path) -> dict[str, Any]:
    """Export one precision of one task and score it on the held-out digits (against FP32 if quantized)."""
    vitdeploy = str(Path(sys.executable).with_name("vitdeploy"))
    onnx = work / f"{task}-{precision}.onnx"
    cmd = [vitdeploy, "export", "--model", str(ckpt), "--output", str(onnx), "--task", task,
           "--precision", precision]
    if precision in ("int8", "fp8"):
        cmd += ["--calib-dir", str(work / "digits" / "train"), "--attention", attention]
    exported = run(cmd, work / "log.txt")
    result = work / f"{task}-{precision}.eval.json"
    cmd = [vitdeploy, "eval", "--model", str(onnx), "--data", str(work / "digits" / "test"), "--json", str(result)]
    if precision != "fp32":
        cmd += ["--reference", str(work / f"{task}-fp32.onnx")]
    run(cmd, work / "log.txt")
    scored = json.loads(result.read_text())
    notes = [line.strip() for line in exported.splitlines() if "attention" in line.lower()]
    return {"score": scored["accuracy"], "measure": scored["measure"], "reference": scored.get("reference"),
            "export_notes": notes}


def verdict(row: dict[str, Any]) -> dict[str, Any]:
    """Whether a quantized row meets issue 30's thresholds against its FP32 export."""
    ref = row.get("reference")
    if not ref:
        return row
    row["drop_points"] = round((ref["reference_score"] - row["score"]) * 100, 2)
    ok = row["drop_points"] <= MAX_DROP * 100 + 1e-9
    if ref["measure"] == "cosine":
        ok = ok and ref["mean"] >= MIN_COSINE
    row["passed"] = ok
    return row


def _key(row: dict[str, Any]) -> tuple[int, str, int, str]:
    """A row's place in the table: family, task, precision, attention (a rerun replaces its own rows)."""
    order = ("fp32", "fp16", "int8", "fp8")
    precision = order.index(row["precision"]) if row["precision"] in order else len(order)
    return list(FAMILIES).index(row["family"]), row["task"], precision, row["attention"] or ""


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| family | task | precision | score (held-out digits) | vs FP32 | pass |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['task']} | {_precision(r)} | failed: {r['error']} | - | no |")
            continue
        ref = r.get("reference")
        if not ref:
            against, ok = "-", "(reference)"
        elif ref["measure"] == "cosine":
            against = f"{0.0 - r['drop_points']:+.2f} points; cosine mean {ref['mean']:.4f}, lowest {ref['lowest']:.4f}"
            ok = "yes" if r["passed"] else "**no**"
        else:
            against = f"{0.0 - r['drop_points']:+.2f} points; top-1 agreement {ref['mean'] * 100:.2f}%"
            ok = "yes" if r["passed"] else "**no**"
        lines.append(f"| {r['family']} | {r['task']} | {_precision(r)} | {r['measure']} {r['score'] * 100:.2f}% | "
                     f"{against} | {ok} |")
    return "\n".join(lines)


def _precision(row: dict[str, Any]) -> str:
    """The precision, and with --attention auto what the export chose (its line "attention: int8 Q/DQ ...")."""
    if not row["attention"]:
        return row["precision"]
    chosen = [n.split(":", 1)[1].split()[0] for n in row.get("export_notes", []) if n.startswith("attention:")]
    attention = f"auto: {chosen[0]}" if row["attention"] == "auto" and chosen else row["attention"]
    return f"{row['precision']} (attention {attention})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--precisions", default="fp32,fp16,int8,fp8")
    ap.add_argument("--attention", default="auto", choices=["auto", "float", "int8", "fp8"])
    ap.add_argument("--work", type=Path, default=Path("bench-results/family-digits"),
                    help="checkpoints and exports, one folder per family (a checkpoint there is reused)")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args()
    from vitdeploy.sysinfo import cpu_model

    precisions = args.precisions.split(",")
    assert precisions[0] == "fp32", "FP32 comes first: the others are scored against it"
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "family_digits.json"
    # rows of earlier runs are kept, each replaced when measured again: families can run one at a time
    rows: list[dict[str, Any]] = json.loads(results.read_text())["rows"] if results.exists() else []
    for family in args.families.split(","):
        work = args.work / family
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        ckpt = train(family, work)
        for task in FAMILIES[family]:
            for precision in precisions:
                row: dict[str, Any] = {"family": family, "task": task, "precision": precision,
                                       "attention": args.attention if precision in ("int8", "fp8") else None}
                try:
                    row.update(verdict(export_and_eval(ckpt, task, precision, args.attention, work)))
                except RuntimeError as e:  # a row per failure, the table goes on
                    row["error"] = str(e)
                rows = sorted([r for r in rows if _key(r) != _key(row)] + [row], key=_key)
                print(json.dumps(row), flush=True)
                tmp = results.with_suffix(".tmp")
                tmp.write_text(json.dumps({"cpu": cpu_model(), "rows": rows}, indent=2))
                tmp.replace(results)
        print(f"# {family}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\n{render(rows)}\n\nCPU: {cpu_model()} ({results})")


if __name__ == "__main__":
    main()
