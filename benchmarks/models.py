"""The docs/models.md table: each family member at its real size (random init from HF's own configs),
loaded by vitdeploy from the files HF's save_pretrained writes, against HF transformers.

Per model: the largest difference of vitdeploy's torch model and of its FP32 ONNX (ONNX Runtime) to HF
transformers' output (logits or embedding) on the same inputs, and the cosine to HF of the FP16, INT8 and
FP8 exports (INT8/FP8 calibrated on the digits images: random weights, so only the graph's agreement is
measured here, not accuracy). ``--rtx`` builds a TensorRT-RTX engine (for SM 8.9) of each FP16/INT8/FP8
export; ``--serve`` serves the FP32 export with `vitdeploy serve` and with a real tritonserver (the
Python-backend repository `vitdeploy triton` writes) and compares both answers, over KServe v2 with the
same tritonclient code, to ONNX Runtime's in-process output. The machine and library versions are printed
with the table.

    python benchmarks/models.py [--models vit-b16,dinov2-b14] [--precisions fp32,fp16] [--rtx] [--serve]
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


def rtx_builds(name: str, root: Path, precisions: list[str]) -> dict[str, Any]:
    """A TensorRT-RTX engine (SM 8.9, batch 2) of each kept FP16/INT8/FP8 export: seconds and MiB, or why not."""
    from vitdeploy.engines.tensorrt.build import BuildOptions, build_engine

    out: dict[str, Any] = {}
    for precision in [p for p in precisions if p in ("fp16", "int8", "fp8")]:
        onnx_path = root / f"{name}-{precision}.onnx"
        if not onnx_path.is_file():
            continue
        try:
            report = build_engine(onnx_path, root / f"{name}-{precision}.engine",
                                  BuildOptions(flavour="rtx", compute_capabilities=["sm89"], batch=2))
            out[precision] = {"seconds": round(report.seconds, 1), "mib": round(report.engine_bytes / 2**20, 1)}
        except Exception as e:  # a cell per failure
            out[precision] = f"failed: {str(e).splitlines()[0][:120]}"
    return out


def kserve_infer(url: str, model: str, x: np.ndarray) -> np.ndarray:
    """One KServe v2 request with tritonclient.http (binary tensors), the same against either server."""
    import tritonclient.http as th

    with th.InferenceServerClient(url, network_timeout=300) as client:
        meta = client.get_model_metadata(model)
        inp = th.InferInput(meta["inputs"][0]["name"], list(x.shape), meta["inputs"][0]["datatype"])
        inp.set_data_from_numpy(x)
        name = meta["outputs"][0]["name"]
        return client.infer(model, [inp], outputs=[th.InferRequestedOutput(name)]).as_numpy(name)


def vitdeploy_serve(onnx_path: Path) -> tuple[Any, str]:
    """`vitdeploy serve` of ``onnx_path`` in its own process; -> (the process, its host:port) once ready."""
    import subprocess
    import sys
    import urllib.request

    from vitdeploy.io import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vitdeploy.cli", "serve", "--model", str(onnx_path), "--name", "m",
                             "--drain-grace", "0", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2):
                return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("vitdeploy serve did not become ready")


def served_answers(onnx_path: Path, x: np.ndarray, expected: np.ndarray, root: Path) -> dict[str, Any]:
    """max |answer - ONNX Runtime's| from `vitdeploy serve` and from a real tritonserver, or why not."""
    import os

    import local_triton as harness  # beside this script
    from click.testing import CliRunner

    from vitdeploy.cli import main

    out: dict[str, Any] = {}
    proc, url = vitdeploy_serve(onnx_path)
    try:
        out["serve"] = float(np.abs(kserve_infer(url, "m", x) - expected).max())
    finally:
        proc.terminate()
        proc.wait(30)
    cache = Path(os.environ.get("VITDEPLOY_TEST_CACHE", Path(__file__).parent.parent / ".cache"))
    local = harness.prepare_local_triton(cache)
    repo = root / f"triton-{onnx_path.stem}"
    r = CliRunner().invoke(main, ["triton", str(onnx_path), "--repo", str(repo), "--name", "m", "--triton-backend",
                                  "python", "--execution-env", str(local.env), "--max-batch", "2", "--threads", "2"])
    if r.exit_code:
        return {**out, "triton": f"failed: {r.output.strip().splitlines()[-1][:120]}"}
    server = harness.start_tritonserver(local, repo, log_dir=root, timeout=600)
    try:
        out["triton"] = float(np.abs(kserve_infer(server.http_url, "m", x) - expected).max())
    finally:
        server.stop()
    return out


def measure_model(name: str, root: Path, precisions: list[str], calib: Path, rtx: bool = False,
                  serve: bool = False) -> dict[str, Any]:
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
        if serve and precision == "fp32":
            row["served"] = served_answers(out, x, got, root)
    if rtx:
        row["rtx"] = rtx_builds(name, root, precisions)
    for f in root.glob(f"{name}-*"):
        if f.is_file():
            f.unlink()
    return row


def _cell(v: Any, fmt: str) -> str:
    return "-" if v is None else v if isinstance(v, str) else fmt.format(**v) if isinstance(v, dict) else fmt.format(v)


def render_deploy(rows: list[dict[str, Any]]) -> str:
    """The TensorRT-RTX builds and the served answers, one row per model."""
    lines = ["| model | TensorRT-RTX FP16 | INT8 | FP8 | `vitdeploy serve` vs ONNX Runtime | Triton vs ONNX Runtime |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        rtx, served = r.get("rtx", {}), r.get("served", {})
        cells = [_cell(rtx.get(p), "built, {seconds} s, {mib} MiB") for p in ("fp16", "int8", "fp8")]
        cells += [_cell(served.get(k), "max abs {:.2g}") for k in ("serve", "triton")]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    ap.add_argument("--rtx", action="store_true", help="build TensorRT-RTX engines of the FP16/INT8/FP8 exports")
    ap.add_argument("--serve", action="store_true", help="serve the FP32 export with vitdeploy serve and Triton")
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
        rows.append(measure_model(name, root, precisions, train, args.rtx, args.serve))
        print(json.dumps(rows[-1]), flush=True)
    import onnxruntime
    import torch
    import transformers

    deploy = f"\n\n{render_deploy(rows)}" if args.rtx or args.serve else ""
    print(f"\n{render(rows, precisions)}{deploy}\n\nCPU: {cpu_model()}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, onnxruntime {onnxruntime.__version__}")
    (args.out / "models.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
