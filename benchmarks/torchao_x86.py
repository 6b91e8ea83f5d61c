"""torchao's x86 INT8 (PT2E static quantization + torch.compile/inductor) against our FP32 torch model and
HF transformers, in one run with the same threads (issue 31 item 3: a `tune` candidate if it is faster).

    python benchmarks/torchao_x86.py [--model vit-base-patch16-224] [--threads N] [--batches 1,8]
                                     [--rounds 5] [--iters 10] [--calib 32] [--sdpa-fusion auto|on|off]

The flow is torchao's documented one for x86: ``torch.export.export`` -> ``prepare_pt2e`` with
``X86InductorQuantizer`` (default static config: per-tensor u8 activations, per-channel s8 weights) ->
calibration on digits images (vitdeploy.datasets.write_digits, preprocessed as the model's config says)
-> ``convert_pt2e`` -> ``torch.compile`` (inductor, ``freezing = True``; static shapes, so each batch
size compiles once, and its first call is reported as its compile time).

INT8 SDPA (torchao.prototype.inductor.fx_passes.qsdpa_fusion): with ``--sdpa-fusion on`` the attention
matmuls are quantized too and the post-grad pass that fuses Q/DQ + matmul/softmax/matmul into
``torchao::qscaled_dot_product`` is registered; whether it fired is read from inductor's counters. It
lowers to inductor's C++ template only on CPUs with AMX tiles; elsewhere to torchao's C++ kernel, which
the PyPI wheel may lack. ``auto`` enables it only where one of the two exists.

Rows (median ms per image over alternating rounds, vitdeploy.bench.side_by_side): HF transformers
ViTForImageClassification FP32 (default attention, the same weights), our torch model FP32 (eager,
torch SDPA), torchao INT8 compiled. Accuracy: max |logit difference| and cosine of torchao's logits
against our FP32 model's on held-out digits images. Needs torchao (not a vitdeploy dependency) and a
C++ compiler for inductor. Smoke-run: ``--model vit-tiny-patch16-224 --rounds 2 --iters 2``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.engines.base import InputSpec, Runtime

HF_ROW, FP32_ROW, INT8_ROW = "HF transformers default (sdpa)", "ours torch fp32", "torchao int8 (inductor)"


@dataclass
class Accuracy:
    """torchao INT8 logits against our FP32 model's, on ``images`` held-out digits images."""

    images: int
    ref_max_abs: float  # the FP32 logits' own scale, to read max_abs against
    max_abs: float
    min_cosine: float
    mean_cosine: float
    top1_agreement: float


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit-base-patch16-224", help="a vitdeploy preset (random init, seed 0)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for every row (default: all usable)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per batch size")
    ap.add_argument("--iters", type=int, default=10, help="timed calls per row per round at batch 1 (fewer at larger)")
    ap.add_argument("--calib", type=int, default=32, help="digits images to calibrate on")
    ap.add_argument("--check", type=int, default=16, help="held-out digits images for the accuracy check")
    ap.add_argument("--sdpa-fusion", choices=("auto", "on", "off"), default="auto",
                    help="torchao's INT8 SDPA fusion (auto: where an AMX CPU or torchao's CPU kernel can run it)")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    return ap.parse_args()


def require_tools() -> None:
    """One line and exit 1 when torchao or inductor's C++ compiler is missing."""
    if importlib.util.find_spec("torchao") is None:
        sys.exit("torchao is not installed: pip install torchao (e.g. torchao==0.18.0, --no-deps to keep torch)")
    import torch._inductor.config as inductor_config

    cxx = inductor_config.cpp.cxx[-1] or "g++"
    if shutil.which(cxx) is None:
        sys.exit(f"torch.compile (inductor) on the CPU needs a C++ compiler; {cxx!r} is not on PATH: install g++")


