"""Real TensorRT-RTX engine builds on the CPU (ahead of time for named GPU targets)."""

import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from vitdeploy import sysinfo
from vitdeploy.cli import main
from vitdeploy.engines.tensorrt.build import BuildCancelled, BuildError, BuildOptions, build_engine, choose_flavour
from vitdeploy.engines.tensorrt.sidecar import EngineSidecar, sidecar_path
from vitdeploy.errors import VitDeployError
from vitdeploy.io import sha256_file

trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX not installed: pip install 'vitdeploy[tensorrt-rtx]'")
pytestmark = pytest.mark.tensorrt

SM89 = BuildOptions(flavour="rtx", compute_capabilities=["sm89"], min_batch=1, opt_batch=4, max_batch=8)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_every_precision_builds_for_sm89(digits_onnx, tmp_path, precision):
    report = build_engine(digits_onnx[precision], tmp_path / "m.engine", SM89)
    assert report.engine.stat().st_size > 100_000 and report.precision == precision
    assert report.targets == ["sm89"] and report.profile["max"] == [8, 3, 224, 224]
    assert len(report.phases) >= 3  # the progress monitor saw TensorRT's phases
    side = json.loads(sidecar_path(tmp_path / "m.engine").read_text())
    assert side["flavour"] == "tensorrt_rtx" and side["trt_version"] == trt.__version__
    assert side["onnx"]["sha256"] == sha256_file(digits_onnx[precision])
    assert side["io"][0] == {"name": "pixel_values", "mode": "input", "shape": [-1, 3, 224, 224], "dtype": "float"}
    assert side["io"][1]["name"] == "logits" and side["io"][1]["shape"] == [-1, 10]
    assert side["model"]["labels"] == [str(i) for i in range(10)] and side["model"]["precision"] == precision
    assert side["options"]["opt_level"] == 3 and side["vitdeploy_version"]
    engine_bytes = (tmp_path / "m.engine").read_bytes()  # the sidecar names the engine it belongs to
    assert side["engine"] == {"bytes": len(engine_bytes), "sha256": hashlib.sha256(engine_bytes).hexdigest()}
    mask = os.umask(0)
    os.umask(mask)
    for f in (tmp_path / "m.engine", tmp_path / "m.json"):  # not mkstemp's 0600
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask


def test_static_batch_engine_and_refused_profile(digits_onnx, tmp_path):
    report = build_engine(digits_onnx["fp32-b4"], tmp_path / "s.engine",
                          BuildOptions(flavour="rtx", compute_capabilities=["sm86", "sm120"]))
    assert report.profile == {"min": [4, 3, 224, 224], "opt": [4, 3, 224, 224], "max": [4, 3, 224, 224]}
    assert report.targets == ["sm86", "sm120"]
    with pytest.raises(BuildError, match="static batch of 4; a profile of \\[8\\] cannot be satisfied"):
        build_engine(digits_onnx["fp32-b4"], tmp_path / "x.engine",
                     BuildOptions(flavour="rtx", compute_capabilities=["sm89"], max_batch=8))
    assert not (tmp_path / "x.engine").exists()


@pytest.fixture(scope="module")
def fp8_onnx(digits, tmp_path_factory):
    from vitdeploy.exporters import ExportOptions, export_onnx

    path = tmp_path_factory.mktemp("fp8") / "fp8.onnx"
    return export_onnx(digits["checkpoint"], path, options=ExportOptions(
        precision="fp8", calib_dir=digits["train"], calib_samples=32, verify=False)).path


def test_fp8_needs_ada_or_newer(fp8_onnx, tmp_path):
    ok = build_engine(fp8_onnx, tmp_path / "ada.engine", BuildOptions(flavour="rtx", compute_capabilities=["sm89"]))
    assert ok.precision == "fp8"
    with pytest.raises(BuildError) as e:
        build_engine(fp8_onnx, tmp_path / "ampere.engine", BuildOptions(flavour="rtx", compute_capabilities=["sm80"]))
    msg = str(e.value)
    assert "\n" not in msg and "Cannot compile for target(s) sm80" in msg and "fp8" in msg
    assert not (tmp_path / "ampere.engine").exists() and not (tmp_path / "ampere.json").exists()


