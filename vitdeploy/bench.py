"""Measurement like trtexec: warm-up excluded, many iterations (or a duration), percentiles,
throughput, end-to-end vs compute-only where a backend reports both, and every figure in JSON
with the machine and library versions that produced it.

Each row says where it ran (cpu/cuda) and on how many CPU threads, carries its own peak memory
(host RSS sampled during the row, above the RSS before its runtime was opened; the CUDA peak reset
per row), and is flagged when a static-batch artifact had to pad or split to run the batch asked."""

from __future__ import annotations

import csv
import io
import json
import os
import resource
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from vitdeploy.engines.base import Runtime

K = TypeVar("K")


@dataclass
class Stats:
    mean: float
    median: float
    p90: float
    p95: float
    p99: float
    min: float
    max: float
    stddev: float

    @classmethod
    def of(cls, ms: list[float]) -> Stats:
        a = np.asarray(ms, dtype=np.float64)
        p90, p95, p99 = np.percentile(a, [90, 95, 99])
        return cls(float(a.mean()), float(np.median(a)), float(p90), float(p95), float(p99), float(a.min()),
                   float(a.max()), float(a.std(ddof=1)) if len(a) > 1 else 0.0)


@dataclass
class BenchResult:
    name: str
    backend: str
    precision: str
    batch: int
    iterations: int
    latency_ms: Stats  # end-to-end: host array in, host logits out
    throughput: float  # images / s
    compute_ms: Stats | None = None  # device compute only (TensorRT: CUDA events)
    h2d_ms: Stats | None = None
    d2h_ms: Stats | None = None
    peak_host_mb: float = 0.0  # this row's peak RSS above the RSS before its runtime was opened
    peak_gpu_mb: float | None = None  # torch's CUDA peak during this row (reset per row)
    speedup: float | None = None
    status: str = "ok"
    where: str = "?"  # cpu | cuda
    threads: int | None = None  # CPU threads the backend ran with
    batching: str = "native"  # or "padded to N" / "split into K x N": a static-batch artifact

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenchReport:
    results: list[BenchResult]
    machine: dict[str, Any]
    libraries: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "libraries": self.libraries, "settings": self.settings,
                "results": [r.to_dict() for r in self.results]}

    def write_json(self, path: Path) -> None:
        from vitdeploy.io import atomic_write_bytes

        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=2).encode())

    def write_csv(self, path: Path) -> None:
        from vitdeploy.io import atomic_write_bytes

        buf = io.StringIO()
        w = csv.writer(buf)
        stats = ["mean", "median", "p90", "p95", "p99", "min", "max", "stddev"]
        w.writerow(["name", "backend", "precision", "batch", "iterations", *[f"latency_{s}_ms" for s in stats],
                    "throughput_img_s", "compute_median_ms", "peak_host_mb", "peak_gpu_mb", "speedup", "status",
                    "where", "threads", "batching"])
        for r in self.results:
            lat = asdict(r.latency_ms)
            w.writerow([r.name, r.backend, r.precision, r.batch, r.iterations, *[f"{lat[s]:.4f}" for s in stats],
                        f"{r.throughput:.2f}", f"{r.compute_ms.median:.4f}" if r.compute_ms else "",
                        f"{r.peak_host_mb:.0f}", r.peak_gpu_mb or "", f"{r.speedup:.2f}" if r.speedup else "",
                        r.status, r.where, r.threads or "", r.batching])
        atomic_write_bytes(path, buf.getvalue().encode())

    def write_plot(self, path: Path) -> None:
        """Latency and throughput against batch size, one line per artifact/backend."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            from vitdeploy.errors import VitDeployError

            raise VitDeployError("--plot needs matplotlib: pip install 'vitdeploy[plot]'") from None
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        series: dict[str, list[BenchResult]] = {}
        for r in self.results:
            series.setdefault(f"{r.name} [{r.backend}, {r.precision}]", []).append(r)
        for label, rows in series.items():
            rows = sorted(rows, key=lambda r: r.batch)
            b = [r.batch for r in rows]
            ax1.plot(b, [r.latency_ms.median for r in rows], marker="o", label=label)
            ax2.plot(b, [r.throughput for r in rows], marker="o", label=label)
        ax1.set(xlabel="batch", ylabel="median latency (ms)", title="latency vs batch", xscale="log", yscale="log")
        ax2.set(xlabel="batch", ylabel="images / s", title="throughput vs batch", xscale="log")
        ax2.legend(fontsize=7)
        fig.suptitle(f"vitdeploy bench on {self.machine.get('cpu')} {', '.join(self.machine.get('gpus') or [])}",
                     fontsize=9)
        fig.tight_layout()
        from vitdeploy.io import atomic_path

        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)

    # (column, priority): 0 always shown; the highest numbers go first when the terminal is narrow
    COLUMNS = (("artifact", 0), ("backend", 0), ("ran on", 4), ("precision", 2), ("batch", 0), ("mean", 5),
               ("median", 0), ("p99", 1), ("min", 6), ("max", 6), ("gpu compute", 3), ("img/s", 0),
               ("peak MB", 5), ("speed-up", 3), ("status", 0))

    def table(self, width: int | None = None, wide: bool = False) -> Any:
        """The results as a rich Table with the columns that fit ``width`` (all of them with ``wide``)."""
        from vitdeploy.tables import Column, fit_table

        names = ("artifact", "backend", "ran on", "status")
        columns = [Column(n, p, "left" if n in names else "right", name_like=n in names) for n, p in self.COLUMNS]
        rows = []
        for r in self.results:
            s = r.latency_ms
            batch = str(r.batch) if r.batching == "native" else f"{r.batch} ({r.batching})"
            ran_on = r.where + (f", {r.threads} threads" if r.threads and r.where == "cpu" else "")
            rows.append([r.name, r.backend, ran_on, r.precision, batch, f"{s.mean:.2f}", f"{s.median:.2f}",
                         f"{s.p99:.2f}", f"{s.min:.2f}", f"{s.max:.2f}",
                         f"{r.compute_ms.median:.2f}" if r.compute_ms else "-", f"{r.throughput:.1f}",
                         f"{r.peak_host_mb:.0f}" + (f" / {r.peak_gpu_mb:.0f} GPU" if r.peak_gpu_mb else ""),
                         f"{r.speedup:.2f}x" if r.speedup else "-", r.status])
        return fit_table("vitdeploy bench: latency per batch (ms), throughput (images/s)", columns, rows,
                         width, wide)


def rss_mb() -> float:
    """This process's resident set now (Linux /proc; elsewhere the lifetime peak, the best there is)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so the RSS a
    row starts from is not inflated, nor its growth hidden, by what earlier rows freed."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRSS:
    """Samples RSS in a thread while the block runs; ``peak_mb`` is the highest value seen."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="vitdeploy-rss")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def __enter__(self) -> PeakRSS:
        self.peak_mb = rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())


def _torch_cuda(runtime: Runtime) -> Any:
    if runtime.torch_cuda:
        import torch

        return torch.cuda
    return None


def where(runtime: Runtime) -> str:
    return runtime.where


def batching(runtime: Runtime, batch: int) -> str:
    """How the runtime runs ``batch``: natively, or padded/split to the artifact's batch range."""
    lo, hi = runtime.spec.min_batch, runtime.spec.max_batch
    if lo <= batch <= hi:
        return "native"
    if batch < lo:
        return f"padded to {lo}"
    runs, rest = divmod(batch, hi)
    return f"split into {runs + (rest > 0)} x {hi}" + (f", last padded to {lo}" if 0 < rest < lo else "")


