"""vitdeploy tune: the plan it writes, how open_runtime uses it, the accuracy guard; honest bench rows."""

import dataclasses
import importlib.util
import json
import logging
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from vitdeploy.cli import main
from vitdeploy.engines import open_runtime
from vitdeploy.engines.base import InputSpec, Runtime
from vitdeploy.engines.plan import MachineKey, PathChoice, PlannedRuntime, TunePlan, plan_path
from vitdeploy.errors import VitDeployError
from vitdeploy.tune import tune

FAST = dict(warmup=1, iters=3, min_seconds=0.0)


def _x(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 224, 224), dtype=np.float32)


@pytest.fixture()
def copies(digits_onnx, tmp_path):
    """The digits ONNX files in a folder of their own: a plan written beside them touches no other test."""
    return {k: shutil.copy(digits_onnx[k], tmp_path / f"m-{k}.onnx") for k in ("fp32", "int8", "fp32-b4")}


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_plan_written_keyed_and_used(copies, precision):
    path = copies[precision]
    report = tune(path, batch=4, **FAST)
    plan = TunePlan.read(plan_path(path))
    assert plan_path(path).name == f"m-{precision}.tune.json"
    assert plan.machine == MachineKey.current() and plan.mismatch(path) is None
    assert plan.throughput_batch == 4 and plan.to_dict() == report.plan.to_dict()
    labels = [c.choice.label for c in report.candidates]
    if precision == "int8":  # both Q/DQ forms are measured
        assert any("as written" in lab for lab in labels) and any("as uint8" in lab for lab in labels)
    if importlib.util.find_spec("openvino"):
        assert any(lab.startswith("openvino") for lab in labels)
    ok = [c for c in report.candidates if c.status == "ok"]
    finalists = [c for c in ok if 1 in c.runoff] or [c for c in ok if 1 not in c.pruned]
    fastest_b1 = min(finalists, key=lambda c: c.ms_per_image[1])
    assert plan.latency == fastest_b1.choice
    assert all(c.guard.cosine >= 0.98 for c in ok)

    rt = open_runtime(path)
    assert isinstance(rt, PlannedRuntime) and rt.describe().startswith("tuned: ")
    # the plan's latency path, opened by hand, gives the same logits as the tuned runtime
    with open_runtime(path, backend=plan.latency.backend, **plan.latency.options) as direct:
        np.testing.assert_allclose(rt.infer(_x(2)), direct.infer(_x(2)), rtol=1e-5, atol=1e-5)
    assert rt.runtime_for(1) is rt.runtime_for(3)
    big = rt.runtime_for(4)
    assert (big is rt.runtime_for(1)) == (plan.throughput == plan.latency)
    ref = open_runtime(path, backend="onnxruntime", qdq_activations="int8", optimization="disable").infer(_x(5))
    out = rt.infer(_x(5))
    assert out.shape == (5, 10) and np.mean(out.argmax(-1) == ref.argmax(-1)) >= 0.8
    rt.close()


def _rewrite(path, **changes):
    plan = TunePlan.read(plan_path(path))
    if "machine" in changes:
        changes["machine"] = dataclasses.replace(plan.machine, **changes["machine"])
    dataclasses.replace(plan, **changes).write(plan_path(path))


