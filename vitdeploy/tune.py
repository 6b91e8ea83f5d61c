"""``vitdeploy tune``: measure every CPU path that can run an ONNX here and write the plan beside it.

Candidates: ONNX Runtime (an INT8 Q/DQ file both as written and with its activations as uint8) and
OpenVINO (f32 hint, bf16 hint where the CPU has native bf16, LATENCY and THROUGHPUT hints), each at
the thread counts worth trying (physical cores, and all logical CPUs when they differ). A file with INT8
attention (``export --attention int8``) is also timed on OpenVINO with that attention's Q/DQ dropped
(``attention="float"``): INT8 attention is kept only where it is faster, and like every path it passes
the accuracy guard first. Where OpenVINO is missing and the CPU's ISA favours its INT8/bf16 kernels, the
report says so and how to add it (:func:`missing_backend_advice`).

Accuracy guard: the reference is the same file run literally by ONNX Runtime on the CPU (graph
optimizations off, Q/DQ as written), i.e. what the ONNX means. The file's own quality against the
float model was checked when it was exported; what can go wrong here is a path computing something
else (a fused kernel, a lower-precision hint), so every candidate is compared with that reference on
the verification inputs (the seed-0 random inputs export verifies with, plus ``images``), with
export's tolerance for the lossier of the file's and the path's precision and a top-1 agreement
floor on the inputs where the reference is decisive (not a near-tie). A path that fails is never chosen.

Timing is short on purpose (ViT-B in minutes): a few warm-up runs, then a quick estimate, and a
candidate more than ``prune`` times slower than the best so far stops there. Candidates are timed one
after another, so a machine that speeds up or slows down meanwhile (turbo, a neighbour's load) can
swap two close ones: the finalists within ``RUNOFF_MARGIN`` of the best at each batch size are then
timed again side by side, in alternating rounds, and those figures decide.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.bench import side_by_side, time_runs
from vitdeploy.engines import artifact_kind, open_runtime
from vitdeploy.engines.base import Runtime
from vitdeploy.engines.plan import MachineKey, PathChoice, TunePlan, plan_path
from vitdeploy.errors import VitDeployError
from vitdeploy.metrics import TOLERANCES, Comparison, compare_logits
from vitdeploy.sysinfo import is_x86, usable_cpus

# bf16 keeps 8 significant bits (fp16 11): looser than export's fp16 tolerance, tighter than int8's
GUARD_TOLERANCES: dict[str, dict[str, float]] = {**TOLERANCES, "bf16": {"max_abs_rel": 0.1, "min_cosine": 0.995}}
LOSSINESS = ("fp32", "fp16", "bf16", "int8", "fp8")
# Top-1 agreement is counted on the inputs where the reference is decisive: its best logit leads the
# runner-up by more than DECISIVE_MARGIN x the logits' scale. On a near-tie any rounding flips the
# class (random-weight models and random inputs are nearly all near-ties), and the error bounds
# above already judge those; on decisive inputs exact-ish paths must always agree, lossy ones 7 in 8.
DECISIVE_MARGIN = 0.05
MIN_TOP1 = {"fp32": 1.0, "fp16": 1.0, "bf16": 0.875, "int8": 0.875, "fp8": 0.875}
VERIFY_INPUTS = 32
RUNOFF_MARGIN = 0.10  # finalists: within 10% of the best
RUNOFF_FINALISTS = 3
RUNOFF_ROUNDS = 3
# between two runtimes' turns: the previous one's thread pool goes idle (OpenVINO's was seen slowing
# ONNX Runtime by half 0.1 s after its last run)
RUNOFF_PAUSE_S = 0.5


@dataclass
class Candidate:
    choice: PathChoice
    precision: str = "fp32"  # the lossier of the file's and the path's
    status: str = "pending"  # ok | rejected | pruned | failed
    reason: str = ""
    guard: Comparison | None = None
    decisive: int = 0  # verification inputs on which the reference is decisive
    decisive_top1: float = 1.0  # top-1 agreement on those
    ms_per_image: dict[int, float] = field(default_factory=dict)  # batch -> median ms per image
    pruned: list[int] = field(default_factory=list)  # batches where a quick estimate was already too slow
    runoff: list[int] = field(default_factory=list)  # batches whose figure comes from the side-by-side runoff
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.choice.to_dict(), "precision": self.precision, "status": self.status,
                "reason": self.reason, "guard": self.guard.to_dict() if self.guard else None,
                "decisive_inputs": self.decisive, "decisive_top1_agreement": self.decisive_top1,
                "ms_per_image": {str(k): v for k, v in self.ms_per_image.items()}, "stopped_early_at": self.pruned,
                "runoff_at": self.runoff,
                "runtime": self.description}


@dataclass
class TuneReport:
    path: Path
    plan: TunePlan
    candidates: list[Candidate]
    reference: str
    seconds: float
    advice: list[str] = field(default_factory=list)  # a missing backend that would likely be faster here

    def table(self, width: int | None = None, wide: bool = False) -> Any:
        """Every candidate path as a rich Table with the columns that fit ``width``."""
        from vitdeploy.tables import Column, fit_table

        tb = self.plan.throughput_batch
        columns = [Column("path", 0, "left", True), Column("guard", 1, "left", True), Column("b1", 0),
                   Column(f"b{tb}", 0), Column("status", 0, "left", True)]
        rows = []
        for c in self.candidates:
            g = c.guard
            guard = (f"cos {g.cosine:.5f}, top-1 {c.decisive_top1 * 100:.0f}% of {c.decisive} decisive"
                     if g else "-")
            chosen = [w for w, ch in (("latency", self.plan.latency), ("throughput", self.plan.throughput))
                      if ch.key() == c.choice.key()]
            status = c.status + (f" ({c.reason})" if c.reason else "")
            if chosen:
                status = "CHOSEN for " + " and ".join(chosen)
            cells = [(f"{c.ms_per_image[b]:.2f}" + ("*" if b in c.pruned else "") + ("r" if b in c.runoff else ""))
                     if b in c.ms_per_image else "-" for b in (1, tb)]
            rows.append([c.choice.label, guard, *cells, status])
        return fit_table(f"vitdeploy tune {self.path.name}: ms per image, accuracy guard against {self.reference}",
                         columns, rows, width, wide,
                         caption="* stopped early (quick estimate); r: timed again side by side with the other "
                                 "finalists")

    def summary(self) -> str:
        m = self.plan.machine
        return (f"wrote {plan_path(self.path)} in {self.seconds:.0f} s: batch < {self.plan.throughput_batch} -> "
                f"{self.plan.latency.label}; batch >= {self.plan.throughput_batch} -> {self.plan.throughput.label} "
                f"(CPU {m.cpu}, {m.cpus} CPUs, flags {' '.join(m.flags) or '-'})"
                + "".join(f"\n{line}" for line in self.advice))

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "plan": self.plan.to_dict(), "reference": self.reference,
                "seconds": self.seconds, "candidates": [c.to_dict() for c in self.candidates],
                "advice": self.advice}


def physical_cores() -> int:
    """Cores (not hyper-threads) among the CPUs this process may use."""
    import os

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            return usable_cpus()
    return len(cores) or usable_cpus()


def thread_counts() -> list[int]:
    return sorted({physical_cores(), usable_cpus()})


def _has_qdq(path: Path) -> bool:
    from vitdeploy.io import load_onnx_graph

    return any(n.op_type == "QuantizeLinear" for n in load_onnx_graph(path).graph.node)


def _has_attention_qdq(path: Path) -> bool:
    from vitdeploy.exporters.precision import qdq_coverage
    from vitdeploy.io import load_onnx_graph

    return qdq_coverage(load_onnx_graph(path))["attention_quantized"] > 0


# ISA flags on which OpenVINO's CPU plugin has INT8 (VNNI, AMX) or bf16 kernels that ONNX Runtime's
# default CPU provider does not use for a whole ViT (attention included)
OPENVINO_ISA = ("amx_int8", "amx_bf16", "avx512_vnni", "avx512_bf16", "avx_vnni")


def missing_backend_advice(flags: list[str], qdq: bool, installed: bool | None = None) -> list[str]:
    """What to install for a likely faster path on this CPU: OpenVINO where the ISA has the INT8/bf16
    instructions its kernels use (a likelihood from the ISA, not a measurement: tune measures once it is there)."""
    installed = importlib.util.find_spec("openvino") is not None if installed is None else installed
    useful = [f for f in OPENVINO_ISA if f in flags]
    if installed or not useful:
        return []
    what = "INT8 (attention included)" if qdq else "bf16"
    return [f"OpenVINO is not installed: on this CPU ({', '.join(useful)}) its {what} paths are likely faster "
            "than ONNX Runtime's; add it with pip install 'vitdeploy[openvino]' and run tune again"]


def candidate_paths(path: Path, threads: list[int], flags: list[str]) -> list[PathChoice]:
    """Every CPU path worth measuring for this file on this CPU."""
    x86 = is_x86()
    qdq = _has_qdq(path)
    attention_qdq = qdq and _has_attention_qdq(path)
    out: list[PathChoice] = []
    for t in threads:
        if qdq:
            if x86:
                out.append(PathChoice("onnxruntime", {"threads": t, "qdq_activations": "uint8"},
                                      f"onnxruntime, Q/DQ as uint8, {t} threads"))
            out.append(PathChoice("onnxruntime", {"threads": t, "qdq_activations": "int8"},
                                  f"onnxruntime, Q/DQ as written, {t} threads"))
        else:
            out.append(PathChoice("onnxruntime", {"threads": t}, f"onnxruntime, {t} threads"))
    if importlib.util.find_spec("openvino"):
        hints = ["f32"] + (["bf16"] if {"avx512_bf16", "amx_bf16"} & set(flags) else [])
        for t in threads:
            for precision in hints:
                for mode in ("LATENCY", "THROUGHPUT"):
                    out.append(PathChoice("openvino", {"threads": t, "precision_hint": precision, "hint": mode},
                                          f"openvino, {precision}, {mode.lower()}, {t} threads"))
                    if attention_qdq and precision == hints[-1]:  # the same, attention float
                        out.append(PathChoice(
                            "openvino", {"threads": t, "precision_hint": precision, "hint": mode,
                                         "attention": "float"},
                            f"openvino, {precision}, {mode.lower()}, {t} threads, attention Q/DQ dropped"))
    return out


def verification_inputs(rt: Runtime, images: Path | None = None, n: int = VERIFY_INPUTS) -> np.ndarray:
    """Export's verification inputs (seed-0 standard normal; random pixels for a uint8-input model),
    plus ``images`` in the form the artifact takes."""
    from vitdeploy.bench import random_batch

    x = random_batch(rt.spec, n)
    if images is not None:
        from vitdeploy.preprocess import find_images, open_image

        x = np.concatenate([x, rt.preprocess([open_image(f) for f in find_images(images)[:64]])])
    return x


def decisive_inputs(reference: np.ndarray, scale: float) -> np.ndarray:
    """Rows whose best reference logit leads the runner-up by more than DECISIVE_MARGIN x ``scale``."""
    ref = np.asarray(reference, dtype=np.float64)
    if ref.ndim != 2 or ref.shape[1] < 2:
        return np.ones(ref.shape[0] if ref.ndim else 1, dtype=bool)
    top2 = np.sort(ref, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) > DECISIVE_MARGIN * scale


def _path_precision(choice: PathChoice, file_precision: str) -> str:
    own = "bf16" if choice.options.get("precision_hint") == "bf16" else "fp32"
    ranks = [LOSSINESS.index(p) for p in (own, file_precision) if p in LOSSINESS]
    return LOSSINESS[max(ranks)]


def _default_opener(path: Path) -> Callable[[PathChoice], Runtime]:
    def opener(choice: PathChoice) -> Runtime:
        return open_runtime(path, backend=choice.backend, device="cpu", use_plan=False, **choice.options)

    return opener


@dataclass
class TuneOptions:
    """How :func:`tune` measures: see its docstring."""
    batch: int = 8
    threads: list[int] | None = None
    images: Path | None = None
    warmup: int = 2
    iters: int = 10
    prune: float = 1.5
    progress: bool = False
    candidates: list[PathChoice] | None = None
    opener: Callable[[PathChoice], Runtime] | None = None
    write: bool = True
    min_seconds: float = 0.5


@dataclass
class _Reference:
    """What every candidate is checked and timed on: the file run literally by ONNX Runtime."""
    x_verify: np.ndarray  # the verification inputs
    logits: np.ndarray  # the reference's answers on them
    file_precision: str
    x1: np.ndarray  # the batch-1 timing input
    xb: np.ndarray  # the throughput-batch timing input
    name: str = "ONNX Runtime CPU, graph as written (no optimizations)"


def tune(path: str | Path, batch: int = 8, threads: list[int] | None = None, images: Path | None = None,
         warmup: int = 2, iters: int = 10, prune: float = 1.5, progress: bool = False,
         candidates: list[PathChoice] | None = None, opener: Callable[[PathChoice], Runtime] | None = None,
         write: bool = True, min_seconds: float = 0.5) -> TuneReport:
    """Measure the CPU paths for ``path`` at batch 1 and ``batch``; write the plan (``write``).

    Each candidate is timed for ``iters`` runs and at least ``min_seconds`` per batch size (after a
    warm-up of ``warmup`` runs and at least 0.4 x ``min_seconds``).

    ``opener`` opens a candidate (default: :func:`open_runtime` on the CPU); tests use it to inject faults.
    """
    return tune_with(path, TuneOptions(batch=batch, threads=threads, images=images, warmup=warmup, iters=iters,
                                       prune=prune, progress=progress, candidates=candidates, opener=opener,
                                       write=write, min_seconds=min_seconds))


def tune_with(path: str | Path, opts: TuneOptions) -> TuneReport:
    """:func:`tune` with its options in one object. Stages: check the artifact -> candidates -> the
    reference and verification inputs -> guard and time each candidate -> runoff of the finalists ->
    choose and write the plan."""
    t_start = time.perf_counter()
    path = Path(path)
    _check_artifact(path, opts.batch)
    machine = MachineKey.current()
    choices = opts.candidates if opts.candidates is not None else candidate_paths(
        path, opts.threads or thread_counts(), list(machine.flags))
    open_path = opts.opener or _default_opener(path)
    ref = _reference(path, opts)
    results = _measure_all(path, choices, open_path, ref, opts)
    _runoffs(results, open_path, ref, opts)
    plan = _choose(path, machine, results, opts.batch)
    if opts.write:
        plan.write(plan_path(path))
    advice = missing_backend_advice(list(machine.flags), _has_qdq(path)) if opts.candidates is None else []
    return TuneReport(path, plan, results, ref.name, time.perf_counter() - t_start, advice)


def _check_artifact(path: Path, batch: int) -> None:
    if not path.is_file():
        raise VitDeployError(f"{path} does not exist")
    if artifact_kind(path) != "onnx":
        raise VitDeployError(f"tune measures CPU paths for ONNX files, not {path.name}: "
                             f"export one with `vitdeploy export --model {path} --output model.onnx`")
    if batch < 2:
        raise VitDeployError("the throughput batch must be at least 2 (batch 1 is the latency case)")


def _reference(path: Path, opts: TuneOptions) -> _Reference:
    """Stage "reference": the verification inputs and the file's answers on them, run as written."""
    from vitdeploy.artifacts.precision import graph_precision
    from vitdeploy.io import load_onnx_graph

    with open_runtime(path, backend="onnxruntime", device="cpu", use_plan=False, optimization="disable",
                      qdq_activations="int8") as ref:
        x_verify = verification_inputs(ref, opts.images)
        # the file's real precision, read from its graph: never the metadata's claim (issue 29)
        return _Reference(x_verify, ref.infer(x_verify), graph_precision(load_onnx_graph(path)),
                          x_verify[:1], np.resize(x_verify, (opts.batch, *x_verify.shape[1:])))