def measure(runtime: Runtime, batch: int, warmup: int = 10, iters: int | None = 50,
            duration: float | None = None, name: str = "", progress: Any = None,
            base_rss_mb: float | None = None) -> BenchResult:
    """Time ``runtime.infer`` on one random batch: ``warmup`` runs excluded, then ``iters`` runs or
    as many as fit in ``duration`` seconds. Host-synchronous: every backend returns host logits.
    Peak host memory is this row's, above ``base_rss_mb`` (default: the RSS when the row starts)."""
    base = rss_mb() if base_rss_mb is None else base_rss_mb
    cuda = _torch_cuda(runtime)
    if cuda is not None:
        cuda.synchronize()
        cuda.reset_peak_memory_stats()
    with PeakRSS() as peak:
        result = _measure(runtime, batch, warmup, iters, duration, name, progress)
    result.peak_host_mb = max(0.0, peak.peak_mb - base)
    result.peak_gpu_mb = cuda.max_memory_allocated() / 2**20 if cuda is not None else None
    return result


def random_batch(spec: Any, batch: int, seed: int = 0) -> np.ndarray:
    """Seeded random input in the artifact's form: standard normal, or uint8 pixels for a model that
    normalizes in its graph."""
    rng = np.random.default_rng(seed)
    if spec.dtype == "uint8":
        return rng.integers(0, 256, (batch, *spec.shape), dtype=np.uint8)
    return rng.standard_normal((batch, *spec.shape), dtype=np.float32).astype(spec.dtype)