def test_cancelled_build_leaves_no_file(digits_onnx, tmp_path):
    cancel = threading.Event()
    cancel.set()  # the monitor's first step_complete returns False
    with pytest.raises(BuildCancelled):
        build_engine(digits_onnx["fp16"], tmp_path / "c.engine", SM89, cancel=cancel)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_onnx_is_one_line_before_tensorrt_runs(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage-not-a-protobuf" * 10)
    with pytest.raises(VitDeployError, match=r"bad\.onnx is not a readable ONNX file \(DecodeError\)"):
        build_engine(bad, tmp_path / "bad.engine", SM89)
    assert not (tmp_path / "bad.engine").exists()


def test_onnx_the_parser_rejects_lists_its_errors(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    # valid ONNX (build reads its metadata and precision first), with an op TensorRT has no importer for
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    bad = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), bad)
    with pytest.raises(BuildError, match=r"TensorRT's ONNX parser rejected .*bad\.onnx \(\d+ errors\): "):
        build_engine(bad, tmp_path / "bad.engine", SM89)
    assert not (tmp_path / "bad.engine").exists()


@pytest.mark.parametrize(
    ("targets", "message"),
    [(["sm90"], r"TensorRT-RTX cannot run on sm90 .*build with full TensorRT \(--trt tensorrt\)"),
     (["sm89", "sm100"], r"TensorRT-RTX cannot run on sm100 .*full TensorRT"), (["banana"], "is not like sm89"),
     ([], "no GPU here to build for: name the targets")],
)
def test_target_errors(digits_onnx, tmp_path, targets, message):
    from vitdeploy.engines.tensorrt.build import current_gpu

    if not targets and current_gpu() is not None:
        pytest.skip("a GPU is present: the default target is that GPU")
    with pytest.raises(BuildError, match=message):
        build_engine(digits_onnx["fp16"], tmp_path / "t.engine",
                     BuildOptions(flavour="rtx", compute_capabilities=targets))
    assert list(tmp_path.iterdir()) == []


def test_no_tensorrt_installed_says_what_to_install(digits_onnx, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # None in sys.modules makes the import fail
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    r = CliRunner().invoke(main, ["build", str(digits_onnx["fp16"]), "-o", str(tmp_path / "n.engine"),
                                  "--compute-capability", "sm89"])
    assert r.exit_code == 1
    assert "no TensorRT found" in r.output and "pip install 'vitdeploy[tensorrt-rtx]'" in r.output
    assert list(tmp_path.iterdir()) == []


def test_cli_build_from_checkpoint_exports_then_builds(tiny_checkpoint, tmp_path):
    r = CliRunner().invoke(main, ["build", str(tiny_checkpoint), "-o", str(tmp_path / "t.engine"),
                                  "--compute-capability", "sm89", "--precision", "fp16", "--max-batch", "4"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "t.onnx").is_file() and (tmp_path / "t.engine").is_file()
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "t.engine"), "--json"])
    info = json.loads(r.output)
    assert info["precision"] == "fp16" and info["targets"] == ["sm89"] and info["profile"]["max"][0] == 4
    assert "needs a GPU" in info["layers"] or isinstance(info["layers"], dict)


def test_inspect_onnx_reports_qdq(digits_onnx):
    r = CliRunner().invoke(main, ["inspect", str(digits_onnx["int8"]), "--json"])
    info = json.loads(r.output)
    assert info["qdq"]["quantizable"] == 14 and info["qdq"]["quantized"] == 13
    assert info["model"]["precision"] == "int8" and info["ops"]["DequantizeLinear"] > 0


def test_export_with_engine_in_one_command(tiny_checkpoint, tmp_path):
    from vitdeploy.engines.tensorrt.build import current_gpu

    out = tmp_path / "m.onnx"
    if current_gpu() is None:
        r = CliRunner().invoke(main, ["export", "-m", str(tiny_checkpoint), "-o", str(out), "--engine"])
        assert r.exit_code == 2 and "needs --compute-capability" in r.output and not out.exists()
    r = CliRunner().invoke(main, ["export", "-m", str(tiny_checkpoint), "-o", str(out), "--precision", "fp16",
                                  "--dynamic-batch", "--engine", "--compute-capability", "sm89,sm120"])
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "m.json").read_text())
    assert side["precision"] == "fp16" and side["targets"] == ["sm89", "sm120"]
    assert (tmp_path / "m.engine").stat().st_size > 0