def _failure(e: Exception, prefix: str = "", width: int = 160) -> str:
    return prefix + (" ".join(str(e).split())[:width] or type(e).__name__)


def _measure_all(path: Path, choices: list[PathChoice], open_path: Callable[[PathChoice], Runtime],
                 ref: _Reference, opts: TuneOptions) -> list[Candidate]:
    """Stage "measure": each candidate opened, guarded and timed in turn; a failure is reported on it."""
    bar = None
    if opts.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(choices), desc=f"tuning {path.name}", unit="path", leave=False)
    results: list[Candidate] = []
    best: dict[int, float] = {}
    try:
        for choice in choices:
            c = Candidate(choice, precision=_path_precision(choice, ref.file_precision))
            results.append(c)
            if bar is not None:
                bar.set_postfix_str(choice.label)
            try:
                rt = open_path(choice)
            except Exception as e:  # a path this machine cannot run is reported, not fatal
                c.status, c.reason = "failed", _failure(e)
                if bar is not None:
                    bar.update(1)
                continue
            try:
                c.description = rt.describe()
                _measure_candidate(rt, c, ref, opts, best)
            except Exception as e:
                c.status, c.reason = "failed", _failure(e)
            finally:
                rt.close()
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return results


def _runoffs(results: list[Candidate], open_path: Callable[[PathChoice], Runtime], ref: _Reference,
             opts: TuneOptions) -> None:
    """Stage "runoff": the close finalists at each batch size timed again side by side (:func:`_runoff`)."""
    ok = [c for c in results if c.status == "ok"]
    for x in (ref.x1, ref.xb):
        _runoff(ok, x, open_path, opts.warmup, opts.iters, opts.min_seconds,
                lambda c, rt: _guard(rt, c, ref.logits, ref.x_verify, ref.file_precision))