@pytest.mark.parametrize(("change", "why"), [
    ({"machine": {"cpu": "Intel Xeon (family 6 model 207)"}}, r"tuned on another machine \(CPU Intel Xeon"),
    ({"machine": {"flags": ("avx2",)}}, r"tuned on another machine \(ISA flags avx2 -> "),
    ({"machine": {"cpus": 64}}, r"tuned on another machine \(64 usable CPUs -> "),
    ({"machine": {"libraries": (("onnxruntime", "1.0.0"), ("openvino", None))}}, r"onnxruntime 1\.0\.0 -> "),
    ({"artifact_sha256": "0" * 64}, r"tuned for another version of m-fp32\.onnx"),
])
def test_plan_from_elsewhere_is_ignored_with_one_notice(copies, caplog, change, why):
    path = copies["fp32"]
    tune(path, batch=2, **FAST)
    _rewrite(path, **change)
    with caplog.at_level(logging.WARNING, logger="vitdeploy"):
        rt = open_runtime(path)
    assert rt.backend == "onnxruntime" and not rt.describe().startswith("tuned")
    notices = [r.getMessage() for r in caplog.records if r.name.startswith("vitdeploy")]
    assert len(notices) == 1 and len(notices[0].splitlines()) == 1
    assert notices[0].startswith("ignoring tune plan m-fp32.tune.json: ")
    import re

    assert re.search(why, notices[0]) and "rerun `vitdeploy tune" in notices[0]


def test_corrupt_plan_is_ignored_with_a_notice(copies, caplog):
    plan_path(copies["fp32"]).write_text("{half a plan")
    with caplog.at_level(logging.WARNING, logger="vitdeploy"):
        rt = open_runtime(copies["fp32"])
    assert rt.backend == "onnxruntime"
    assert any("m-fp32.tune.json is unreadable" in r.getMessage() for r in caplog.records)


class _Corrupt(Runtime):
    """A path that answers instantly with wrong logits: the fastest candidate, and a wrong one."""

    backend = "corrupt"

    def __init__(self, real: Runtime, mode: str) -> None:
        self.real, self.mode = real, mode
        self.spec, self.metadata = real.spec, real.metadata

    def describe(self) -> str:
        return f"corrupt[{self.mode}]"

    def _run(self, batch):
        if self.mode == "constant":
            return np.zeros((batch.shape[0], 10), np.float32) + np.arange(10, dtype=np.float32)
        return self.real.infer(batch)[:, ::-1]  # labels swapped

    def close(self):
        self.real.close()


@pytest.mark.parametrize("mode", ["constant", "swapped"])
def test_a_path_failing_the_guard_is_never_chosen(copies, mode):
    path = copies["int8"]
    good = PathChoice("onnxruntime", {"threads": 1, "qdq_activations": "uint8"}, "good")
    bad = PathChoice("onnxruntime", {"threads": 2, "qdq_activations": "int8"}, "injected fault")

    def opener(choice):
        rt = open_runtime(path, backend=choice.backend, use_plan=False, **choice.options)
        return _Corrupt(rt, mode) if choice == bad else rt

    report = tune(path, batch=2, candidates=[bad, good], opener=opener, **FAST)
    status = {c.choice.label: c for c in report.candidates}
    assert status["injected fault"].status == "rejected" and "accuracy guard" in status["injected fault"].reason
    assert not status["injected fault"].ms_per_image  # never timed, so never in the running
    assert report.plan.latency == good and report.plan.throughput == good
    # every path corrupt: no plan at all
    plan_path(path).unlink()
    with pytest.raises(VitDeployError, match=r"no CPU path passed the accuracy guard for m-int8\.onnx"):
        tune(path, batch=2, candidates=[bad], opener=opener, **FAST)
    assert not plan_path(path).exists()


class _Paced(Runtime):
    """The real digits logits, taking ``ms`` x the machine's pace per call."""

    backend = "paced"

    def __init__(self, real: Runtime, ms: float, pace: float) -> None:
        self.real, self.ms, self.pace = real, ms, pace
        self.spec, self.metadata = real.spec, real.metadata

    def _run(self, batch):
        import time

        time.sleep(self.ms * self.pace / 1e3)
        return self.real.infer(batch)

    def close(self):
        self.real.close()


