"""Real TensorRT-RTX engine builds on the CPU (ahead of time for named GPU targets)."""

import json
import os
import stat
import sys
import threading

import pytest
from click.testing import CliRunner

from vitdeploy.cli import main
from vitdeploy.engines.tensorrt_build import BuildCancelled, BuildError, BuildOptions, build_engine, sidecar_path
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


def test_corrupt_onnx_lists_parser_errors(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage-not-a-protobuf" * 10)
    with pytest.raises(BuildError, match=r"TensorRT's ONNX parser rejected .*bad\.onnx \(\d+ errors\): "):
        build_engine(bad, tmp_path / "bad.engine", SM89)
    assert not (tmp_path / "bad.engine").exists()


@pytest.mark.parametrize(
    ("targets", "message"),
    [(["sm90"], "sm90 is not one TensorRT-RTX"), (["banana"], "is not like sm89"),
     ([], "no GPU here to build for: name the targets")],
)
def test_target_errors(digits_onnx, tmp_path, targets, message):
    from vitdeploy.engines.tensorrt_build import current_gpu

    if not targets and current_gpu() is not None:
        pytest.skip("a GPU is present: the default target is that GPU")
    with pytest.raises(BuildError, match=message):
        build_engine(digits_onnx["fp16"], tmp_path / "t.engine",
                     BuildOptions(flavour="rtx", compute_capabilities=targets))


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
    from vitdeploy.engines.tensorrt_build import current_gpu

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
