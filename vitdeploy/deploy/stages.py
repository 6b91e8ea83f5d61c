"""The stages of ``vitdeploy deploy``, in order: each a short function over the bundle's artifacts, each
unit of work through :func:`vitdeploy.deploy.bundle.run_unit` (which skips what is already there)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitdeploy.deploy.bundle import (
    DONE,
    SKIPPED,
    Artifact,
    Bundle,
    NotPossible,
    Stage,
    Work,
    folder_key,
    library_key,
    machine_key,
    model_name,
    one_line,
    run_unit,
)
from vitdeploy.errors import VitDeployError

LOSSY = ("int8", "fp8")


def _ok(record: dict[str, Any]) -> bool:
    return record["status"] in (DONE, SKIPPED)


def _not_possible(why: str) -> Any:
    def work() -> Work:
        raise NotPossible(why)

    return work


# --- export -------------------------------------------------------------------------------------------
def export_stage(b: Bundle) -> None:
    from vitdeploy.exporters import ExportOptions

    opts = b.options
    calib = folder_key(b, opts.calib_dir) if any(p in LOSSY for p in opts.precisions) else None
    (b.out / "onnx").mkdir(exist_ok=True)
    for precision in opts.precisions:
        path = b.out / "onnx" / f"{b.stem()}-{precision}.onnx"
        lossy = precision in LOSSY
        eopts = ExportOptions(dynamic_batch=True, precision=precision, seed=opts.seed,
                              calib_dir=opts.calib_dir if lossy else None, calib_samples=opts.calib_samples,
                              task=opts.task, normalize=opts.normalize or None)
        key = {"source": b.source_key, "precision": precision, "calib": calib if lossy else None,
               "calib_samples": opts.calib_samples if lossy else None, "libraries": library_key(),
               # named only when asked for, so a bundle made before tasks keeps its key
               **({"task": opts.task, "normalize": opts.normalize} if opts.task or opts.normalize else {})}
        record = run_unit(b, "export", path.name, key, lambda p=path, e=eopts: _export(b, p, e))
        if _ok(record):
            b.artifacts.append(Artifact("onnx", precision, path))
    if not b.artifacts:
        raise VitDeployError(f"no ONNX exported, nothing to deploy: {record['reason']}")


def _export(b: Bundle, path: Path, eopts: Any) -> Work:
    from vitdeploy.exporters import export_onnx
    from vitdeploy.io import onnx_external_files

    report = export_onnx(b.source, path, config=b.options.config, options=eopts, progress=b.progress)
    return Work({**report.to_dict(), "path": b.rel(path)}, [path, *onnx_external_files(path)])


# --- build --------------------------------------------------------------------------------------------
def build_stage(b: Bundle) -> None:
    from vitdeploy.engines.tensorrt.build import BuildOptions, check_build_targets
    from vitdeploy.engines.tensorrt.sidecar import TENSORRT_RTX

    opts = b.options
    base = BuildOptions(flavour=opts.trt, compute_capabilities=list(opts.compute_capabilities), min_batch=1,
                        opt_batch=min(8, opts.max_batch), max_batch=opts.max_batch)
    try:
        flavour, targets = check_build_targets(base)
    except VitDeployError as e:  # no TensorRT, no GPU and no targets named, ...: the bundle says why
        run_unit(b, "build", "engines", {}, _not_possible(f"no engine built: {one_line(e)}"))
        return
    (b.out / "engines").mkdir(exist_ok=True)
    short = "rtx" if flavour == TENSORRT_RTX else "trt"
    for a in b.onnx_files():
        engine = b.out / "engines" / f"{a.path.stem}-{short}.engine"
        key = {"onnx": b.sha(a.path), "flavour": flavour, "targets": targets, "max_batch": opts.max_batch,
               "libraries": library_key()}
        record = run_unit(b, "build", engine.name, key, lambda a=a, e=engine: _build(b, a.path, e, base))
        if _ok(record):
            b.artifacts.append(Artifact("engine", a.precision, engine, a.path, flavour, targets))


def _build(b: Bundle, onnx: Path, engine: Path, options: Any) -> Work:
    from vitdeploy.engines.tensorrt.build import build_engine

    report = build_engine(onnx, engine, options, progress=b.progress)
    result = {**report.to_dict(), "engine": b.rel(engine), "sidecar": b.rel(report.sidecar), "onnx": b.rel(onnx)}
    return Work(result, [engine], [report.sidecar])


# --- verify -------------------------------------------------------------------------------------------
def verify_stage(b: Bundle) -> None:
    for a in b.artifacts:
        key = {"artifact": b.sha(a.path), "libraries": library_key(), "machine": machine_key()}
        run_unit(b, "verify", a.name, key, lambda a=a: _verify_onnx(b, a) if a.kind == "onnx" else _verify_engine(a))


def _verify_onnx(b: Bundle, a: Artifact) -> Work:
    """The export's own checks (parity with torch, golden set) and the golden set again, from the file."""
    from vitdeploy.verify import verify_artifact

    export = (b.record("export", a.name) or {}).get("result", {})
    report = verify_artifact(a.path, backend="onnxruntime", device="cpu")
    if report.failed:
        raise VitDeployError(f"drift: {report.reason()}")
    parity = export.get("verification") or {}
    detail = "; ".join(filter(None, [
        f"export: torch parity max abs {parity['max_abs']:.3g}, cosine {parity['cosine']:.6f}" if parity else "",
        f"golden set: {report.results[0].verdict.summary()} on {report.results[0].runtime}",
    ]))
    return Work({"verdict": "passed", "detail": detail, "export_parity": parity, "golden": report.to_dict()})