def test_close_finalists_are_timed_again_side_by_side(copies, monkeypatch):
    """A machine that slows down after the first candidate was timed: without the runoff the slower
    path, timed while the machine was quick, would win. Side by side, the truly faster one does."""
    monkeypatch.setattr("vitdeploy.tune.RUNOFF_PAUSE_S", 0.01)
    path = copies["fp32"]
    lucky = PathChoice("onnxruntime", {"threads": 1}, "lucky (12.5 ms, timed first while the machine was quick)")
    steady = PathChoice("onnxruntime", {"threads": 2}, "steady (10 ms)")
    far = PathChoice("onnxruntime", {"threads": 1, "optimization": "disable"}, "far (50 ms)")
    opened = []

    def opener(choice):
        opened.append(choice)
        pace = 0.8 if len(opened) == 1 else 1.0  # 10 ms for lucky's first figures (a tie), then the real pace
        # gaps of milliseconds, not fractions of one, so that a busy machine's noise cannot swap them
        ms = {lucky.key(): 12.5, steady.key(): 10.0, far.key(): 50.0}[choice.key()]
        # the same real work behind every choice (the options only name them): only the pace differs
        return _Paced(open_runtime(path, backend="onnxruntime", use_plan=False, threads=1), ms, pace)

    report = tune(path, batch=2, candidates=[lucky, steady, far], opener=opener, warmup=1, iters=6,
                  min_seconds=0.0)
    c = {cand.choice.label: cand for cand in report.candidates}
    assert report.plan.latency == steady and report.plan.throughput == steady
    assert c[lucky.label].runoff == [1, 2] and c[steady.label].runoff == [1, 2] and not c[far.label].runoff
    assert c[lucky.label].ms_per_image[1] > c[steady.label].ms_per_image[1] >= 10.0
    assert opened.count(far) == 1 and opened.count(steady) == 3  # far is no finalist; the others reopen per batch
    assert report.to_dict()["candidates"][0]["runoff_at"] == [1, 2]


def test_a_finalist_whose_answers_change_when_reopened_is_out(copies, monkeypatch):
    """Each runoff finalist passes the guard again: a path right the first time and wrong the second
    (as one OpenVINO streams path once was) is rejected, not chosen."""
    monkeypatch.setattr("vitdeploy.tune.RUNOFF_PAUSE_S", 0.01)
    path = copies["fp32"]
    fickle = PathChoice("onnxruntime", {"threads": 1}, "fickle (4 ms, wrong when reopened)")
    steady = PathChoice("onnxruntime", {"threads": 2}, "steady (4 ms)")
    opened = []

    def opener(choice):
        opened.append(choice)
        real = open_runtime(path, backend="onnxruntime", use_plan=False, threads=1)
        if choice == fickle and opened.count(fickle) > 1:
            return _Corrupt(real, "swapped")
        return _Paced(real, 4.0, 1.0)

    report = tune(path, batch=2, candidates=[fickle, steady], opener=opener, warmup=1, iters=6, min_seconds=0.0)
    c = {cand.choice.label: cand for cand in report.candidates}
    assert c[fickle.label].status == "rejected" and "when opened again for the runoff" in c[fickle.label].reason
    assert report.plan.latency == steady and report.plan.throughput == steady
    assert opened.count(fickle) == 2  # out after the batch-1 runoff: not reopened for batch 2


def test_explicit_backend_overrides_the_plan(copies, tmp_path):
    path = copies["int8"]
    tune(path, batch=2, **FAST)
    assert isinstance(open_runtime(path), PlannedRuntime)
    assert open_runtime(path, backend="onnxruntime").backend == "onnxruntime"
    assert open_runtime(path, qdq_activations="int8").backend == "onnxruntime"  # a backend option: no plan
    assert isinstance(open_runtime(path, threads=1), PlannedRuntime)
    assert open_runtime(path, threads=1).threads == 1
    r = CliRunner().invoke(main, ["bench", str(path), "--batch", "1", "--warmup", "0", "--iters", "2",
                                  "--json", str(tmp_path / "auto.json")])
    assert r.exit_code == 0, r.output
    (row,) = json.loads((tmp_path / "auto.json").read_text())["results"]
    assert row["backend"].startswith("tuned: ")
    r = CliRunner().invoke(main, ["bench", str(path), "--backend", "onnxruntime", "--batch", "1", "--warmup", "0",
                                  "--iters", "2", "--json", str(tmp_path / "ort.json")])
    (row,) = json.loads((tmp_path / "ort.json").read_text())["results"]
    assert r.exit_code == 0 and row["backend"].startswith("onnxruntime[CPU")