def _measure(runtime: Runtime, batch: int, warmup: int, iters: int | None, duration: float | None, name: str,
             progress: Any) -> BenchResult:
    x = random_batch(runtime.spec, batch)
    for _ in range(warmup):
        runtime.infer(x)
    lat: list[float] = []
    compute: list[float] = []
    h2d: list[float] = []
    d2h: list[float] = []
    end = time.perf_counter() + duration if duration else None
    while True:
        t0 = time.perf_counter()
        runtime.infer(x)
        lat.append((time.perf_counter() - t0) * 1e3)
        timing = runtime.last_timing
        if timing:
            compute.append(timing["compute_ms"])
            h2d.append(timing["h2d_ms"])
            d2h.append(timing["d2h_ms"])
        if progress is not None:
            progress()
        if end is not None:
            if time.perf_counter() >= end and len(lat) >= 2:
                break
        elif len(lat) >= (iters or 1):
            break
    stats = Stats.of(lat)
    precision = runtime.metadata.precision if runtime.metadata else "?"
    # a tuned runtime: report the path this batch size took
    inner = runtime.runtime_for(batch)
    backend = ("tuned: " if inner is not runtime else "") + inner.describe().split("]")[0] + "]"
    return BenchResult(
        name=name or runtime.describe(), backend=backend, precision=precision,
        batch=batch, iterations=len(lat), latency_ms=stats, throughput=batch * 1e3 / statistics.fmean(lat),
        compute_ms=Stats.of(compute) if compute else None, h2d_ms=Stats.of(h2d) if h2d else None,
        d2h_ms=Stats.of(d2h) if d2h else None, where=where(inner), threads=inner.threads,
        batching=batching(runtime, batch),
    )


def add_speedups(results: list[BenchResult]) -> None:
    """Speed-up of each row against the first row with the same batch size (mean latency)."""
    first: dict[int, BenchResult] = {}
    for r in results:
        base = first.setdefault(r.batch, r)
        r.speedup = base.latency_ms.mean / r.latency_ms.mean


RuntimeSource = Runtime | Callable[[], Runtime]