def _verify_engine(a: Artifact) -> Work:
    """The golden set on the engine where it can run here (the verdict also goes into its sidecar)."""
    from vitdeploy.verify import check_built_engine

    record = check_built_engine(a.path)
    if record["verified"] and not record["passed"]:
        raise VitDeployError(f"drift on {record.get('gpu')}: {record['reason']}")
    verdict = "passed" if record["verified"] else "not verified here"
    detail = record.get("summary") or record["reason"]
    return Work({"verdict": verdict, "detail": detail, "golden": record})


# --- accuracy -----------------------------------------------------------------------------------------
def accuracy_stage(b: Bundle) -> None:
    data = b.options.data
    if data is None:
        b.log("  no --data: accuracy not measured")
        return
    data_key = folder_key(b, data)
    fp32 = next((a for a in b.onnx_files() if a.precision == "fp32"), None)
    reference = _Fp32Outputs(b, fp32, data)
    for a in b.artifacts:
        ref = None if fp32 is None or a is fp32 else reference
        key = {"artifact": b.sha(a.path), "data": data_key, "libraries": library_key(),
               "machine": machine_key() if a.kind == "engine" else None,
               **({"reference": b.sha(fp32.path)} if ref is not None and fp32 is not None else {})}
        run_unit(b, "accuracy", a.name, key, lambda a=a, ref=ref: _accuracy(b, a, data, ref))


class _Fp32Outputs:
    """The FP32 ONNX's outputs on the --data images, computed the first time an artifact is scored against
    them (INT8, FP8, FP16 and the engines: cosine to FP32 for embeddings, top-1 agreement for classifiers)."""

    def __init__(self, b: Bundle, fp32: Artifact | None, data: Path) -> None:
        self.b, self.fp32, self.data, self._outputs = b, fp32, data, None

    def get(self) -> Any:
        from vitdeploy.evaluate import ReferenceOutputs

        if self._outputs is None and self.fp32 is not None:
            with _open_for(self.fp32, "onnxruntime") as rt:
                self._outputs = ReferenceOutputs.of(rt, self.data, self.b.options.eval_batch)
                self._outputs.name = f"{self.fp32.name} (fp32)"
        return self._outputs


def _open_for(a: Artifact, backend: str) -> Any:
    """The artifact through the first-load check: an ONNX on the CPU (``backend``), an engine on its GPU."""
    from vitdeploy.verify import engine_cannot_run_here, open_verified

    if a.kind == "engine":
        why = engine_cannot_run_here(a.path)
        if why:
            raise NotPossible(why)
        return open_verified(a.path, backend="tensorrt")
    return open_verified(a.path, backend=backend, device="cpu")


def _accuracy(b: Bundle, a: Artifact, data: Path, reference: _Fp32Outputs | None) -> Work:
    """The task's measure (top-1, or kNN top-1 for an embedding model) and the agreement with FP32."""
    from vitdeploy.evaluate import evaluate

    with _open_for(a, "onnxruntime") as rt:
        result = evaluate(rt, data, batch_size=b.options.eval_batch,
                          reference=reference.get() if reference is not None else None)
        return Work({**result.to_dict(), "runtime": rt.describe()})


# --- tune and bench -----------------------------------------------------------------------------------
def tune_stage(b: Bundle) -> None:
    from vitdeploy.engines.plan import MachineKey

    opts = b.options
    for a in b.onnx_files():
        paths = tune_candidates(a)
        key = {"artifact": b.sha(a.path), "machine": MachineKey.current().to_dict(), "batch": opts.tune_batch,
               "iters": opts.tune_iters, "seconds": opts.tune_seconds, "paths": [p.key() for p in paths]}
        run_unit(b, "tune", a.name, key, lambda a=a, p=paths: _tune(b, a, p))


def tune_candidates(a: Artifact) -> list[Any]:
    """The CPU paths ``vitdeploy tune`` tries for this file here (they are part of the tune unit's inputs: a
    path that becomes possible, OpenVINO installed, redoes the tune)."""
    from vitdeploy.engines.plan import MachineKey
    from vitdeploy.tune import candidate_paths, thread_counts

    return candidate_paths(a.path, thread_counts(), list(MachineKey.current().flags))


