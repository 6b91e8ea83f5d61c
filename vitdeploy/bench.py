"""Measurement like trtexec: warm-up excluded, many iterations (or a duration), percentiles,
throughput, end-to-end vs compute-only where a backend reports both, and every figure in JSON
with the machine and library versions that produced it."""

from __future__ import annotations

import csv
import io
import json
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.engines.base import Runtime


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
    peak_host_mb: float = 0.0
    peak_gpu_mb: float | None = None
    speedup: float | None = None
    status: str = "ok"

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
                    "throughput_img_s", "compute_median_ms", "peak_host_mb", "peak_gpu_mb", "speedup", "status"])
        for r in self.results:
            lat = asdict(r.latency_ms)
            w.writerow([r.name, r.backend, r.precision, r.batch, r.iterations, *[f"{lat[s]:.4f}" for s in stats],
                        f"{r.throughput:.2f}", f"{r.compute_ms.median:.4f}" if r.compute_ms else "",
                        f"{r.peak_host_mb:.0f}", r.peak_gpu_mb or "", f"{r.speedup:.2f}" if r.speedup else "",
                        r.status])
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

    def table(self) -> Any:
        from rich.table import Table

        t = Table(title="vitdeploy bench: latency per batch (ms), throughput (images/s)")
        for col in ("artifact", "backend", "precision", "batch", "mean", "median", "p90", "p99", "min", "max",
                    "gpu compute", "img/s", "speed-up", "status"):
            t.add_column(col, justify="right" if col not in ("artifact", "backend", "status") else "left")
        for r in self.results:
            s = r.latency_ms
            t.add_row(r.name, r.backend, r.precision, str(r.batch), f"{s.mean:.2f}", f"{s.median:.2f}",
                      f"{s.p90:.2f}", f"{s.p99:.2f}", f"{s.min:.2f}", f"{s.max:.2f}",
                      f"{r.compute_ms.median:.2f}" if r.compute_ms else "-", f"{r.throughput:.1f}",
                      f"{r.speedup:.2f}x" if r.speedup else "-", r.status)
        return t


def _peak_host_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _gpu_peak_mb(runtime: Runtime) -> float | None:
    if getattr(runtime, "device", None) is not None and getattr(runtime.device, "type", "") == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return None


def measure(runtime: Runtime, batch: int, warmup: int = 10, iters: int | None = 50,
            duration: float | None = None, name: str = "", progress: Any = None) -> BenchResult:
    """Time ``runtime.infer`` on one random batch: ``warmup`` runs excluded, then ``iters`` runs or
    as many as fit in ``duration`` seconds. Host-synchronous: every backend returns host logits."""
    spec = runtime.spec
    x = np.random.default_rng(0).standard_normal((batch, *spec.shape), dtype=np.float32).astype(spec.dtype)
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
        timing = getattr(runtime, "last_timing", None)
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
    return BenchResult(
        name=name or runtime.describe(), backend=runtime.describe().split("]")[0] + "]", precision=precision,
        batch=batch, iterations=len(lat), latency_ms=stats, throughput=batch * 1e3 / statistics.fmean(lat),
        compute_ms=Stats.of(compute) if compute else None, h2d_ms=Stats.of(h2d) if h2d else None,
        d2h_ms=Stats.of(d2h) if d2h else None, peak_host_mb=_peak_host_mb(), peak_gpu_mb=_gpu_peak_mb(runtime),
    )


def add_speedups(results: list[BenchResult]) -> None:
    """Speed-up of each row against the first row with the same batch size (mean latency)."""
    first: dict[int, BenchResult] = {}
    for r in results:
        base = first.setdefault(r.batch, r)
        r.speedup = base.latency_ms.mean / r.latency_ms.mean


def run_bench(runtimes: list[tuple[str, Runtime]], batches: list[int], warmup: int = 10,
              iters: int | None = 50, duration: float | None = None, progress: bool = False) -> BenchReport:
    from vitdeploy import sysinfo

    results = []
    bar = None
    total = len(runtimes) * len(batches) * (iters or 0)
    if progress and (duration or total > 50):
        from tqdm import tqdm

        bar = tqdm(total=total or None, desc="benchmarking", unit="run", leave=False)
    for batch in batches:
        for name, rt in runtimes:
            results.append(measure(rt, batch, warmup, iters, duration, name,
                                   progress=(lambda: bar.update(1)) if bar is not None else None))
    if bar is not None:
        bar.close()
    results.sort(key=lambda r: r.batch)
    add_speedups(results)
    return BenchReport(results, sysinfo.machine(), sysinfo.library_versions(),
                       {"batches": batches, "warmup": warmup, "iters": iters, "duration": duration})