# -- the right flavour for the GPU (issue 11), with a stubbed GPU query ------------------------------------
H200 = sysinfo.Gpu(0, "NVIDIA H200", "sm90")
B200 = sysinfo.Gpu(0, "NVIDIA B200", "sm100")
RTX4090 = sysinfo.Gpu(1, "NVIDIA GeForce RTX 4090", "sm89")
RTX5090 = sysinfo.Gpu(0, "NVIDIA GeForce RTX 5090", "sm120")


@pytest.fixture
def gpus(monkeypatch):
    """Set the visible GPUs: gpus(H200, ...)."""
    def set_gpus(*devices):
        monkeypatch.setattr(sysinfo, "cuda_devices", lambda: list(devices))

    return set_gpus


def test_compute_capability_to_flavour_table():
    for cc in ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121"):
        assert sysinfo.trt_flavours_for(cc) == ["tensorrt", "tensorrt_rtx"]
    for cc in ("sm70", "sm72", "sm87", "sm90", "sm100", "sm103", "sm110"):
        assert sysinfo.trt_flavours_for(cc) == ["tensorrt"]


@pytest.mark.parametrize(("requested", "targets", "gpu", "installed", "chosen"), [
    ("auto", [], H200, {"tensorrt", "tensorrt_rtx"}, ("tensorrt", ["sm90"])),
    ("auto", [], RTX4090, {"tensorrt", "tensorrt_rtx"}, ("tensorrt", ["sm89"])),  # full TensorRT first
    ("auto", [], RTX4090, {"tensorrt_rtx"}, ("tensorrt_rtx", ["sm89"])),
    ("auto", ["sm89", "8.6"], None, {"tensorrt_rtx"}, ("tensorrt_rtx", ["sm89", "sm86"])),
    ("auto", ["sm120"], H200, {"tensorrt", "tensorrt_rtx"}, ("tensorrt_rtx", ["sm120"])),  # ahead of time
    ("rtx", [], RTX5090, {"tensorrt_rtx"}, ("tensorrt_rtx", ["sm120"])),
    ("tensorrt", [], B200, {"tensorrt"}, ("tensorrt", ["sm100"])),
])
def test_flavour_choice(requested, targets, gpu, installed, chosen):
    host = (gpu.name, gpu.compute_capability) if gpu else None
    assert choose_flavour(requested, targets, host, installed.__contains__) == chosen


@pytest.mark.parametrize(("requested", "targets", "gpu", "installed", "message"), [
    ("rtx", [], H200, {"tensorrt_rtx"},
     r"^TensorRT-RTX cannot run on sm90 \(NVIDIA H200\): build with full TensorRT \(--trt tensorrt\)"),
    ("rtx", [], B200, {"tensorrt_rtx", "tensorrt"}, r"^TensorRT-RTX cannot run on sm100 \(NVIDIA B200\)"),
    ("rtx", ["sm100"], None, {"tensorrt_rtx"}, r"^TensorRT-RTX cannot run on sm100 .*full TensorRT"),
    ("auto", [], H200, {"tensorrt_rtx"}, r"TensorRT-RTX cannot run on sm90 .*install full TensorRT"),
    ("auto", [], H200, set(), r"no TensorRT found: install full TensorRT"),
    ("auto", [], None, {"tensorrt_rtx"}, "no GPU here to build for: name the targets"),
    ("tensorrt", [], None, {"tensorrt"}, "full TensorRT builds on the GPU it targets and none is visible"),
    ("tensorrt", ["sm89"], RTX4090, {"tensorrt"}, "--compute-capability is a TensorRT-RTX option"),
])
def test_flavour_refusals(requested, targets, gpu, installed, message):
    host = (gpu.name, gpu.compute_capability) if gpu else None
    with pytest.raises(BuildError, match=message):
        choose_flavour(requested, targets, host, installed.__contains__)