def fusion_support() -> tuple[bool, str]:
    """Whether torchao's INT8 SDPA can run here, and how: inductor's AMX template or torchao's C++ kernel."""
    import torch
    import torchao  # loads torchao's .so files, which register its C++ kernels

    try:
        import torchao.prototype.inductor.fx_passes.qsdpa_fusion  # noqa: F401
    except ImportError as e:
        return False, f"torchao has no INT8 SDPA fusion ({e})"
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    kernel = "CPU" in torch._C._dispatch_dump("torchao::qscaled_dot_product")
    if amx:
        return True, "AMX tiles: inductor's C++ qsdpa template"
    if kernel:
        return True, "no AMX: torchao's C++ kernel torchao::qscaled_dot_product"
    return False, ("no AMX tiles here, and this torchao build has no CPU kernel for torchao::qscaled_dot_product "
                   "(the fused op would fail at run time)")


def enable_fusion() -> None:
    """Register torchao's INT8 SDPA pattern as inductor's post-grad custom pre-pass (as torchao's tests do)."""
    import torch._inductor.config as inductor_config
    from torchao.prototype.inductor.fx_passes.qsdpa_fusion import _qsdpa_init, custom_pass

    # Checked with torch 2.13 + torchao 0.18 (digits of issue 31): the pattern matches neither our attention
    # (it scales Q before Q·Kᵀ; torchao's pattern wants the scale after) nor torchao's own test module:
    # torch 2.13's post-grad softmax guards the scaled scores (eq/abs/ne -> where) before exp, and
    # torchao's pattern expects exp(div(sub(s, amax(s)), scale)). The counter then stays 0.
    inductor_config.post_grad_custom_pre_pass = custom_pass
    _qsdpa_init()


