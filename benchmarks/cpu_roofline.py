"""How fast can this CPU run ViT-B at all? Matrix-multiply throughput per number format, as ratios.

    python benchmarks/cpu_roofline.py [--batches 1,8] [--threads N] [--model vit-base-patch16-224]
                                      [--skip-model] [--json out.json]

A ViT is almost all matrix products (``ViTConfig.flops``: 32.7 GFLOP per vit-base-patch16-224
image with our [CLS]-only last block, 35.1 for HF's full pass). This script measures, on this CPU,
in one run, the throughput of the products ViT-B is
made of (the MLP's 197*batch x 768 x 3072) in each number format the CPU backends can use:

- FP32 through ONNX Runtime (MLAS) and torch (oneDNN);
- INT8 through ONNX Runtime: uint8 x int8 (the kernels MLAS has for AVX2, AVX-512 VNNI, AMX)
  and int8 x int8 (what an int8 Q/DQ file asks for; x86 kernels only with AVX-VNNI-INT8);
- INT8 through OpenVINO: a Q/DQ MatMul as our INT8 file writes it (oneDNN's kernel, input
  quantization included), when openvino is installed;
- bf16 through torch (native with AVX-512 BF16 or AMX, emulated otherwise).

From these it prints the fastest any backend could run ViT-B per format (FLOPs / throughput), and
a floor for INT8 at batch 1: every quantized linear layer of the model at the best integer rate
measured for its own shape, everything else (attention's float products, softmax, LayerNorm, GELU)
free. No INT8 path on this machine's kernels can be faster than that floor;
then measures, on the CPU with the same threads: HF transformers FP32 with its default attention
(SDPA) and eager, our ONNX FP32 through ONNX Runtime, and our INT8 Q/DQ ONNX on the path
``vitdeploy tune`` chooses here; and reports the CPU targets against the silicon: the fastest
path at least 6x HF default at batch 1, and the INT8 path's achieved GOP/s against the measured
u8 x s8 ceiling (aim: >= 60%). On an AVX2-only CPU it reports FP32's share of its ceiling.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

WANTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "avx_vnni_int8", "amx_int8",
                "amx_bf16")


def _time(fn: Any, min_seconds: float = 2.0) -> float:
    for _ in range(2):
        fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _ort_session(nodes: list[Any], inputs: list[Any], output: Any, inits: list[Any], threads: int) -> Any:
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(nodes, "gemm", inputs, [output], inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def gemm_throughput(m: int, k: int, n: int, threads: int, integer_only: bool = False) -> dict[str, float]:
    """GFLOP/s (GOP/s for integers; 2 per multiply-add) of an (m, k) x (k, n) product per format
    (``integer_only``: ONNX Runtime u8 x s8 and OpenVINO's Q/DQ product only)."""
    import torch
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    ops = 2 * m * k * n
    out: dict[str, float] = {}

    if not integer_only:
        s = _ort_session([helper.make_node("MatMul", ["x", "w"], ["y"])],
                     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                         helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n]),
                         [numpy_helper.from_array(w, "w")], threads)
        out["onnxruntime fp32"] = ops / _time(lambda: s.run(None, {"x": x})) / 1e9

    wq = np.clip(np.round(w / 0.03), -127, 127).astype(np.int8)
    for name, dtype, proto in (("uint8 x int8", np.uint8, TensorProto.UINT8),
                               ("int8 x int8", np.int8, TensorProto.INT8))[:1 if integer_only else 2]:
        info = np.iinfo(dtype)
        xq = rng.integers(info.min, info.max, (m, k)).astype(dtype)
        inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(np.array(0.03, np.float32), "ws"),
                 numpy_helper.from_array(np.array(0, np.int8), "wz"),
                 numpy_helper.from_array(np.array(0.1, np.float32), "xs"),
                 numpy_helper.from_array(np.array(0, dtype), "xz")]
        node = helper.make_node("MatMulIntegerToFloat", ["x", "wq", "xs", "ws", "xz", "wz"], ["y"],
                                domain="com.microsoft")
        s8 = _ort_session([node], [helper.make_tensor_value_info("x", proto, [m, k])],
                          helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n]), inits, threads)
        out[f"onnxruntime {name}"] = ops / _time(lambda s8=s8, xq=xq: s8.run(None, {"x": xq})) / 1e9

    ov_rate = openvino_qdq_throughput(m, k, n, threads)
    if ov_rate is not None:
        out["openvino int8 Q/DQ"] = ov_rate

    if integer_only:
        return out
    torch.set_num_threads(threads)
    for name, dtype in (("torch fp32", torch.float32), ("torch bf16", torch.bfloat16)):
        a, b = torch.from_numpy(x).to(dtype), torch.from_numpy(w).to(dtype)
        with torch.inference_mode():
            out[name] = ops / _time(lambda a=a, b=b: a @ b) / 1e9
    return out