def _tune(b: Bundle, a: Artifact, paths: list[Any]) -> Work:
    from vitdeploy.engines.plan import plan_path
    from vitdeploy.tune import tune

    opts = b.options
    report = tune(a.path, batch=opts.tune_batch, iters=opts.tune_iters, min_seconds=opts.tune_seconds,
                  progress=b.progress, candidates=paths)
    plan = report.plan
    result = {"latency": plan.latency.label, "throughput": plan.throughput.label,
              "throughput_batch": plan.throughput_batch, "seconds": report.seconds, "reference": report.reference,
              "plan": b.rel(plan_path(a.path)), "candidates": [c.to_dict() for c in report.candidates]}
    return Work(result, [plan_path(a.path)])


def bench_stage(b: Bundle) -> None:
    from vitdeploy.engines.plan import plan_path

    opts = b.options
    for a in b.artifacts:
        plan = plan_path(a.path)
        key = {"artifact": b.sha(a.path), "plan": b.sha(plan) if a.kind == "onnx" and plan.is_file() else None,
               "machine": machine_key(), "libraries": library_key(), "batches": list(opts.bench_batches),
               "warmup": opts.bench_warmup, "iters": opts.bench_iters}
        run_unit(b, "bench", a.name, key, lambda a=a: _bench(b, a))


def _bench(b: Bundle, a: Artifact) -> Work:
    """The artifact's best path here (an ONNX: its tune plan, checked on first load) at each batch size."""
    from vitdeploy.bench import measure, release_memory, rss_mb

    opts = b.options
    release_memory()
    base = rss_mb()
    with _open_for(a, "auto") as rt:
        rows = [measure(rt, batch, opts.bench_warmup, opts.bench_iters, name=a.name, base_rss_mb=base).to_dict()
                for batch in opts.bench_batches]
        return Work({"runtime": rt.describe(), "rows": rows})


# --- triton -------------------------------------------------------------------------------------------
def triton_args(a: Artifact, max_batch: int, gpu: bool) -> dict[str, Any]:
    """How each artifact serves in Triton: an ONNX on onnxruntime_onnx (CPU instances without a GPU), a
    full-TensorRT engine on tensorrt_plan, a TensorRT-RTX engine on the Python backend (vitdeploy's runtime)."""
    from vitdeploy.engines.tensorrt.sidecar import TENSORRT_RTX

    if a.kind == "onnx":
        return {"max_batch": max_batch, "kind": "gpu" if gpu else "cpu", "triton_backend": "native"}
    return {"max_batch": max_batch, "kind": "gpu",
            "triton_backend": "python" if a.flavour == TENSORRT_RTX else "native"}


def triton_stage(b: Bundle) -> None:
    from vitdeploy import sysinfo

    gpu = bool(sysinfo.gpus())
    for a in b.artifacts:
        args = triton_args(a, b.options.max_batch, gpu)
        name = model_name(a.path)
        key = {"artifact": b.sha(a.path), "args": args, "name": name, "libraries": library_key()}
        run_unit(b, "triton", name, key, lambda a=a, args=args, name=name: _triton(b, a, name, args))


def _triton(b: Bundle, a: Artifact, name: str, args: dict[str, Any]) -> Work:
    import importlib.util

    from vitdeploy.serving.triton import write_triton_repo

    if importlib.util.find_spec("tritonclient") is None:  # config.pbtxt is rendered through Triton's own schema
        raise NotPossible("writing a Triton repository needs tritonclient: pip install 'vitdeploy[triton]'")
    repo = write_triton_repo(a.path, b.out / "triton", name, args["max_batch"], kind=args["kind"],
                             triton_backend=args["triton_backend"])
    result = {"artifact": b.rel(a.path), "model_dir": b.rel(repo.model_dir), "config": b.rel(repo.config),
              "triton_backend": repo.triton_backend, "args": args}
    return Work(result, [repo.config, repo.model_file])


def report_stage(b: Bundle) -> None:
    from vitdeploy.deploy.report import write_reports

    write_reports(b)


STAGES = (
    Stage("export", export_stage, "checkpoint -> ONNX in each precision, each checked against torch"),
    Stage("build", build_stage, "ONNX -> TensorRT engines for the targets asked, or what this machine can build"),
    Stage("verify", verify_stage, "each artifact against its golden set, where it can run here"),
    Stage("accuracy", accuracy_stage, "top-1 accuracy on --data"),
    Stage("tune", tune_stage, "the fastest CPU path per ONNX on this machine (vitdeploy tune)"),
    Stage("bench", bench_stage, "the best path per artifact at each batch size (vitdeploy bench)"),
    Stage("triton", triton_stage, "a Triton Inference Server model repository"),
    Stage("report", report_stage, "report.json and report.html"),
)