def digits_inputs(cfg: Any, work: Path, calib: int, check: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibration images (train split) and held-out check images (test split), preprocessed for ``cfg``."""
    from vitdeploy.datasets import write_digits
    from vitdeploy.preprocess import Preprocessing, find_images, load_images

    train, test = write_digits(work / "digits")
    prep = Preprocessing.from_config(cfg)
    rng = np.random.default_rng(0)
    pick = [sorted(find_images(d)) for d in (train, test)]
    chosen = [[p[i] for i in rng.choice(len(p), n, replace=False)] for p, n in zip(pick, (calib, check), strict=True)]
    return load_images(chosen[0], prep), load_images(chosen[1], prep)


def quantize(model: Any, calib: np.ndarray, fusion: bool) -> Any:
    """torch.export -> prepare_pt2e(X86InductorQuantizer) -> calibrate -> convert_pt2e: the INT8 graph module."""
    import torch
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    if fusion:  # INT8 attention: Q/DQ on both matmuls' inputs, the pattern the qsdpa pass looks for
        quantizer.set_function_type_qconfig(torch.matmul, quantizer.get_global_quantization_config())
    example = (torch.from_numpy(calib[:2]),)
    batch = torch.export.Dim("batch", min=1, max=256)
    with torch.no_grad():
        exported = torch.export.export(model, example, dynamic_shapes=({0: batch},)).module()
        prepared = prepare_pt2e(exported, quantizer)
        for chunk in np.array_split(calib, max(1, len(calib) // 8)):
            prepared(torch.from_numpy(chunk))
        converted = convert_pt2e(prepared)
    move_exported_model_to_eval(converted)
    return converted


class TorchaoRuntime(Runtime):
    """A converted PT2E module under torch.compile (inductor, freezing, static shapes): each new batch
    size compiles on its first call, whose time ``compile_s`` keeps."""

    backend = "torchao"

    def __init__(self, converted: Any, cfg: Any, threads: int, fusion: bool) -> None:
        import torch
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # torchao's x86 recipe: constant-fold and prepack the INT8 weights
        torch.set_num_threads(threads)
        self.torch = torch
        self.threads = torch.get_num_threads()
        self.fusion = fusion
        self.model = torch.compile(converted, dynamic=False)
        h, w = cfg.image_hw
        self.spec = InputSpec("pixel_values", "float32", (cfg.num_channels, h, w), 1, 256)
        self.metadata = None
        self.compile_s: dict[int, float] = {}

    def describe(self) -> str:
        sdpa = ", int8 sdpa fusion" if self.fusion else ""
        return f"torchao[cpu, pt2e x86 int8, inductor freezing{sdpa}, {self.threads} threads]"

    def _run(self, batch: np.ndarray) -> np.ndarray:
        first = batch.shape[0] not in self.compile_s
        t = time.perf_counter()
        with self.torch.no_grad():
            out = self.model(self.torch.from_numpy(batch)).numpy()
        if first:
            self.compile_s[batch.shape[0]] = time.perf_counter() - t
        return out

    def close(self) -> None:
        self.model = None


def accuracy(ref: np.ndarray, got: np.ndarray) -> Accuracy:
    """Max abs difference and per-image cosine of ``got`` against ``ref`` (logits, [N, classes])."""
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    return Accuracy(len(ref), float(np.abs(ref).max()), float(np.abs(ref - got).max()), float(cos.min()),
                    float(cos.mean()), float(np.mean(ref.argmax(1) == got.argmax(1))))


def hf_folder(model: Any, folder: Path) -> Path:
    """Our weights as a transformers folder (config.json + model.safetensors), as cpu_backends.py writes it."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(model.config.to_json())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    return folder


def inductor_counts() -> dict[str, int]:
    """What inductor's quantization passes matched (qlinear/qconv prepack, qsdpa ...), from dynamo's counters."""
    from torch._dynamo.utils import counters

    return {k: v for k, v in sorted(counters["inductor"].items()) if k.startswith(("q", "dequant")) and v}


def time_rows(runtimes: dict[str, Runtime], batches: list[int], rounds: int, iters: int,
              spec: InputSpec) -> dict[int, dict[str, float]]:
    """Median ms per image per row and batch size, the rows run in alternating rounds."""
    from vitdeploy.bench import side_by_side

    ms: dict[int, dict[str, float]] = {}
    for b in batches:
        x = np.random.default_rng(0).standard_normal((b, *spec.shape), dtype=np.float32)
        for rt in runtimes.values():  # warm up: the torchao row compiles for this batch size here
            rt.infer(x)
        runs = side_by_side(runtimes, x, rounds, max(2, iters // b))
        ms[b] = {name: float(np.median(v)) for name, v in runs.items()}
        print(f"  b{b}: " + ", ".join(f"{k} {v:.2f} ms/img" for k, v in ms[b].items()), file=sys.stderr)
    return ms


def build_rows(args: argparse.Namespace, threads: int,
               work: Path) -> tuple[dict[str, Runtime], dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    """Open the three rows (quantizing torchao's) -> rows, notes, (check images, our FP32 logits on them)."""
    import torch

    from vitdeploy import load_model
    from vitdeploy.bench import HFRuntime
    from vitdeploy.engines.torch_backend import TorchRuntime

    model = load_model(args.model, seed=0)
    calib, check = digits_inputs(model.config, work, args.calib, args.check)
    can, why = fusion_support()
    fusion = args.sdpa_fusion == "on" or (args.sdpa_fusion == "auto" and can)
    if fusion:
        enable_fusion()
    t = time.perf_counter()
    converted = quantize(model, calib, fusion)
    info: dict[str, Any] = {"quantize_s": time.perf_counter() - t, "sdpa_fusion": fusion, "sdpa_fusion_support": why,
                            "calibration": f"{len(calib)} digits train images"}
    print(f"quantized (export, prepare, calibrate, convert) in {info['quantize_s']:.1f} s; "
          f"INT8 SDPA fusion {'on' if fusion else 'off'} ({why})", file=sys.stderr)
    rows: dict[str, Runtime] = {
        HF_ROW: HFRuntime(hf_folder(model, work / "hf"), "sdpa", threads),
        FP32_ROW: TorchRuntime(args.model, seed=0, device="cpu", dtype="fp32", threads=threads),
        INT8_ROW: TorchaoRuntime(converted, model.config, threads, fusion),
    }
    with torch.no_grad():
        ref = model(torch.from_numpy(check)).numpy()
    return rows, info, (check, ref)


def check_accuracy(int8: Runtime, check: np.ndarray, ref: np.ndarray, batch: int) -> Accuracy:
    """torchao's logits on the check images, in batches of a size already compiled, against ``ref``."""
    got = np.concatenate([int8.infer(check[i:i + batch]) for i in range(0, len(check), batch)])
    return accuracy(ref, got)


def main() -> None:
    args = parse_args()
    require_tools()
    import torch

    from vitdeploy import sysinfo
    from vitdeploy.sysinfo import usable_cpus

    sys.path.insert(0, str(Path(__file__).parent))
    from cpu_backends import machine_line

    threads = args.threads or usable_cpus()
    torch.set_num_threads(threads)
    batches = [int(b) for b in args.batches.split(",")]
    work = Path(tempfile.mkdtemp(prefix="vitdeploy-torchao-"))
    rows, info, (check, ref) = build_rows(args, threads, work)
    try:
        ms = time_rows(rows, batches, args.rounds, args.iters, rows[FP32_ROW].spec)
        acc = check_accuracy(rows[INT8_ROW], check, ref, max(batches))
    finally:
        for rt in rows.values():
            rt.close()
    int8 = rows[INT8_ROW]
    assert isinstance(int8, TorchaoRuntime)
    info.update(compile_s=int8.compile_s, inductor_counters=inductor_counts(), accuracy=asdict(acc))
    info["sdpa_fusion_fired"] = info["inductor_counters"].get("qsdpa_fuse_attention", 0)
    report(args, threads, batches, ms, info, machine_line())
    if args.out:
        summary = {"machine": sysinfo.machine(), "versions": sysinfo.library_versions(), "threads": threads,
                   "model": args.model, "ms_per_image_median": ms, **info}
        args.out.write_text(json.dumps(summary, indent=2, default=str))


def report(args: argparse.Namespace, threads: int, batches: list[int], ms: dict[int, dict[str, float]],
           info: dict[str, Any], machine: str) -> None:
    """The figures, one row per path, with the machine beside them."""
    import torch
    import torchao

    print(f"{machine}; {threads} threads for every row; torch {torch.__version__}, torchao {torchao.__version__}")
    print(f"\n{args.model}, median ms per image (alternating rounds), and speed-up over HF transformers default:")
    print(f"  {'path':30s}" + "".join(f"{'b' + str(b) + ' ms':>10s}{'/HF':>8s}" for b in batches))
    for name in ms[batches[0]]:
        print(f"  {name:30s}" + "".join(f"{ms[b][name]:10.2f}{ms[b][HF_ROW] / ms[b][name]:7.2f}x" for b in batches))
    compile_s = ", ".join(f"b{b} {s:.1f} s" for b, s in info["compile_s"].items())
    print(f"\ntorchao: quantize {info['quantize_s']:.1f} s; torch.compile (first call per batch size) {compile_s}")
    print(f"INT8 SDPA fusion: {'on' if info['sdpa_fusion'] else 'off'} ({info['sdpa_fusion_support']}); "
          f"qsdpa_fuse_attention fired {info['sdpa_fusion_fired']} times over {len(info['compile_s'])} compiles")
    print(f"inductor quantization matches, summed over the compiles: {json.dumps(info['inductor_counters'])}")
    a = info["accuracy"]
    print(f"accuracy vs our FP32 ({a['images']} held-out digits images, {info['calibration']} calibrated): "
          f"max |diff| {a['max_abs']:.4f} (FP32 max |logit| {a['ref_max_abs']:.3f}), "
          f"cosine min {a['min_cosine']:.5f} mean {a['mean_cosine']:.5f}, "
          f"top-1 agreement {a['top1_agreement']:.0%}")


if __name__ == "__main__":
    main()
