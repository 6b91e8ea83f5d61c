"""The shared measurement pieces: HF transformers as a Runtime, and the side-by-side timer."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import TINY_224, hf_reference, save_hf_folder
from vitdeploy.bench import HFRuntime, side_by_side
from vitdeploy.engines.base import InputSpec, Runtime


class Recorder(Runtime):
    """A runtime that logs its calls and can fail on its n-th call."""

    def __init__(self, name: str, log: list[str], fail_at: int | None = None) -> None:
        self.name, self.log, self.fail_at, self.calls = name, log, fail_at, 0
        self.spec = InputSpec("x", "float32", (3, 224, 224), 1, 8)
        self.metadata = None

    def _run(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError(f"{self.name} broke")
        self.log.append(self.name)
        return np.zeros((batch.shape[0], 2), np.float32)


def test_side_by_side_alternates_and_drops_a_failing_runtime():
    log: list[str] = []
    rts = {"a": Recorder("a", log), "b": Recorder("b", log, fail_at=4)}
    errors: dict[str, str] = {}
    x = np.zeros((2, 3, 224, 224), np.float32)
    runs = side_by_side(rts, x, rounds=3, per_round=2, pause_s=0,
                        on_error=lambda k, e: errors.setdefault(k, str(e)))
    # each turn: one untimed call, then the timed ones; "a" and "b" take turns until "b" fails
    assert log[:6] == ["a"] * 3 + ["b"] * 3
    assert log[6:] == ["a"] * 6
    assert len(runs["a"]) == 6 and len(runs["b"]) == 2
    assert errors == {"b": "b broke"}
    with pytest.raises(RuntimeError, match="b broke"):
        side_by_side({"b": Recorder("b", [], fail_at=1)}, x, rounds=1, per_round=1, pause_s=0)


def test_hf_runtime_is_transformers(tmp_path):
    import torch

    model = hf_reference(TINY_224)
    folder = save_hf_folder(model, tmp_path / "hf")
    x = np.random.default_rng(0).standard_normal((3, 3, 224, 224), dtype=np.float32)
    with torch.inference_mode():
        want = model(torch.from_numpy(x)).logits.numpy()
    with HFRuntime(folder, "eager", threads=1) as rt:
        assert rt.where == "cpu" and rt.threads == 1 and rt.runtime_for(3) is rt
        np.testing.assert_allclose(rt.infer(x), want, atol=1e-5)


def _report(name: str):
    from vitdeploy.bench import BenchReport, BenchResult, Stats

    stats = Stats.of([1.0, 2.0, 3.0])
    rows = [BenchResult(name=name, backend="onnxruntime[CPUExecutionProvider, 2 threads]", precision="fp16",
                        batch=b, iterations=3, latency_ms=stats, throughput=100.0, where="cpu", threads=2,
                        batching="native") for b in (1, 8)]
    return BenchReport(rows, machine={}, libraries={})


def _render(table, width: int) -> str:
    from rich.console import Console

    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(table)
    return console.export_text()


def test_bench_table_fits_the_terminal_and_shows_names_whole():
    name = "vit-b16-fp16-a-rather-long-artifact-name.onnx"
    report = _report(name)
    text = _render(report.table(width=80), 80)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text  # nothing cut
    # the artifact column, read down: the name folds onto several lines but every character is there
    first = "".join(line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│"))
    assert first.count(name) == 2
    assert "not shown for the terminal's width" in text and "--wide" in text
    wide = _render(report.table(width=80, wide=True), 400)
    for col in ("p99", "min", "max", "peak MB", "speed-up", "gpu compute"):
        assert col in wide
    roomy = _render(report.table(width=400), 400)
    assert "not shown" not in roomy