def test_commands_say_which_path_they_run(copies, digits):
    path = copies["int8"]
    tune(path, batch=2, **FAST)
    image = str(sorted((digits["test"] / "3").iterdir())[0])
    r = CliRunner().invoke(main, ["predict", image, "--model", str(path), "--json"])
    assert r.exit_code == 0, r.output
    assert "running tuned: " in r.stderr and json.loads(r.stdout)[0]["image"] == image
    r = CliRunner().invoke(main, ["predict", image, "--model", str(path), "--backend", "openvino"])
    if importlib.util.find_spec("openvino"):
        assert r.exit_code == 0 and "running openvino[CPU" in r.stderr
    r = CliRunner().invoke(main, ["eval", "--model", str(path), "--data", str(digits["test"]), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["runtime"].startswith("tuned: ") and out["accuracy"] > 0.8


def test_tune_cli(copies, digits, tmp_path):
    r = CliRunner().invoke(main, ["tune", str(copies["fp32-b4"]), "--batch", "4", "--iters", "3", "--threads", "1,2",
                                  "--json", str(tmp_path / "t.json")])
    assert r.exit_code == 0, r.output
    assert "CHOSEN for latency" in r.stdout and f"wrote {plan_path(copies['fp32-b4'])}" in r.stdout
    data = json.loads((tmp_path / "t.json").read_text())
    assert {c["path"]["options"]["threads"] for c in data["candidates"]} == {1, 2}
    assert TunePlan.read(plan_path(copies["fp32-b4"])).mismatch(copies["fp32-b4"]) is None
    r = CliRunner().invoke(main, ["tune", str(digits["checkpoint"])])
    assert r.exit_code == 1 and "tune measures CPU paths for ONNX files" in r.output
    r = CliRunner().invoke(main, ["tune", str(copies["fp32"]), "--batch", "1"])
    assert r.exit_code == 2 and "1 is not in the range x>=2" in r.output


def test_plan_file_schema(copies, tmp_path):
    path = copies["fp32"]
    tune(path, batch=2, **FAST)
    data = json.loads(plan_path(path).read_text())
    assert data["format"] == "vitdeploy-tune/1" and data["machine"]["cpu"] and data["machine"]["libraries"]
    data["latency"]["backend"] = "tensorrt"
    bad = tmp_path / "bad.tune.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(VitDeployError, match=r"tune plan .*bad\.tune\.json is unreadable .*rerun `vitdeploy tune`"):
        TunePlan.read(bad)


# -- honest bench rows --------------------------------------------------------------------------------
class _Allocating(Runtime):
    """Holds ``hold_mb`` of weights and allocates ``work_mb`` per inference: a known memory footprint."""

    backend = "alloc"

    def __init__(self, hold_mb: int, work_mb: int) -> None:
        self.weights = np.ones(hold_mb * 2**18, np.float32)
        self.work_mb = work_mb
        self.spec = InputSpec("x", "float32", (3, 224, 224), 1, 64)
        self.metadata = None
        self.threads, self.where = 1, "cpu"

    def _run(self, batch):
        tmp = np.ones(self.work_mb * 2**18, np.float32)
        return np.full((batch.shape[0], 10), tmp[-1], np.float32)

    def close(self):
        self.weights = None


def test_each_row_reports_its_own_peak_memory():
    from vitdeploy.bench import run_bench

    report = run_bench([("big", lambda: _Allocating(300, 100)), ("small", lambda: _Allocating(10, 5))], [1],
                       warmup=1, iters=3)
    big, small = report.results
    assert 350 <= big.peak_host_mb <= 520, big.peak_host_mb
    assert small.peak_host_mb < 60, small.peak_host_mb  # not the big runtime's peak carried over
    assert report.settings["memory"].startswith("peak RSS during each row")


def test_bench_rows_flag_padding_threads_and_place(digits, copies, tmp_path):
    r = CliRunner().invoke(main, ["bench", str(copies["fp32-b4"]), str(digits["checkpoint"]), "--batch", "1,4,9",
                                  "--warmup", "0", "--iters", "2", "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "b.json").read_text())
    rows = {(row["name"].split(".")[0], row["batch"]): row for row in data["results"]}
    assert rows[("m-fp32-b4", 1)]["batching"] == "padded to 4"
    assert rows[("m-fp32-b4", 4)]["batching"] == "native"
    assert rows[("m-fp32-b4", 9)]["batching"] == "split into 3 x 4, last padded to 4"
    assert all(rows[("digits_vit", b)]["batching"] == "native" for b in (1, 4, 9))
    assert {row["where"] for row in data["results"]} == {"cpu"}
    assert len({row["threads"] for row in data["results"]}) == 1 and data["settings"]["cpu_threads"]
    assert "note: 2 row(s) ran a static-batch artifact at another batch size" in r.stdout


def test_top1_guard_counts_only_inputs_where_the_reference_is_decisive():
    from vitdeploy.tune import decisive_inputs

    ref = np.array([[5.0, 1.0, 0.0], [2.0, 1.99, 0.0], [0.0, 3.0, 0.5]])
    assert decisive_inputs(ref, scale=5.0).tolist() == [True, False, True]
    # a flip on the near-tie row is left to the error bounds; a flip on a decisive row is a disagreement
    near_tie_flip = ref.copy()
    near_tie_flip[1] = [1.99, 2.0, 0.0]
    mask = decisive_inputs(ref, 5.0)
    assert np.mean(ref[mask].argmax(-1) == near_tie_flip[mask].argmax(-1)) == 1.0
    decisive_flip = ref.copy()
    decisive_flip[0] = [1.0, 5.0, 0.0]
    assert np.mean(ref[mask].argmax(-1) == decisive_flip[mask].argmax(-1)) == 0.5


@pytest.fixture(scope="module")
def int8_attention(digits, tmp_path_factory):
    """The digits model in INT8 with INT8 attention (``export --attention int8``), in a folder of its own."""
    from vitdeploy.exporters import ExportOptions, export_onnx

    out = tmp_path_factory.mktemp("tune_attention") / "m-int8-attention.onnx"
    return export_onnx(digits["checkpoint"], out, options=ExportOptions(
        dynamic_batch=True, precision="int8", attention="int8", calib_dir=digits["train"], calib_samples=64)).path


def test_int8_attention_is_timed_both_ways_behind_the_guard(int8_attention):
    """OpenVINO runs the file's INT8 attention in int8 (its runtime model says so) and, as a second candidate,
    with attention's Q/DQ dropped; each passes the accuracy guard before it is timed; the fastest is chosen."""
    pytest.importorskip("openvino", reason="OpenVINO not installed: pip install 'vitdeploy[openvino]'")
    report = tune(int8_attention, batch=2, threads=[2], **FAST)
    by_label = {c.choice.label: c for c in report.candidates}
    dropped = [c for c in report.candidates if c.choice.options.get("attention") == "float"]
    assert len(dropped) == 2 and all(c.choice.backend == "openvino" for c in dropped)  # latency, throughput
    for c in dropped:
        written = by_label[c.choice.label.removesuffix(", attention Q/DQ dropped")]
        assert "attention in i8]" in written.description or "attention in i8," in written.description
        assert "(its Q/DQ dropped)" in c.description and "attention in i8]" not in c.description
        assert c.guard is not None and written.guard is not None  # both were guarded
    ok = [c for c in report.candidates if c.status == "ok"]
    assert all(c.guard.within(max_abs_rel=0.5, min_cosine=0.98) for c in ok)
    finalists = [c for c in ok if 1 in c.runoff] or [c for c in ok if 1 not in c.pruned]
    assert report.plan.latency == min(finalists, key=lambda c: c.ms_per_image[1]).choice


def test_openvino_attention_float_changes_only_attention(int8_attention, digits):
    """Both ways agree with the file run literally by ONNX Runtime on held-out digits, within INT8's tolerance."""
    pytest.importorskip("openvino", reason="OpenVINO not installed: pip install 'vitdeploy[openvino]'")
    from vitdeploy.metrics import TOLERANCES, compare_logits
    from vitdeploy.preprocess import find_images, open_image
    with open_runtime(int8_attention, backend="openvino", use_plan=False) as written, \
            open_runtime(int8_attention, backend="openvino", use_plan=False, attention="float") as dropped, \
            open_runtime(int8_attention, backend="onnxruntime", use_plan=False, optimization="disable") as ref:
        assert written.attention_precisions() == ["i8,i8,i8"] * 2  # Q, K and V enter attention as int8
        assert dropped.attention_qdq_dropped == 2 * 4
        assert not any(p == "i8,i8,i8" for p in dropped.attention_precisions())
        x = ref.preprocess([open_image(f) for f in find_images(digits["test"])[:32]])
        expected = ref.infer(x)
        for rt in (written, dropped):
            comparison = compare_logits(expected, rt.infer(x))
            assert comparison.within(**TOLERANCES["int8"]) and comparison.top1_agreement >= 0.95, comparison.summary()
    with pytest.raises(VitDeployError, match="OpenVINO attention 'int4': choose as_written or float"):
        open_runtime(int8_attention, backend="openvino", use_plan=False, attention="int4")


def test_tune_names_a_missing_backend_from_the_isa():
    from vitdeploy.tune import missing_backend_advice

    (line,) = missing_backend_advice(["avx2", "avx512f", "avx512_vnni", "avx512_bf16"], qdq=True, installed=False)
    assert "OpenVINO is not installed: on this CPU (avx512_vnni, avx512_bf16)" in line
    assert "INT8 (attention included)" in line and "pip install 'vitdeploy[openvino]'" in line
    assert "amx_int8" in missing_backend_advice(["amx_int8", "amx_bf16"], qdq=False, installed=False)[0]
    assert missing_backend_advice(["avx2", "avx512f"], qdq=True, installed=False) == []  # no VNNI, no bf16
    assert missing_backend_advice(["amx_int8"], qdq=True, installed=True) == []


def test_the_guard_holds_a_golden_set_to_the_graphs_precision_not_its_claim(copies, tmp_path):
    """An FP32 file whose metadata and golden set claim fp8 (fp8's tolerance), its stored logits scaled by 1.05
    (off by up to 0.05 x scale, the top-1 kept): every path fails the golden set at fp32's tolerance, so no plan
    is written. Old code: the guard took the claim, and the path was chosen (issue 29, item 4)."""
    import onnx

    from vitdeploy.artifacts.golden import tolerance_for

    from .test_verify import _edit_logits, _with_golden

    def claim_fp8(data):
        data["precision"], data["tolerance"] = "fp8", tolerance_for("fp8")
        _edit_logits(data, lambda v: v * 1.05)

    path = _with_golden(copies["fp32"], tmp_path / "claim.onnx", claim_fp8)
    model = onnx.load(str(path))
    next(p for p in model.metadata_props if p.key == "vitdeploy.precision").value = "fp8"
    onnx.save(model, str(path))
    only = PathChoice("onnxruntime", {"threads": 1}, "ort")
    with pytest.raises(VitDeployError, match=r"no CPU path passed the accuracy guard.*golden set"):
        tune(path, batch=2, candidates=[only], **FAST)
    assert not plan_path(path).exists()