def openvino_qdq_throughput(m: int, k: int, n: int, threads: int) -> float | None:
    """GOP/s of OpenVINO running an (m, k) x (k, n) MatMul written as our INT8 file writes it: int8
    activation Q/DQ (zero point 0, input quantization included) and per-channel int8 weights. None
    without openvino."""
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        return None
    import openvino as ov
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    wq = rng.integers(-127, 128, (k, n)).astype(np.int8)
    inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(np.full(n, 0.03, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(n, np.int8), "wz"),
             numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
             numpy_helper.from_array(np.array(0, np.int8), "xz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    core = ov.Core()
    compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    x = rng.standard_normal((m, k)).astype(np.float32)
    return 2 * m * k * n / _time(lambda: request.infer({0: x})) / 1e9


def int8_floor(cfg: Any, batch: int, threads: int,
               known: dict[tuple[int, int], dict[str, float]] | None = None) -> dict[str, Any]:
    """The fastest any INT8 path could run the model here: each quantized linear layer (Q/K/V,
    attention output, MLP) at the best integer rate measured for its shape (ONNX Runtime u8 x s8,
    OpenVINO Q/DQ), the patch projection (a float Conv in our INT8 file) at the best float rate
    (FP32 or bf16), nothing else costing anything. ms per image. ``known``: rates already measured
    in this run for a (k, n) shape at this batch, reused rather than measured again."""
    h, i, s = cfg.hidden_size, cfg.intermediate_size, cfg.num_patches + 1
    ph, pw = cfg.patch_hw
    m = s * batch
    full = cfg.num_hidden_layers - 1
    # (k, n): rows per image; the last block's [CLS]-only products are counted at the full-height
    # rate (small products only run slower, so the floor stays a floor)
    layers = {(h, h): 4 * full * s + 2 * s + 2, (h, i): full * s + 1, (i, h): full * s + 1}
    rates, ms = {}, 0.0
    for (k, n), rows in layers.items():
        r = (known or {}).get((k, n)) or gemm_throughput(m, k, n, threads, integer_only=True)
        r = {key: v for key, v in r.items() if key in ("onnxruntime uint8 x int8", "openvino int8 Q/DQ")}
        best = max(r, key=r.__getitem__)
        rates[f"{k}x{n}"] = {"best": best, "gop_per_s": r[best], "all": r}
        ms += 2 * rows * k * n / (r[best] * 1e9) * 1e3
    k = cfg.num_channels * ph * pw
    r = gemm_throughput(cfg.num_patches * batch, k, h, threads)
    r = {key: v for key, v in r.items() if key in ("onnxruntime fp32", "torch fp32", "torch bf16")}
    best = max(r, key=r.__getitem__)
    rates[f"patch {k}x{h}"] = {"best": best, "gop_per_s": r[best], "all": r}
    ms += 2 * cfg.num_patches * k * h / (r[best] * 1e9) * 1e3
    return {"floor_ms_per_image": ms, "rates": rates}


def floor_line(hf_ms: float, floor: dict[str, Any]) -> str:
    """The 6x-HF-default target against :func:`int8_floor`, in one line."""
    shapes = ", ".join(f"{k}: {v['gop_per_s']:.0f} GOP/s ({v['best']})" for k, v in floor["rates"].items())
    ms = floor["floor_ms_per_image"]
    return (f"  6x HF default needs <= {hf_ms / 6:.1f} ms/img; INT8's linear layers alone, each at the best "
            f"integer rate measured for its shape ({shapes}), take {ms:.1f} ms/img: at most {hf_ms / ms:.2f}x "
            f"on this machine's kernels")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-model", action="store_true", help="Only the matrix products, not ViT-B itself.")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--model", default="vit-base-patch16-224", help="a preset (smoke-run: vit-tiny-patch16-224)")
    args = ap.parse_args()

    from vitdeploy import sysinfo
    from vitdeploy.config import preset
    from vitdeploy.sysinfo import usable_cpus

    threads = args.threads or usable_cpus()
    cfg = preset(args.model)
    flags = set(sysinfo.cpu_flags())
    summary: dict[str, Any] = {
        "cpu": sysinfo.cpu_model(), "threads": threads,
        "flags": {f: f in flags for f in WANTED_FLAGS}, "gflop_per_image": cfg.flops() / 1e9, "batches": {},
    }
    print(f"cpu: {summary['cpu']}, {threads} threads; "
          f"flags: {' '.join(f for f in WANTED_FLAGS if f in flags) or 'none of ' + ', '.join(WANTED_FLAGS)}")
    print(f"{args.model}: {cfg.flops() / 1e9:.1f} GFLOP per image")

    model_ms: dict[int, dict[str, float]] = {}
    if not args.skip_model:
        model_ms = measure_models([int(b) for b in args.batches.split(",")], threads, args.model)

    for batch in (int(b) for b in args.batches.split(",")):
        m = (cfg.num_patches + 1) * batch
        rates = gemm_throughput(m, cfg.hidden_size, cfg.intermediate_size, threads)
        floor = {k: cfg.flops() / (v * 1e9) * 1e3 for k, v in rates.items()}
        best = max(rates, key=rates.__getitem__)
        entry: dict[str, Any] = {"gemm_shape": [m, cfg.hidden_size, cfg.intermediate_size],
                                 "gop_per_s": rates, "floor_ms_per_image": floor, "fastest_format": best}
        print(f"\nbatch {batch}: ({m} x {cfg.hidden_size}) x ({cfg.hidden_size} x {cfg.intermediate_size})")
        print(f"  {'format':28s} {'GOP/s':>8s} {'vs fp32':>8s} {'model floor ms/img':>19s}")
        for k, v in rates.items():
            print(f"  {k:28s} {v:8.1f} {v / rates['onnxruntime fp32']:7.2f}x {floor[k]:19.0f}")
        if batch == 1:
            entry["int8_floor"] = int8_floor(cfg, 1, threads)
            print(f"  INT8 floor at batch 1 (each linear layer at the best integer rate measured for its shape, "
                  f"nothing else costing anything): {entry['int8_floor']['floor_ms_per_image']:.1f} ms/img")
        if batch in model_ms:
            got = model_ms[batch]
            hf, ort32, int8 = got["hf_default_fp32"], got["onnxruntime_fp32"], got["int8_tuned"]
            fastest = min(got, key=got.__getitem__)
            achieved = cfg.flops() / (int8 / 1e3) / 1e9
            u8 = rates["onnxruntime uint8 x int8"]
            entry.update(measured_ms_per_image=got, fastest_path=fastest, fastest_vs_hf_default=hf / got[fastest],
                         onnxruntime_fp32_share_of_fp32_ceiling=floor["onnxruntime fp32"] / ort32,
                         int8_achieved_gop_per_s=achieved, int8_share_of_u8s8_ceiling=achieved / u8)
            print(f"  measured (ms/img): HF default (sdpa) FP32 {hf:.1f}, HF eager FP32 {got['hf_eager_fp32']:.1f}, "
                  f"ONNX FP32 on ONNX Runtime {ort32:.1f} ({floor['onnxruntime fp32'] / ort32:.0%} of the FP32 "
                  f"product rate), INT8 on the tuned path {int8:.1f}")
            if batch == 1:
                print(f"  target: fastest path >= 6x HF default at batch 1 on ViT-B/16 (AVX-512 VNNI): {fastest} "
                      f"is {hf / got[fastest]:.2f}x")
                print(floor_line(hf, entry["int8_floor"]))
            print(f"  target: INT8 >= 60% of the u8 x s8 ceiling: {achieved:.0f} of {u8:.0f} GOP/s "
                  f"= {achieved / u8:.0%}")
        summary["batches"][batch] = entry
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


def measure_models(batches: list[int], threads: int, model_name: str) -> dict[int, dict[str, float]]:
    """HF transformers FP32 (default attention and eager), our ONNX FP32 on ONNX Runtime and our INT8
    ONNX on the path ``vitdeploy tune`` picks, all on the CPU with ``threads``: ms per image (median)."""
    from safetensors.torch import save_file

    from vitdeploy.bench import HFRuntime
    from vitdeploy.checkpoints import resolve
    from vitdeploy.datasets import write_digits
    from vitdeploy.engines import open_runtime
    from vitdeploy.exporters import ExportOptions, export_onnx
    from vitdeploy.tune import tune

    work = Path(tempfile.mkdtemp(prefix="vitdeploy-roofline-"))
    model = resolve(model_name, seed=0).model
    (work / "hf").mkdir()
    (work / "hf" / "config.json").write_text(model.config.to_json())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, work / "hf" / "model.safetensors")
    onnx_path = export_onnx(work / "hf", work / "vit.onnx", options=ExportOptions(dynamic_batch=True)).path
    train, _ = write_digits(work / "digits")
    int8_path = export_onnx(work / "hf", work / "vit-int8.onnx", options=ExportOptions(
        dynamic_batch=True, precision="int8", calib_dir=train, calib_samples=64)).path
    tune(int8_path, batch=max(max(batches), 2), threads=[threads])
    runtimes = {"hf_default_fp32": lambda: HFRuntime(work / "hf", "sdpa", threads),
                "hf_eager_fp32": lambda: HFRuntime(work / "hf", "eager", threads),
                "onnxruntime_fp32": lambda: open_runtime(onnx_path, backend="onnxruntime", device="cpu",
                                                         threads=threads),
                "int8_tuned": lambda: open_runtime(int8_path, device="cpu")}
    out: dict[int, dict[str, float]] = {b: {} for b in batches}
    for key, factory in runtimes.items():
        with factory() as rt:
            for batch in batches:
                x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
                out[batch][key] = _time(lambda rt=rt, x=x: rt.infer(x), 5.0) * 1e3 / batch
            print(f"  {key}: {rt.describe()}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
