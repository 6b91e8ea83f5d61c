"""Why our INT8: the same FP32 digits ONNX quantized by several tools with the same calibration images.

    python benchmarks/int8_peers.py [--out bench-results/int8-peers] [--calib 300]
        [--modelopt-python /path/to/modelopt-venv/bin/python] [--nncf-python /path/to/nncf-venv/bin/python]

Not part of CI; every tool is optional. ONNX Runtime's ``quantize_static`` and vitdeploy run here;
NVIDIA ModelOpt and NNCF run in their own virtual environments, given with ``--modelopt-python`` /
``--nncf-python`` (or here, when this Python has them): ModelOpt's ``[onnx]`` extra pulls torch,
onnxruntime-gpu and cupy, which the vitdeploy venv must not get (about 7 GB with CUDA torch; 2.0 GB
with a CPU-only torch installed first). What was run here (Python 3.11; ``.cache/`` is git-ignored;
``torch==2.13.0`` resolved to a CPU-only ``+cpu`` wheel on that machine):

    python3 -m venv .cache/peers/modelopt && .cache/peers/modelopt/bin/pip install torch==2.13.0
    .cache/peers/modelopt/bin/pip install "nvidia-modelopt[onnx]" numpy onnx  # ModelOpt 0.47.0
    python3 -m venv .cache/peers/nncf && .cache/peers/nncf/bin/pip install nncf onnx onnxruntime numpy  # NNCF 3.4.0
    python benchmarks/int8_peers.py --calib 300 --digits-checkpoint .cache/digits_vit.safetensors \
        --modelopt-python .cache/peers/modelopt/bin/python --nncf-python .cache/peers/nncf/bin/python

ModelOpt calibrates with ONNX Runtime's CPU provider (``calibration_eps=["cpu"]``), so no GPU is needed.

Each tool gets the same FP32 ONNX (vitdeploy's export of the trained digits ViT, dynamic batch) and
the same calibration images (``--calib``, default 300, preprocessed as the model expects, saved to
one .npy). Every result is run with ONNX Runtime's CPU provider as written and reported as digits
test accuracy, top-1 agreement with the FP32 ONNX, and whether TensorRT-RTX builds it for sm89
(ahead of time, no GPU needed; "n/a" when tensorrt_rtx is not installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

INPUT = "pixel_values"


# -- workers: run in whichever Python has the tool; numpy + onnx + the tool only ---------------------
def quantize_modelopt(src: str, dst: str, calib: str, method: str, exclude_add: bool, disable_mha: bool) -> None:
    from modelopt.onnx.quantization import quantize

    quantize(onnx_path=src, quantize_mode="int8", calibration_data={INPUT: np.load(calib)},
             calibration_method=method, calibration_eps=["cpu"], output_path=dst, disable_mha_qdq=disable_mha,
             op_types_to_exclude=["Add"] if exclude_add else None)


def quantize_nncf(src: str, dst: str, calib: str) -> None:
    import nncf
    import onnx

    data = np.load(calib)
    model = onnx.load(src)
    dataset = nncf.Dataset([{INPUT: data[i:i + 1]} for i in range(len(data))])
    out = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(data))
    onnx.save(out, dst)


def quantize_ort(src: str, dst: str, calib: str, style: str) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    data = np.load(calib)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{INPUT: data[i:i + 1]} for i in range(len(data))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    if style == "defaults":
        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ)
    else:  # what TensorRT wants: symmetric int8 activations and per-channel int8 weights
        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, per_channel=True,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})


WORKERS = {"modelopt": quantize_modelopt, "nncf": quantize_nncf, "ort": quantize_ort}


def run_worker(python: str | None, tool: str, *args: Any) -> str | None:
    """Quantize in ``python`` (a subprocess) or here; the error's last line on failure, else None."""
    if python is None:
        try:
            WORKERS[tool](*args)
            return None
        except Exception as e:  # a tool that fails is a result of the comparison
            return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    cmd = [python, __file__, "--worker", tool, json.dumps([str(a) if isinstance(a, Path) else a for a in args])]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()
        return tail[-1] if tail else f"exit {p.returncode}"
    return None


# -- the comparison (vitdeploy venv) ------------------------------------------------------------------
def evaluate(path: Path, fp32_meta_from: Path, test: Path, fp32_preds: np.ndarray | None) -> dict[str, Any]:
    import onnx

    from vitdeploy.engines import open_runtime
    from vitdeploy.evaluate import evaluate_folder

    model = onnx.load(str(path))
    if not any(p.key.startswith("vitdeploy.") for p in model.metadata_props):  # a peer tool's output
        src = onnx.load(str(fp32_meta_from), load_external_data=False)
        for p in src.metadata_props:
            model.metadata_props.add(key=p.key, value=p.value)
        onnx.save(model, str(path))
    with open_runtime(path, backend="onnxruntime", device="cpu", qdq_activations="int8", use_plan=False) as rt:
        e = evaluate_folder(rt, test)
    preds = np.array(e.predictions)
    return {"accuracy": e.accuracy, "preds": preds,
            "agreement": float(np.mean(preds == fp32_preds)) if fp32_preds is not None else 1.0}