def run_bench(runtimes: list[tuple[str, RuntimeSource]], batches: list[int], warmup: int = 10,
              iters: int | None = 50, duration: float | None = None, progress: bool = False) -> BenchReport:
    """Each runtime in turn, at every batch size. A runtime given as a factory is opened just before
    its rows and closed after them, so each row's memory is its own runtime's, not every one's so far."""
    from vitdeploy import sysinfo

    results = []
    bar = None
    total = len(runtimes) * len(batches) * (iters or 0)
    if progress and (duration or total > 50):
        from tqdm import tqdm

        bar = tqdm(total=total or None, desc="benchmarking", unit="run", leave=False)
    for name, source in runtimes:
        release_memory()
        base = rss_mb()
        rt = source if isinstance(source, Runtime) else source()
        try:
            for batch in batches:
                results.append(measure(rt, batch, warmup, iters, duration, name, base_rss_mb=base,
                                       progress=(lambda: bar.update(1)) if bar is not None else None))
        finally:
            if not isinstance(source, Runtime):
                rt.close()
                del rt
    if bar is not None:
        bar.close()
    results.sort(key=lambda r: r.batch)  # stable: within a batch, in the order given
    add_speedups(results)
    threads = sorted({r.threads for r in results if r.threads and r.where == "cpu"})
    return BenchReport(results, sysinfo.machine(), sysinfo.library_versions(),
                       {"batches": batches, "warmup": warmup, "iters": iters, "duration": duration,
                        "cpu_threads": threads,
                        "memory": "peak RSS during each row above the RSS before its runtime was opened"})


def time_runs(runtime: Runtime, x: np.ndarray, runs: int, min_seconds: float = 0.0) -> list[float]:
    """ms per image of ``runs`` calls, more until ``min_seconds`` have passed (small models are quick
    enough that a fixed count would time a few milliseconds of a noisy machine)."""
    out: list[float] = []
    start = time.perf_counter()
    while len(out) < runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        runtime.infer(x)
        out.append((time.perf_counter() - t0) * 1e3 / x.shape[0])
    return out


def side_by_side(runtimes: Mapping[K, Runtime], x: np.ndarray, rounds: int, per_round: int,
                 min_seconds: float = 0.0, pause_s: float = 0.5,
                 on_error: Callable[[K, Exception], None] | None = None) -> dict[K, list[float]]:
    """Time open runtimes on one batch in alternating rounds, so that a machine's drift (clocks,
    other load) falls on all of them alike: ms per image of every timed call, per runtime.

    Before each turn: a pause, because torch's OpenMP and ONNX Runtime's pools spin for a while after
    a run and would slow the next runtime, then one untimed call for this runtime's caches. A runtime
    that raises leaves the later rounds and goes to ``on_error`` (raised when there is none)."""
    runs: dict[K, list[float]] = {k: [] for k in runtimes}
    out: set[K] = set()
    for _ in range(rounds):
        for k, rt in runtimes.items():
            if k in out:
                continue
            try:
                time.sleep(pause_s)
                rt.infer(x)
                runs[k] += time_runs(rt, x, per_round, min_seconds / rounds)
            except Exception as e:
                if on_error is None:
                    raise
                out.add(k)
                on_error(k, e)
    return runs


class HFRuntime(Runtime):
    """transformers' ViTForImageClassification (a saved folder), FP32 on the CPU, with the given
    attention: the reference users run today, for side-by-side figures."""

    backend = "hf-transformers"

    def __init__(self, folder: str | Path, attn: str = "sdpa", threads: int | None = None) -> None:
        import torch
        import transformers

        from vitdeploy.engines.base import InputSpec

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.attn = attn
        self.model = transformers.ViTForImageClassification.from_pretrained(
            folder, attn_implementation=attn).eval().to("cpu")
        cfg = self.model.config
        self.spec = InputSpec("pixel_values", "float32", (cfg.num_channels, cfg.image_size, cfg.image_size), 1, 256)
        self.metadata = None

    def describe(self) -> str:
        return f"hf-transformers[cpu, {self.attn}, {self.threads} threads] (fp32)"

    def _run(self, batch: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(self.torch.from_numpy(batch)).logits.numpy()

    def close(self) -> None:
        self.model = None
