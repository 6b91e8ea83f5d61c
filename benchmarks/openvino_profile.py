"""Where OpenVINO spends the time of one ONNX inference on the CPU: per-layer counters, summed by kind.

    python benchmarks/openvino_profile.py MODEL.onnx [--batch 1] [--hint bf16|f32] [--threads N] [--iters 20]
                                          [--attention as_written|float]

OpenVINO's own performance counters (``PERF_COUNT``, as ``benchmark_app -pc`` prints them) for the
last of ``--iters`` runs, grouped by layer type and kernel, with the share of the total and, for the
INT8 fully connected layers, their rate in GOP/s when the model is a vitdeploy ViT (FLOPs from the
config in the file's metadata). Counters add a little overhead, so the total exceeds a plain run's.
Then the attention subgraphs: the element types each one reads (``i8`` where attention runs in int8, from
``export --attention int8``) and its time; ``--attention float`` drops the attention's Q/DQ to compare.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--hint", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--attention", default="as_written", choices=["as_written", "float"])
    args = ap.parse_args()

    import openvino as ov

    from vitdeploy import sysinfo
    from vitdeploy.sysinfo import usable_cpus

    threads = args.threads or usable_cpus()
    core = ov.Core()
    model = core.read_model(str(args.model))
    if args.attention == "float":
        from vitdeploy.engines.openvino_backend import drop_attention_qdq

        print(f"attention's Q/DQ dropped on {drop_attention_qdq(model)} inputs")
    softmax = {op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Softmax"}
    shape = list(model.inputs[0].get_partial_shape().get_min_shape())
    model.reshape({0: [args.batch, *shape[1:]]})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                                 "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": args.hint,
                                                 "PERF_COUNT": True})
    request = compiled.create_infer_request()
    dtype = np.uint8 if model.inputs[0].get_element_type() == ov.Type.u8 else np.float32
    x = (np.random.default_rng(0).integers(0, 256, [args.batch, *shape[1:]]) if dtype == np.uint8
         else np.random.default_rng(0).standard_normal([args.batch, *shape[1:]])).astype(dtype)
    for _ in range(3):
        request.infer({0: x})
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        request.infer({0: x})
        times.append((time.perf_counter() - t) * 1e3)
    spent: collections.Counter[tuple[str, str]] = collections.Counter()
    count: collections.Counter[tuple[str, str]] = collections.Counter()
    for info in request.profiling_info:
        if info.status == info.Status.EXECUTED:
            key = (info.node_type, info.exec_type)
            spent[key] += info.real_time.total_seconds() * 1e3
            count[key] += 1
    total = sum(spent.values())
    print(f"CPU: {sysinfo.cpu_model()}; ISA: {' '.join(sysinfo.cpu_flags()) or '-'}; openvino {ov.__version__}; "
          f"{threads} threads, {args.hint} hint, batch {args.batch}")
    print(f"{args.model.name}: median {np.median(times):.2f} ms per run over {args.iters} runs (counters on); "
          f"counted layers {total:.2f} ms")
    print(f"  {'ms':>8s} {'share':>6s} {'n':>4s}  layer (kernel)")
    for (kind, kernel), ms in spent.most_common():
        if ms >= 0.01:
            print(f"  {ms:8.2f} {ms / total:6.1%} {count[kind, kernel]:4d}  {kind} ({kernel})")

    meta = {p.key: p.value for p in _metadata(args.model)}
    if "vitdeploy.config" in meta:
        from vitdeploy.config import ViTConfig

        cfg = ViTConfig.from_dict(json.loads(meta["vitdeploy.config"]))
        fc = sum(ms for (kind, _), ms in spent.items() if kind.startswith("FullyConnected"))
        s, h = cfg.num_patches + 1, cfg.hidden_size
        ph, pw = cfg.patch_hw
        # everything but attention's two products (the last block: [CLS] only) and the patch Conv
        attention = 2 * 2 * s * s * h * (cfg.num_hidden_layers - 1) + 2 * 2 * s * h
        patch = 2 * cfg.num_patches * cfg.num_channels * ph * pw * h
        linear = cfg.flops(args.batch) - args.batch * (attention + patch)
        if fc:
            print(f"  fully connected layers: {fc:.2f} ms for {linear / 1e9:.1f} GOP = {linear / fc / 1e6:.0f} GOP/s")
    _attention_lines(compiled, request, softmax)


def _attention_lines(compiled, request, softmax: set[str]) -> None:
    """Each compiled node that runs a Softmax of the model: the element types it reads and its time."""
    ms = {info.node_name: info.real_time.total_seconds() * 1e3 for info in request.profiling_info}
    rows = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        names = rt["originalLayersNames"].astype(str).split(",") if "originalLayersNames" in rt else []
        if softmax & set(names):
            kinds = ",".join(op.input(i).get_element_type().get_type_name() for i in range(op.get_input_size()))
            rows.append((rt["layerType"].astype(str), kinds, ms.get(op.get_friendly_name(), 0.0)))
    if rows:
        print(f"  attention: {len(rows)} subgraphs, {sum(r[2] for r in rows):.2f} ms; inputs "
              + ", ".join(sorted({f'{r[0]}({r[1]})' for r in rows})))


def _metadata(path: Path) -> list:
    import onnx

    return list(onnx.load(str(path), load_external_data=False).metadata_props)


if __name__ == "__main__":
    main()