def builds_for_sm89(path: Path, work: Path) -> str:
    if importlib.util.find_spec("tensorrt_rtx") is None:
        return "n/a (tensorrt_rtx not installed)"
    from vitdeploy.engines.tensorrt.build import BuildOptions, build_engine

    try:
        build_engine(path, work / (path.stem + ".engine"), BuildOptions(flavour="rtx", compute_capabilities=["sm89"]))
        return "yes"
    except Exception as e:
        return "no: " + " ".join(str(e).split())[:120]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench-results/int8-peers"))
    ap.add_argument("--calib", type=int, default=300)
    ap.add_argument("--modelopt-python", default=None)
    ap.add_argument("--nncf-python", default=None)
    ap.add_argument("--digits-checkpoint", type=Path, default=None, help="a trained digits ViT to reuse")
    ap.add_argument("--no-build", action="store_true", help="skip the TensorRT-RTX build check")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("args", nargs="?", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        WORKERS[a.worker](*json.loads(a.args))
        return

    from vitdeploy import save_model
    from vitdeploy.datasets import train_digits_vit, write_digits
    from vitdeploy.exporters import ExportOptions, export_onnx
    from vitdeploy.preprocess import Preprocessing, find_images, load_images

    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vitdeploy-int8-peers-"))
    train, test = write_digits(work / "digits")
    ckpt = a.digits_checkpoint or work / "digits.safetensors"
    if a.digits_checkpoint is None:
        save_model(train_digits_vit(train), ckpt)

    def builds(path: Path) -> str:
        return "not checked (--no-build)" if a.no_build else builds_for_sm89(path, work)
    fp32 = export_onnx(ckpt, a.out / "digits-fp32.onnx", options=ExportOptions(dynamic_batch=True)).path
    files = find_images(train)[: a.calib]
    from vitdeploy.engines import open_runtime

    with open_runtime(fp32, backend="onnxruntime", use_plan=False) as rt:
        prep = Preprocessing.from_dict(rt.metadata.preprocessing)
    calib = a.out / "calib.npy"
    np.save(calib, load_images(files, prep))

    ref = evaluate(fp32, fp32, test, None)
    rows: list[dict[str, Any]] = [{"method": "FP32 (reference)", "accuracy": ref["accuracy"], "agreement": 1.0,
                                   "builds": builds(fp32), "error": None}]

    def add(method: str, out: Path, error: str | None) -> None:
        if error is None and out.is_file():
            r = evaluate(out, fp32, test, ref["preds"])
            rows.append({"method": method, "accuracy": r["accuracy"], "agreement": r["agreement"],
                         "builds": builds(out), "error": None})
        else:
            rows.append({"method": method, "accuracy": None, "agreement": None, "builds": "-",
                         "error": error or "no output"})
        print(f"{method}: {rows[-1]}", file=sys.stderr)

    out = a.out / "vitdeploy-int8.onnx"
    try:
        export_onnx(ckpt, out, options=ExportOptions(dynamic_batch=True, precision="int8", calib_dir=train,
                                                      calib_samples=a.calib))
        add("vitdeploy int8", out, None)
    except Exception as e:
        add("vitdeploy int8", out, str(e))
    for style in ("defaults", "tensorrt"):
        out = a.out / f"ort-{style}.onnx"
        add(f"ORT quantize_static ({style})", out, run_worker(None, "ort", str(fp32), str(out), str(calib), style))
    here = {tool: importlib.util.find_spec(mod) is not None for tool, mod in (("modelopt", "modelopt"),
                                                                            ("nncf", "nncf"))}
    if a.modelopt_python or here["modelopt"]:
        for method in ("entropy", "max"):
            for exclude_add, disable_mha in ((False, True), (False, False), (True, True)):
                name = f"ModelOpt ONNX PTQ ({method}{', --disable_mha_qdq' if disable_mha else ''}" \
                       f"{', Add excluded' if exclude_add else ''})"
                out = a.out / f"modelopt-{method}-{int(exclude_add)}{int(disable_mha)}.onnx"
                add(name, out, run_worker(a.modelopt_python, "modelopt", str(fp32), str(out), str(calib), method,
                                          exclude_add, disable_mha))
    else:
        print("ModelOpt: skipped (give --modelopt-python, see the docstring)", file=sys.stderr)
    if a.nncf_python or here["nncf"]:
        out = a.out / "nncf-transformer.onnx"
        add("NNCF (model_type=TRANSFORMER)", out, run_worker(a.nncf_python, "nncf", str(fp32), str(out), str(calib)))
    else:
        print("NNCF: skipped (give --nncf-python, see the docstring)", file=sys.stderr)

    from vitdeploy import sysinfo

    print(f"digits ViT, {len(files)} calibration images; ONNX Runtime CPU as written; "
          f"CPU {sysinfo.cpu_model()}")
    print("| method | accuracy / top-1 agreement with FP32 | TensorRT-RTX builds (sm89) |")
    print("| --- | --- | --- |")
    for r in rows:
        result = (f"{r['accuracy']:.1%} / {r['agreement']:.1%}" if r["accuracy"] is not None
                  else f"failed: {r['error']}")
        print(f"| {r['method']} | {result} | {r['builds']} |")
    (a.out / "int8_peers.json").write_text(json.dumps(
        {"calibration_images": len(files), "machine": sysinfo.machine(), "libraries": sysinfo.library_versions(),
         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
