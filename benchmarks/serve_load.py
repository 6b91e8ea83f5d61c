"""Load test of `vitdeploy serve` on loopback against calling the runtime one request at a time.

    python benchmarks/serve_load.py [MODEL.onnx] [--clients 32] [--requests 50]

Without a model it exports a tiny ViT (224x224, 2 layers) first. Prints requests/s, p50/p99,
mean batch size from /metrics, and the direct one-at-a-time rate; every response is checked
against the logits of its own input.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from vitdeploy.engines import open_runtime
from vitdeploy.serving.loadtest import run_load
from vitdeploy.sysinfo import cpu_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-delay-ms", type=float, default=2.0)
    args = ap.parse_args()
    model = args.model
    if model is None:
        from vitdeploy.config import ViTConfig
        from vitdeploy.exporters import ExportOptions, export_onnx

        cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        patch_size=32, num_labels=10)
        from vitdeploy import save_model
        from vitdeploy.checkpoints import build_model

        tmp = Path(tempfile.mkdtemp())
        save_model(build_model(cfg, seed=0), tmp / "tiny.safetensors")
        model = export_onnx(tmp / "tiny.safetensors", tmp / "tiny.onnx",
                            options=ExportOptions(dynamic_batch=True)).path
    result = run_load(open_runtime(model), args.clients, args.requests, args.max_batch, args.max_delay_ms)
    result["cpu"] = cpu_model()
    result["speedup_vs_direct"] = result["requests_per_s"] / result["direct_one_at_a_time_rps"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