def _choose(path: Path, machine: MachineKey, results: list[Candidate], batch: int) -> TunePlan:
    """Stage "choose": the fastest guarded path at batch 1 and at ``batch``, as a plan."""
    from vitdeploy.io import sha256_file

    ok = [c for c in results if c.status == "ok"]
    if not ok:
        reasons = "; ".join(f"{c.choice.label}: {c.status} {c.reason}" for c in results)
        raise VitDeployError(f"no CPU path passed the accuracy guard for {path.name} ({reasons}); no plan written")

    # a runoff's figures were timed side by side: where there was one, its winner is the choice (the
    # others were already over RUNOFF_MARGIN slower, in figures from another moment)
    def rank(b: int) -> Callable[[Candidate], tuple[bool, bool, float]]:
        runoff = any(b in c.runoff for c in ok)
        return lambda c: (b in c.pruned, runoff and b not in c.runoff, c.ms_per_image[b])

    lat = min(ok, key=rank(1))
    thr = min(ok, key=rank(batch))
    return TunePlan(artifact=path.name, artifact_sha256=sha256_file(path), machine=machine, latency=lat.choice,
                    throughput=thr.choice, throughput_batch=batch, candidates=[c.to_dict() for c in results])


def _runoff(ok: list[Candidate], x: np.ndarray, open_path: Callable[[PathChoice], Runtime], warmup: int,
            iters: int, min_seconds: float, guard: Callable[[Candidate, Runtime], bool]) -> None:
    """Time again, side by side in alternating rounds, the finalists at batch ``len(x)``: the candidates
    within RUNOFF_MARGIN of the best (at most RUNOFF_FINALISTS). Their medians replace the first figures.

    Each finalist is opened anew, so it passes the accuracy guard again first (a path whose answers
    change between two openings is not one to choose); one that fails it, or fails to open or run,
    is out, with the reason on it."""
    b = x.shape[0]
    timed = sorted((c for c in ok if c.status == "ok" and b in c.ms_per_image and b not in c.pruned),
                   key=lambda c: c.ms_per_image[b])
    if len(timed) < 2:
        return
    limit = timed[0].ms_per_image[b] * (1 + RUNOFF_MARGIN)
    finalists = [c for c in timed if c.ms_per_image[b] <= limit][:RUNOFF_FINALISTS]
    if len(finalists) < 2:
        return
    runtimes: dict[int, Runtime] = {}
    try:
        for i, c in enumerate(finalists):
            try:
                rt = runtimes[i] = open_path(c.choice)
                if not guard(c, rt):
                    c.reason += " (when opened again for the runoff)"
                    continue
                time_runs(rt, x, warmup, 0.4 * min_seconds)
            except Exception as e:
                c.status, c.reason = "failed", _failure(e, "runoff: ", 150)
        live = {i: rt for i, rt in runtimes.items() if finalists[i].status == "ok"}
        per_round = max(2, (iters if b == 1 else max(3, iters // 2)) // RUNOFF_ROUNDS)

        def failed(i: int, e: Exception) -> None:
            finalists[i].status, finalists[i].reason = "failed", _failure(e, "runoff: ", 150)

        runs = side_by_side(live, x, RUNOFF_ROUNDS, per_round, min_seconds, RUNOFF_PAUSE_S, on_error=failed)
    finally:
        for rt in runtimes.values():
            rt.close()
    for i, r in runs.items():
        if finalists[i].status == "ok" and r:
            finalists[i].ms_per_image[b] = statistics.median(r)
            finalists[i].runoff.append(b)


def _guard(rt: Runtime, c: Candidate, reference: np.ndarray, x_verify: np.ndarray, file_precision: str) -> bool:
    """The accuracy guard: True when ``rt`` passes; otherwise ``c`` is rejected, with the reason. The golden
    set is held to ``file_precision`` (the graph's, never the set's own claim)."""
    out = rt.infer(x_verify)
    c.guard = compare_logits(reference, out)
    embedding = rt.metadata is not None and rt.metadata.is_embedding
    # an embedding has no top-1: every input's own cosine must pass instead
    decisive = decisive_inputs(reference, c.guard.scale) & (not embedding)
    c.decisive = int(decisive.sum())
    if c.decisive:
        c.decisive_top1 = float(np.mean(reference[decisive].argmax(-1) == np.asarray(out)[decisive].argmax(-1)))
    tol = GUARD_TOLERANCES[c.precision]
    if embedding and _lowest_cosine(reference, out) < tol["min_cosine"]:
        c.status = "rejected"
        c.reason = (f"accuracy guard: an input's embedding has cosine {_lowest_cosine(reference, out):.5f} to the "
                    f"reference's, below {tol['min_cosine']}")
        return False
    if not c.guard.within(**tol) or c.decisive_top1 < MIN_TOP1[c.precision]:
        c.status = "rejected"
        c.reason = (f"accuracy guard: need max abs <= {tol['max_abs_rel']:g} x scale, cosine >= "
                    f"{tol['min_cosine']}, top-1 >= {MIN_TOP1[c.precision]:.0%} where the reference is decisive")
        return False
    golden = rt.metadata.golden if rt.metadata else None
    if golden is not None:  # the check every first load runs (vitdeploy.verify): a path it refuses is never chosen
        from vitdeploy.verify import verify_runtime

        bad = next((r for r in verify_runtime(rt, golden, c.choice.options, file_precision) if not r.verdict.passed),
                   None)
        if bad is not None:
            c.status, c.reason = "rejected", f"golden set: {bad.verdict.reason()}"
            return False
    return True


def _lowest_cosine(reference: np.ndarray, out: np.ndarray) -> float:
    from vitdeploy.evaluate import row_cosines

    return float(row_cosines(reference, out).min())


def _measure_candidate(rt: Runtime, c: Candidate, ref: _Reference, opts: TuneOptions, best: dict[int, float]) -> None:
    """The accuracy guard, then a quick estimate at each batch size; the full timing unless it is over
    ``opts.prune`` x the best so far (``best``: batch -> ms per image, updated)."""
    warmup, iters, prune, min_seconds = opts.warmup, opts.iters, opts.prune, opts.min_seconds
    if not _guard(rt, c, ref.logits, ref.x_verify, ref.file_precision):
        return
    for x in (ref.x1, ref.xb):
        b = x.shape[0]
        time_runs(rt, x, warmup, 0.4 * min_seconds)
        quick = time_runs(rt, x, 2)
        c.ms_per_image[b] = statistics.median(quick)
        if b in best and min(quick) > prune * best[b]:
            c.pruned.append(b)
            continue
        runs = quick + time_runs(rt, x, max(1, (iters if b == 1 else max(3, iters // 2)) - 2), min_seconds)
        c.ms_per_image[b] = statistics.median(runs)
        best[b] = min(best.get(b, float("inf")), c.ms_per_image[b])
    c.status = "ok"
    if c.pruned:
        c.reason = f"stopped early at batch {', '.join(map(str, c.pruned))}: over {prune:g}x the best"