def test_cli_build_rtx_on_hopper_refuses_before_exporting(gpus, tiny_checkpoint, tmp_path):
    gpus(H200)
    r = CliRunner().invoke(main, ["build", str(tiny_checkpoint), "-o", str(tmp_path / "t.engine"), "--trt", "rtx"])
    assert r.exit_code == 1
    assert "TensorRT-RTX cannot run on sm90 (NVIDIA H200): build with full TensorRT (--trt tensorrt)" in r.output
    assert list(tmp_path.iterdir()) == []  # not even the ONNX: refused before any work
    r = CliRunner().invoke(main, ["export", "-m", str(tiny_checkpoint), "-o", str(tmp_path / "t.onnx"), "--engine",
                                  "--compute-capability", "sm90"])
    assert r.exit_code == 1 and "TensorRT-RTX cannot run on sm90" in r.output and list(tmp_path.iterdir()) == []


def test_cli_build_auto_picks_a_flavour_that_runs_here(gpus, tiny_onnx, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorrt" else real(name, *a))
    gpus(RTX5090)  # TensorRT-RTX runs there: auto builds for it (ahead of time, so it works on this CPU machine)
    r = CliRunner().invoke(main, ["build", str(tiny_onnx["a"]), "-o", str(tmp_path / "a.engine")])
    assert r.exit_code == 0, r.output
    side = EngineSidecar.read(tmp_path / "a.engine")
    assert side.flavour == "tensorrt_rtx" and side.targets == ["sm120"]
    gpus(H200)  # it does not run there: auto refuses and names full TensorRT
    r = CliRunner().invoke(main, ["build", str(tiny_onnx["a"]), "-o", str(tmp_path / "b.engine")])
    assert r.exit_code == 1 and "TensorRT-RTX cannot run on sm90 (NVIDIA H200): build with full TensorRT" in r.output
    assert not (tmp_path / "b.engine").exists()


def test_info_says_which_flavour_runs_on_each_gpu(gpus):
    gpus(H200, RTX4090)
    flavours = sysinfo.gpu_flavours()
    assert [f["trt_flavours"] for f in flavours] == [["tensorrt"], ["tensorrt", "tensorrt_rtx"]]
    assert flavours[0]["note"] == "TensorRT-RTX cannot run on sm90; build with full TensorRT (--trt tensorrt)"
    r = CliRunner().invoke(main, ["info"])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "NVIDIA H200 (sm90): full TensorRT (TensorRT-RTX cannot run on sm90" in out
    assert "NVIDIA GeForce RTX 4090 (sm89): full TensorRT or TensorRT-RTX" in out
    backends = sysinfo.backends()
    assert backends["tensorrt_rtx run"] is True  # the RTX 4090
    gpus(H200)
    assert "TensorRT-RTX cannot run on sm90" in sysinfo.backends()["tensorrt_rtx run"]


# -- engine + sidecar published as one set ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """Two one-MatMul ONNX files (different weights): engines build in a fraction of a second."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    root = tmp_path_factory.mktemp("tiny_onnx")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        w = numpy_helper.from_array(np.random.default_rng(seed).standard_normal((64, 10)).astype(np.float32), "w")
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], name,
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], [w])
        out[name] = root / f"{name}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), out[name])
    return out


def test_engine_from_another_build_is_refused_by_every_reader(tiny_onnx, tmp_path):
    a, b = tmp_path / "a.engine", tmp_path / "b.engine"
    build_engine(tiny_onnx["a"], a, SM89)
    build_engine(tiny_onnx["b"], b, SM89)
    shutil.copy(b, a)  # a's sidecar, b's engine
    with pytest.raises(VitDeployError, match=r"a\.engine does not match its sidecar a\.json .*different builds"):
        EngineSidecar.read(a)
    r = CliRunner().invoke(main, ["inspect", str(a)])
    assert r.exit_code == 1 and "does not match its sidecar" in r.output


_KILL_RUNNER = """
import os, signal, sys
when, k = sys.argv[1], int(sys.argv[2])
if when != "none":  # SIGKILL this process just before or just after the k-th rename of the publish
    real, count = os.replace, [0]
    def replace(src, dst):
        count[0] += 1
        if when == "before" and count[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
        if when == "after" and count[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
from vitdeploy.cli import main
main(sys.argv[3:])
"""


def test_killed_build_leaves_the_old_set_or_the_new_set(tiny_onnx, tmp_path):
    """SIGKILL `vitdeploy build` at random points and at each rename of the publish: the engine and its
    sidecar are always the old build's or the new build's, never a mix (VITDEPLOY_KILL_TRIALS sets the
    number of random trials, 20 by default)."""
    target = tmp_path / "m.engine"
    build_engine(tiny_onnx["a"], target, SM89)
    old_engine, old_side = target.read_bytes(), sidecar_path(target).read_bytes()
    new_onnx_sha = sha256_file(tiny_onnx["b"])
    args = ["build", str(tiny_onnx["b"]), "-o", str(target), "--trt", "rtx", "--compute-capability", "sm89",
            "--max-batch", "8"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def run(when: str = "none", k: int = 0, kill_after: float | None = None) -> int:
        proc = subprocess.Popen([sys.executable, "-c", _KILL_RUNNER, when, str(k), *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kill_after is not None:
            time.sleep(kill_after)
            proc.send_signal(signal.SIGKILL)
        return proc.wait(60)

    def outcome() -> str:
        side = EngineSidecar.read(target)  # completes a publish killed between its renames
        engine = target.read_bytes()
        assert side.engine_sha256 == hashlib.sha256(engine).hexdigest()
        if engine == old_engine and sidecar_path(target).read_bytes() == old_side:
            return "old"
        assert side.onnx_sha256 == new_onnx_sha and side.profile["max"] == [8, 64], "a mix of two builds"
        return "new"

    def restore_old() -> None:
        for path, data in ((target, old_engine), (sidecar_path(target), old_side)):
            tmp = path.with_name(path.name + ".restore")
            tmp.write_bytes(data)
            os.replace(tmp, path)

    durations = []
    for _ in range(2):  # whole builds, for their duration (the second with warm file caches)
        restore_old()
        t0 = time.perf_counter()
        assert run() == 0
        durations.append(time.perf_counter() - t0)
        assert outcome() == "new"
    full = min(durations)
    seen = []
    for when, k, expected in (("before", 1, "old"), ("after", 1, "new"), ("after", 2, "new")):
        restore_old()
        assert run(when, k) == -signal.SIGKILL
        if when == "after" and k == 1:  # the one moment the folder holds a new engine and the old sidecar
            assert target.read_bytes() != old_engine and sidecar_path(target).read_bytes() == old_side
        seen.append(outcome())
        assert seen[-1] == expected, (when, k)
    rng = random.Random(0)
    trials = int(os.environ.get("VITDEPLOY_KILL_TRIALS", "20"))
    for _ in range(trials):
        restore_old()
        run(kill_after=rng.uniform(0.4, 1.1) * full)
        seen.append(outcome())
    print(f"killed builds: {len(seen)} ({seen.count('old')} old set, {seen.count('new')} new set), "
          f"one build {full:.2f} s")


# -- issue 17: profiling verbosity opt-in, no --version-compatible for TensorRT-RTX ---------------------------
@pytest.fixture
def builder_config(monkeypatch):
    """What build_engine set on TensorRT-RTX's real IBuilderConfig; the build itself is skipped (None)."""
    seen = {}

    def spy(self, network, config):
        seen["verbosity"] = config.profiling_verbosity
        seen["version_compatible"] = config.get_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        return None

    monkeypatch.setattr(trt.Builder, "build_serialized_network", spy)
    return seen


@pytest.mark.parametrize(("args", "expected"), [
    ([], "LAYER_NAMES_ONLY"), (["--profiling-verbosity", "detailed"], "DETAILED"),
    (["--profiling-verbosity", "none"], "NONE")])
def test_profiling_verbosity_is_layer_names_only_unless_asked(tiny_onnx, tmp_path, builder_config, args, expected):
    """DETAILED slows enqueueV3, so it is opt-in; the default keeps layer names for `inspect`."""
    r = CliRunner().invoke(main, ["build", str(tiny_onnx["a"]), "-o", str(tmp_path / "v.engine"),
                                  "--trt", "rtx", "--compute-capability", "sm89", *args])
    assert r.exit_code == 1 and "could not build" in r.output, r.output  # the spy's None
    assert builder_config["verbosity"] == getattr(trt.ProfilingVerbosity, expected)
    assert not builder_config["version_compatible"]


def test_version_compatible_is_refused_for_tensorrt_rtx(tiny_onnx, tiny_checkpoint, tmp_path, builder_config):
    """TensorRT-RTX engines do not run on other TensorRT-RTX releases: the flag would promise what is not so."""
    with pytest.raises(BuildError, match="TensorRT-RTX engines are not compatible across TensorRT-RTX releases"):
        build_engine(tiny_onnx["a"], tmp_path / "vc.engine",
                     BuildOptions(flavour="rtx", compute_capabilities=["sm89"], version_compatible=True))
    assert builder_config == {}  # refused before TensorRT was asked
    r = CliRunner().invoke(main, ["build", str(tiny_checkpoint), "-o", str(tmp_path / "vc.engine"),
                                  "--compute-capability", "sm89", "--version-compatible"])
    assert r.exit_code == 1 and "not compatible across TensorRT-RTX releases" in r.output, r.output
    assert list(tmp_path.iterdir()) == []  # refused before the export
    with pytest.raises(BuildError, match="--profiling-verbosity 'loud': choose layer_names_only, detailed, none"):
        build_engine(tiny_onnx["a"], tmp_path / "p.engine", BuildOptions(flavour="rtx", compute_capabilities=["sm89"],
                                                                        profiling_verbosity="loud"))


@pytest.fixture
def profiles_built(monkeypatch):
    """The optimization profiles TensorRT-RTX's real builder config held when the engine was built (the
    real build runs: an engine on CPU cannot be deserialized here to count them)."""
    seen = []
    real = trt.Builder.build_serialized_network

    def spy(self, network, config):
        seen.append(config.num_optimization_profiles)
        return real(self, network, config)

    monkeypatch.setattr(trt.Builder, "build_serialized_network", spy)
    return seen


def test_instances_build_one_profile_each(tiny_onnx, tmp_path, profiles_built):
    """TensorRT runs concurrent contexts of a dynamic-batch engine on separate optimization profiles: `build
    --instances 2` builds two identical ones and records them; the runtime's slot i selects profile i."""
    r = CliRunner().invoke(main, ["build", str(tiny_onnx["a"]), "-o", str(tmp_path / "i.engine"), "--trt", "rtx",
                                  "--compute-capability", "sm89", "--max-batch", "8", "--instances", "2"])
    assert r.exit_code == 0, r.output
    assert "x2 (one per instance)" in r.output
    side = EngineSidecar.read(tmp_path / "i.engine")
    assert side.options["instances"] == 2 and side.profiles == 2
    assert profiles_built == [2]
    one = build_engine(tiny_onnx["a"], tmp_path / "one.engine",
                       BuildOptions(flavour="rtx", compute_capabilities=["sm89"]))
    assert one.profiles == 1 and EngineSidecar.read(one.engine).profiles == 1
    r = CliRunner().invoke(main, ["build", str(tiny_onnx["a"]), "--instances", "0"])
    assert r.exit_code == 2 and "--instances" in r.output
    with pytest.raises(BuildError, match=r"--instances 0: an engine runs at least one execution context"):
        build_engine(tiny_onnx["a"], tmp_path / "z.engine", BuildOptions(flavour="rtx", compute_capabilities=["sm89"],
                                                                         instances=0))


def test_a_static_engine_gets_one_profile_whatever_the_instances(tmp_path, profiles_built):
    """A static batch has no shapes to choose: its contexts may share the one profile."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((64, 10), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "s",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 10])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "s.onnx")
    report = build_engine(tmp_path / "s.onnx", tmp_path / "s.engine",
                          BuildOptions(flavour="rtx", compute_capabilities=["sm89"], instances=3))
    assert report.profiles == 1 and EngineSidecar.read(report.engine).profiles == 1 and profiles_built == [1]
