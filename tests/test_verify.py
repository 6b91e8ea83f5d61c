"""The golden set: made at export, carried by every artifact, checked by verify, build and the first load."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import logging
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from vitdeploy.artifacts.golden import MAX_BYTES, GoldenError, GoldenSet, make_golden_set, synthetic_images
from vitdeploy.cli import main
from vitdeploy.engines import open_runtime
from vitdeploy.exporters import ExportOptions, export_onnx, read_onnx_metadata
from vitdeploy.metrics import TOLERANCES
from vitdeploy.preprocess import Preprocessing
from vitdeploy.verify import (
    DriftError,
    artifact_golden,
    first_load_check,
    open_verified,
    verified_path,
    verify_artifact,
)


@pytest.fixture(scope="module")
def golden_onnx(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny 224x224 ViT exported (dynamic batch, FP32): its golden set is 4 synthetic images."""
    out = tmp_path_factory.mktemp("golden") / "m.onnx"
    return export_onnx(tiny_checkpoint, out, options=ExportOptions(dynamic_batch=True)).path


def _copy(src: Path, folder: Path, name: str = "m.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(src, folder / name))


def _tamper(src: Path, dst: Path, mean: float | None = None, weight_scale: float | None = None) -> Path:
    """A copy of ``src`` whose metadata says another mean, or whose classifier weight is scaled."""
    import onnx
    from onnx import numpy_helper

    from vitdeploy.artifacts.metadata import ArtifactMetadata, set_metadata

    model = onnx.load(str(src))
    if mean is not None:
        meta = ArtifactMetadata.from_props({p.key: p.value for p in model.metadata_props})
        meta.preprocessing["mean"] = [mean] * 3
        set_metadata(model, meta)
    if weight_scale is not None:
        init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)) if len(t.dims) == 2 else 0)
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * weight_scale, init.name))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


# --- made at export -------------------------------------------------------------------------------------
def test_export_stores_a_golden_set_with_torch_fp32_logits(golden_onnx, tiny_checkpoint):
    import torch
    from PIL import Image

    from vitdeploy import load_model

    golden = read_onnx_metadata(golden_onnx).golden
    assert golden is not None and len(golden.images) == 4 and golden.source == "synthetic (seed 0)"
    assert golden.nbytes <= MAX_BYTES and golden.precision == "fp32"
    assert golden.tolerance == {**TOLERANCES["fp32"], "top1_margin": 0.05}
    model = load_model(tiny_checkpoint).eval()
    for im in golden.images:
        # an independent preprocessing (PIL bilinear to 224, /255, (x - 0.5) / 0.5), then torch FP32
        img = Image.open(io.BytesIO(im.png))
        assert img.format == "PNG" and img.size != (224, 224)  # the resize is part of what is checked
        x = np.asarray(img.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR), np.float32) / 255
        x = ((x - 0.5) / 0.5).transpose(2, 0, 1)[None]
        with torch.no_grad():
            ref = model(torch.from_numpy(np.ascontiguousarray(x))).numpy()[0]
        np.testing.assert_allclose(im.logits, ref, atol=1e-5)
        assert im.top_k == list(np.argsort(-ref)[:5])
    stored = json.loads(next(p.value for p in __import__("onnx").load(str(golden_onnx)).metadata_props
                             if p.key == "vitdeploy.golden"))
    assert base64.b64decode(stored["images"][0]["png"]).startswith(b"\x89PNG")


def test_golden_images_folder_is_used_and_the_set_stays_small(tiny_checkpoint, images, tmp_path):
    report = export_onnx(tiny_checkpoint, tmp_path / "g.onnx", options=ExportOptions(golden_images=images))
    golden = read_onnx_metadata(report.path).golden
    names = [im.name for im in golden.images]
    assert names == sorted(p.relative_to(images).as_posix() for p in images.rglob("*.*"))  # all 6 (<= 8)
    assert golden.source == f"images from {images.name}" and report.golden.passed
    assert report.golden_bytes == golden.nbytes <= MAX_BYTES
    # photos too big for the budget are shrunk until the set fits
    rng = np.random.default_rng(0)
    from PIL import Image

    noisy = [(f"n{i}", Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8))) for i in range(4)]
    small = make_golden_set(noisy, Preprocessing(), lambda x: x.mean(axis=(2, 3)), "fp32", "noise", max_bytes=60_000)
    assert small.nbytes <= 60_000 and all(max(Image.open(io.BytesIO(i.png)).size) < 300 for i in small.images)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format="other"), "not a vitdeploy golden set"),
    (lambda d: d["images"][0].update(png=base64.b64encode(b"GIF89a...").decode()), "is not a PNG"),
    (lambda d: d["tolerance"].pop("min_cosine"), "tolerance"),
    (lambda d: d.update(images=[]), "needs 1 to"),
])
def test_a_malformed_golden_set_is_one_clear_error(golden_onnx, change, message):
    data = json.loads(read_onnx_metadata(golden_onnx).golden.to_json())
    change(data)
    with pytest.raises(GoldenError, match=message):
        GoldenSet.from_json(json.dumps(data))


def test_a_huge_image_is_refused_before_decoding(golden_onnx):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (5000, 10)).save(buf, format="PNG")
    data = json.loads(read_onnx_metadata(golden_onnx).golden.to_json())
    data["images"][0]["png"] = base64.b64encode(buf.getvalue()).decode()
    with pytest.raises(GoldenError, match="over 1024 pixels a side"):
        GoldenSet.from_json(json.dumps(data))


# --- vitdeploy verify -------------------------------------------------------------------------------------
def test_verify_passes_on_onnxruntime_openvino_and_a_tuned_plan(golden_onnx, tmp_path):
    from vitdeploy.engines.plan import MachineKey, PathChoice, TunePlan, plan_path
    from vitdeploy.io import sha256_file

    for backend in ("onnxruntime", "openvino"):
        report = verify_artifact(golden_onnx, backend=backend)
        assert report.passed and len(report.results) == 1 and len(report.results[0].verdict.rows) == 4
        assert report.results[0].runtime.startswith(backend)
    path = _copy(golden_onnx, tmp_path)
    TunePlan(path.name, sha256_file(path), MachineKey.current(), PathChoice("openvino", {"threads": 1}, "ov"),
             PathChoice("onnxruntime", {"threads": 1}, "ort"), throughput_batch=2).write(plan_path(path))
    report = verify_artifact(path, backend="auto", device="cpu")  # both of the plan's paths are checked
    assert report.passed and [r.runtime.split("[")[0] for r in report.results] == ["openvino", "onnxruntime"]
    r = CliRunner().invoke(main, ["verify", str(golden_onnx), "--backend", "onnxruntime,openvino"])
    assert r.exit_code == 0, r.output
    assert r.output.count("synthetic-3") == 2 and "PASSED" in r.output


@pytest.mark.parametrize("tamper", [{"mean": 0.45}, {"weight_scale": 1.05}], ids=["metadata-mean", "weights"])
def test_a_tampered_artifact_fails_verify_naming_the_image(golden_onnx, tmp_path, tamper):
    bad = _tamper(golden_onnx, tmp_path / "bad.onnx", **tamper)
    for backend in ("onnxruntime", "openvino"):
        report = verify_artifact(bad, backend=backend)
        assert report.failed and "golden image 'synthetic-" in report.reason()
        assert "max abs error" in report.reason()
    r = CliRunner().invoke(main, ["verify", str(bad)])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1].startswith("Error: drift: bad.onnx on onnxruntime")
    assert "golden image 'synthetic-" in r.output and "DRIFT" in r.output


# --- an embedding artifact: its golden set checks the cosine and the relative error, not a top-1 --------------
def _ort_against_golden(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Each golden image's cosine and max abs error relative to the stored vector's largest value, from a plain
    ONNX Runtime session on the golden batch (the reference for what verify reports)."""
    import onnxruntime as ort

    from vitdeploy.verify import golden_batch

    meta = read_onnx_metadata(path)
    ref = np.stack([im.logits for im in meta.golden.images]).astype(np.float64)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"pixel_values": golden_batch(meta, meta.golden)})[0].astype(np.float64)
    cosine = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    return cosine, np.abs(out - ref).max(1) / np.abs(ref).max(1)


def _table_header(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("┃ image"))


def test_verify_of_an_embedding_export_shows_cosine_and_relative_error_per_image(clip_embedding, golden_onnx,
                                                                                 tmp_path):
    """`vitdeploy verify` on CLIP's image tower exported as an embedding model shows what its golden set checks:
    the cosine to the stored vector, the max abs error relative to its largest value, and pass or fail, per
    image. Old code: the classifier's top-1 expected / got / match columns, filled with each vector's argmax."""
    r = CliRunner().invoke(main, ["verify", str(clip_embedding), "--backend", "onnxruntime", "--wide",
                                  "--json", str(tmp_path / "v.json")])
    assert r.exit_code == 0, r.output
    header = _table_header(r.output)
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == ["image", "cosine to golden",
                                                                 "max abs / largest value", "status"], header
    assert "top-1" not in r.output and "match" not in r.output and "PASSED" in r.output
    (result,) = json.loads((tmp_path / "v.json").read_text())[0]["results"]
    assert result["task"] == "embedding" and result["passed"] and len(result["rows"]) == 4
    cosine, error = _ort_against_golden(clip_embedding)
    for i, row in enumerate(result["rows"]):
        assert row["cosine"] == pytest.approx(cosine[i], abs=1e-6)
        assert row["max_abs"] / row["scale"] == pytest.approx(error[i], abs=2e-5) and error[i] <= 1e-4
        cells = [c.strip() for c in next(line for line in r.output.splitlines()
                                         if line.startswith(f"│ {row['image']} ")).strip("│ ").split("│")]
        assert cells == [row["image"], f"{row['cosine']:.6f}", f"{row['max_abs'] / row['scale']:.3g}", "ok"], cells
    # a classifier keeps its table
    r = CliRunner().invoke(main, ["verify", str(golden_onnx), "--backend", "onnxruntime", "--wide"])
    assert r.exit_code == 0, r.output
    assert [c.strip() for c in _table_header(r.output).strip("┃ ").split("┃")] == [
        "image", "top-1 expected", "top-1 got", "match", "max abs / scale", "cosine", "status"]


def _turn_the_projection(src: Path, dst: Path) -> Path:
    """A copy of an embedding export whose last weight matrix (CLIP's projection, told from the hidden-to-output
    matrices by its output size) has the first half of its output columns scaled by 1.5: the vectors turn, so
    their cosine to the golden ones falls (a uniform scale would keep it). The metadata is kept as it was."""
    import onnx
    from onnx import numpy_helper

    size = read_onnx_metadata(src).output_size
    model = onnx.load(str(src))
    weights = {t.name: t for t in model.graph.initializer if len(t.dims) == 2}
    node = next(n for n in reversed(model.graph.node) if n.op_type in ("MatMul", "Gemm") and
                set(n.input) & set(weights))
    init = weights[next(i for i in node.input if i in weights)]
    w = numpy_helper.to_array(init).copy()
    assert size in w.shape and w.shape[0] != w.shape[1], w.shape  # the projection: hidden 32 -> 16
    half = (slice(None), slice(0, size // 2)) if w.shape[1] == size else (slice(0, size // 2), slice(None))
    w[half] *= 1.5
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(dst))
    return dst


def test_an_embedding_golden_set_catches_drift_in_verify_and_on_first_load(clip_embedding, images, tmp_path):
    """The CLIP embedding export with its projection turned (metadata and golden set unchanged): verify fails in
    one line naming the image and its cosine, and every first load refuses it (open_verified, predict even with
    --require-verified, serve's readiness), unless --allow-drift."""
    import httpx

    from tests.http_server import Server
    from vitdeploy.serving.readiness import warm_and_verify

    bad = _turn_the_projection(clip_embedding, tmp_path / "turned.onnx")
    meta = read_onnx_metadata(bad)
    assert meta == read_onnx_metadata(clip_embedding) and (meta.output_size, meta.config["hidden_size"]) == (16, 32)
    cosine, _ = _ort_against_golden(bad)
    assert cosine.max() < 0.999  # turned well past FP32's 0.99999 on every image
    r = CliRunner().invoke(main, ["verify", str(bad), "--backend", "onnxruntime"])
    line = re.fullmatch(r"Error: drift: turned\.onnx on onnxruntime.*: golden image 'synthetic-0' drifted: cosine "
                        r"(0\.\d{6}) < 0\.99999; max abs error .* x its largest value > 0\.0001 "
                        r"\(and 3 more of 4 images\)", r.output.strip().splitlines()[-1])
    assert r.exit_code == 1 and line, r.output
    assert float(line[1]) == pytest.approx(cosine[0], abs=2e-6) and r.output.count("DRIFT: cosine") == 4
    with pytest.raises(DriftError, match=r"turned\.onnx fails its golden set on onnxruntime.*drifted: cosine "
                                         r"0\.\d{6} < 0\.99999.*checked on first load"):
        open_verified(bad, backend="onnxruntime")
    png = next(images.rglob("*.png"))
    img = str(png)
    r = CliRunner().invoke(main, ["predict", "-m", str(bad), "--require-verified", img])
    assert r.exit_code == 1 and "drifted: cosine" in r.output and "--allow-drift" in r.output, r.output
    r = CliRunner().invoke(main, ["predict", "-m", str(bad), "--allow-drift", img])
    assert r.exit_code == 0 and "embedding of 16" in r.output, r.output
    prepare = warm_and_verify(bad, 2)  # as `vitdeploy serve` does, before the runtime opens the file
    with open_runtime(bad, threads=1) as rt, Server(rt, prepare=prepare, max_batch=2) as srv:
        deadline = time.perf_counter() + 60
        while (ready := httpx.get(srv.url + "/readyz", timeout=5)).json()["status"] == "preparing":
            assert time.perf_counter() < deadline, ready.text
            time.sleep(0.05)
        assert ready.status_code == 503 and ready.json()["status"] == "failed", ready.text
        assert "drifted: cosine" in ready.json()["reason"], ready.text
        assert httpx.post(srv.url + "/v1/embed", content=png.read_bytes(), timeout=5).status_code == 503


# --- the tolerance comes from the artifact's real precision (issue 29, item 4) --------------------------------
def _with_golden(src: Path, dst: Path, edit) -> Path:
    """A copy of ``src`` whose golden set (its JSON, as a dict) ``edit`` changed."""
    import onnx

    model = onnx.load(str(src))
    prop = next(p for p in model.metadata_props if p.key == "vitdeploy.golden")
    data = json.loads(prop.value)
    edit(data)
    prop.value = json.dumps(data)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def _edit_logits(data: dict, change) -> None:
    for im in data["images"]:
        logits = np.frombuffer(base64.b64decode(im["logits"]), "<f4")
        im["logits"] = base64.b64encode(change(logits).astype("<f4").tobytes()).decode()


def test_a_golden_set_cannot_loosen_its_own_tolerance(golden_onnx, tmp_path):
    """Classes swapped (each image's stored logits rolled by one) and a stored tolerance that lets anything
    through: the FP32 artifact is held to FP32's tolerance, and fails."""
    def lax_and_swapped(data: dict) -> None:
        data["tolerance"] = {"max_abs_rel": 1e9, "min_cosine": 0.0, "top1_margin": 1e9}
        _edit_logits(data, lambda v: np.roll(v, 1))

    bad = _with_golden(golden_onnx, tmp_path / "lax.onnx", lax_and_swapped)
    report = verify_artifact(bad, backend="onnxruntime")
    assert report.failed, report.to_dict()
    verdict = report.results[0].verdict
    assert verdict.precision == "fp32" and verdict.tolerance == {**TOLERANCES["fp32"], "top1_margin": 0.05}
    assert "max abs error" in report.reason()
    r = CliRunner().invoke(main, ["verify", str(bad)])
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1].startswith("Error: drift: lax.onnx"), r.output


def test_a_golden_set_claiming_fp8_in_an_fp32_artifact_gets_fp32s_tolerance(golden_onnx, tmp_path):
    """The set says fp8 (with fp8's tolerance, 0.8 x scale); the graph has no Q/DQ: fp32's applies, so
    logits off by 0.2 x scale are drift."""
    from vitdeploy.artifacts.golden import tolerance_for

    def claim_fp8(data: dict) -> None:
        data["precision"], data["tolerance"] = "fp8", tolerance_for("fp8")
        _edit_logits(data, lambda v: v + 0.2 * max(1.0, float(np.abs(v).max())))

    bad = _with_golden(golden_onnx, tmp_path / "fp8-claim.onnx", claim_fp8)
    report = verify_artifact(bad, backend="onnxruntime")
    assert report.failed and report.results[0].verdict.precision == "fp32", report.to_dict()
    # a stored tolerance tighter than the precision's is kept
    tight = _with_golden(golden_onnx, tmp_path / "tight.onnx", lambda d: d["tolerance"].update(max_abs_rel=1e-12))
    assert verify_artifact(tight, backend="onnxruntime").results[0].verdict.tolerance["max_abs_rel"] == 1e-12


def test_the_precision_is_read_from_the_graph(digits_onnx, tmp_path):
    """Real exports read as what they are, and pass their golden sets with that precision's tolerance; a
    hand-made graph with an FP8 DequantizeLinear reads as fp8."""
    import onnx
    from onnx import TensorProto, helper

    from vitdeploy.verify import artifact_precision

    for name in ("fp32", "fp16", "int8"):
        assert artifact_precision(digits_onnx[name]) == name
    report = verify_artifact(digits_onnx["int8"], backend="onnxruntime")
    assert report.passed and report.results[0].verdict.precision == "int8"
    w = helper.make_tensor("w", TensorProto.FLOAT8E4M3FN, [2], [1.0, 2.0])
    graph = helper.make_graph([helper.make_node("DequantizeLinear", ["w", "s"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [w, helper.make_tensor("s", TensorProto.FLOAT, [], [1.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.save(model, str(tmp_path / "fp8.onnx"))
    assert artifact_precision(tmp_path / "fp8.onnx") == "fp8"


def test_a_dead_node_does_not_loosen_the_tolerance(golden_onnx, tmp_path):
    """An FP32 graph given a DequantizeLinear and a float16 initializer that feed no output, its golden set
    loosened and its stored logits scaled by 1.05: still fp32, so it fails. Old code: read as int8, the
    stored tolerance applied up to int8's, and verify passed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from vitdeploy.verify import artifact_precision

    def lax_and_off(data: dict) -> None:
        data["tolerance"] = {"max_abs_rel": 1e9, "min_cosine": 0.0, "top1_margin": 1e9}
        _edit_logits(data, lambda v: v * 1.05)

    bad = _with_golden(golden_onnx, tmp_path / "dead.onnx", lax_and_off)
    model = onnx.load(str(bad))
    model.graph.initializer.extend([helper.make_tensor("dead_q", TensorProto.INT8, [1], [0]),
                                    numpy_helper.from_array(np.ones(1, np.float32), "dead_s"),
                                    numpy_helper.from_array(np.zeros(1, np.float16), "dead_half")])
    model.graph.node.append(helper.make_node("DequantizeLinear", ["dead_q", "dead_s"], ["dead_y"]))
    onnx.save(model, str(bad))
    assert artifact_precision(bad) == "fp32"
    report = verify_artifact(bad, backend="onnxruntime")
    assert report.failed and report.results[0].verdict.precision == "fp32", report.to_dict()


# --- first load -------------------------------------------------------------------------------------------
@pytest.fixture
def count_checks(monkeypatch):
    import vitdeploy.verify as verify

    calls = []
    real = verify.verify_runtime

    def spy(rt, golden, options=None, precision=None):
        calls.append(rt.describe())
        return real(rt, golden, options, precision)

    monkeypatch.setattr(verify, "verify_runtime", spy)
    return calls


def test_first_load_checks_once_per_target_and_reuses_the_verdict(golden_onnx, tmp_path, count_checks):
    path = _copy(golden_onnx, tmp_path)
    with open_verified(path, backend="onnxruntime", threads=1):
        pass
    cache = verified_path(path)
    assert cache.name == "m.verified.json" and len(count_checks) == 1
    first = cache.read_bytes()
    with open_verified(path, backend="onnxruntime", threads=1) as rt:
        assert rt.infer(np.zeros((1, 3, 224, 224), np.float32)).shape == (1, 6)
    assert len(count_checks) == 1 and cache.read_bytes() == first  # reused, not rewritten
    with open_verified(path, backend="openvino", threads=1):  # another runtime: another check, one more entry
        pass
    assert len(count_checks) == 2
    entries = json.loads(cache.read_text())["entries"]
    assert [e["results"][0]["passed"] for e in entries] == [True, True]
    assert entries[0]["key"]["artifact_sha256"] == entries[1]["key"]["artifact_sha256"]
    assert {"onnxruntime", "openvino", "pillow", "numpy"} <= set(entries[0]["key"]["libraries"])
    with open_verified(path, backend="onnxruntime", threads=1, verify=False):
        pass
    assert len(count_checks) == 2
    shutil.copyfile(_tamper(golden_onnx, tmp_path / "t" / "bad.onnx", weight_scale=1.05), path)  # same name
    with pytest.raises(DriftError, match="checked on first load"):  # another file: checked again, and refused
        open_verified(path, backend="onnxruntime", threads=1)
    assert len(count_checks) == 3


def test_a_failed_verdict_refuses_to_open_unless_allowed(golden_onnx, tmp_path, count_checks, caplog):
    bad = _tamper(golden_onnx, tmp_path / "bad.onnx", mean=0.45)
    with pytest.raises(DriftError, match=r"bad.onnx fails its golden set on onnxruntime.*golden image 'synthetic-\d+' "
                                         r"drifted: max abs error .*; checked on first load"):
        open_verified(bad, backend="onnxruntime")
    assert len(count_checks) == 1 and verified_path(bad).is_file()
    with pytest.raises(DriftError, match=r"; verdict cached in bad\.verified\.json"):  # refused again, from the cache
        open_verified(bad, backend="onnxruntime")
    assert len(count_checks) == 1
    with caplog.at_level(logging.WARNING, logger="vitdeploy.verify"), \
            open_verified(bad, backend="onnxruntime", allow_drift=True) as rt:
        assert rt.spec.shape == (3, 224, 224)
    assert "running anyway (--allow-drift)" in caplog.text
    r = CliRunner().invoke(main, ["predict", "-m", str(bad), str(tmp_path / "x.png")])
    assert r.exit_code == 1 and "golden image 'synthetic-" in r.output and "--allow-drift" in r.output


def test_a_verdict_cache_nested_deep_is_ignored_and_the_artifact_checked(golden_onnx, tmp_path, caplog):
    """``<stem>.verified.json`` is untrusted: nested 100,000 deep it is ignored with a warning and the artifact
    checked again. Old code: a RecursionError traceback in predict, serve and every first load."""
    path = shutil.copy(golden_onnx, tmp_path / "m.onnx")
    verified_path(path).write_text("[" * 100_000 + "]" * 100_000)
    with caplog.at_level(logging.WARNING), open_verified(path, backend="onnxruntime", threads=1):
        pass
    assert "checked again" in caplog.text
    assert json.loads(verified_path(path).read_text())["entries"]  # the fresh verdict replaced it


def test_weights_swapped_in_external_data_are_checked_again(golden_onnx, tmp_path):
    """An ONNX whose weights are in external data (as a ViT-H's are): the verdict covers the .data file, so
    weights swapped there (the .onnx unchanged, byte for byte) are checked at the next load, and refused.
    Old code: keyed on the .onnx alone, the cached verdict vouched for the swapped weights."""
    import onnx
    from onnx import numpy_helper

    from vitdeploy.errors import VitDeployError
    from vitdeploy.verify import DriftError

    for name, scale in (("good", 1.0), ("bad", 1.5)):
        (tmp_path / name).mkdir()
        model = onnx.load(str(golden_onnx))
        init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)) if len(t.dims) == 2 else 0)
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * scale, init.name))
        onnx.save(model, str(tmp_path / name / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="m.onnx.data", size_threshold=1024)
    path = tmp_path / "good" / "m.onnx"
    assert path.read_bytes() == (tmp_path / "bad" / "m.onnx").read_bytes()
    open_verified(path, backend="onnxruntime", threads=1).close()
    shutil.copy(tmp_path / "bad" / "m.onnx.data", tmp_path / "good" / "m.onnx.data")
    with pytest.raises(DriftError, match="fails its golden set"):
        open_verified(path, backend="onnxruntime", threads=1)
    (tmp_path / "good" / "m.onnx.data").unlink()  # missing: named in one line, not an errno
    with pytest.raises(VitDeployError, match=r"m\.onnx keeps its weights in m\.onnx\.data, which is not beside it"):
        open_verified(path, backend="onnxruntime", threads=1)


def test_a_runtime_with_perturbed_output_fails_the_first_load(golden_onnx, tmp_path):
    """A real ONNX Runtime session behind a wrapper that adds 1e-3 to one logit: the check catches it."""
    from vitdeploy.engines.base import Runtime

    class Perturbed(Runtime):
        backend = "perturbed"

        def __init__(self, inner: Runtime) -> None:
            self.inner, self.spec, self.metadata = inner, inner.spec, inner.metadata

        def _run(self, batch: np.ndarray) -> np.ndarray:
            out = self.inner._run(batch).copy()
            out[:, 0] += 1e-3
            return out

    path = _copy(golden_onnx, tmp_path)
    with open_runtime(path, backend="onnxruntime") as inner:
        assert first_load_check(path, inner).passed
        with pytest.raises(DriftError, match="fails its golden set on perturbed: golden image 'synthetic-0'"):
            first_load_check(path, Perturbed(inner))


def test_a_runtime_computing_in_bf16_is_held_to_the_bf16_tolerance(golden_onnx, tmp_path):
    """OpenVINO's bf16 hint (bench --dtype bf16, or a tune plan's choice) on an FP32 file: tune's bf16 guard
    applies, not FP32's 1e-4, so the path tune chose is not refused; the verdict says which applied."""
    golden = read_onnx_metadata(golden_onnx).golden
    ref = np.stack([im.logits for im in golden.images])
    off = ref * 1.03  # 3% off each logit: bf16-sized, far past FP32's 1e-4
    assert not golden.check(off).passed and golden.check(off, compute="bf16").passed
    assert golden.check(off, compute="bf16").precision == "bf16"
    assert not golden.check(off + 0.2, compute="bf16").passed  # and bf16's tolerance still has a bound
    path = _copy(golden_onnx, tmp_path)
    with open_verified(path, backend="openvino", precision_hint="bf16"):
        pass
    (entry,) = json.loads(verified_path(path).read_text())["entries"]
    assert entry["results"][0]["precision"] == "bf16" and entry["results"][0]["passed"]


def test_cli_predict_verifies_on_first_load_and_no_verify_skips(golden_onnx, images, tmp_path):
    path = _copy(golden_onnx, tmp_path)
    img = str(next(images.rglob("*.png")))
    r = CliRunner().invoke(main, ["predict", "-m", str(path), "--no-verify", img])
    assert r.exit_code == 0, r.output
    assert not verified_path(path).exists()
    r = CliRunner().invoke(main, ["predict", "-m", str(path), img])
    assert r.exit_code == 0, r.output
    assert json.loads(verified_path(path).read_text())["entries"][0]["results"][0]["passed"] is True


# --- build and Triton carry it ------------------------------------------------------------------------------
def test_build_copies_the_golden_set_and_records_not_verified_without_a_gpu(golden_onnx, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX not installed: pip install 'vitdeploy[tensorrt-rtx]'")
    from vitdeploy import sysinfo
    from vitdeploy.engines.tensorrt.sidecar import EngineSidecar

    if sysinfo.cuda_devices():
        pytest.skip("checks the ahead-of-time build on a machine without a GPU")
    src = _copy(golden_onnx, tmp_path)
    r = CliRunner().invoke(main, ["build", str(src), "--trt", "rtx", "--compute-capability", "sm89",
                                  "--max-batch", "4"])
    assert r.exit_code == 0, r.output
    assert "golden set: not verified: no GPU here (in the sidecar)" in r.output
    engine = tmp_path / "m.engine"
    side = EngineSidecar.read(engine)
    assert side.verification["verified"] is False and side.verification["reason"] == "not verified: no GPU here"
    assert side.verification["trt_version"] == side.trt_version
    assert artifact_golden(engine).to_json() == read_onnx_metadata(golden_onnx).golden.to_json()
    r = CliRunner().invoke(main, ["verify", str(engine)])
    assert r.exit_code == 0 and "m.engine: not verified here: no GPU here" in r.output


def test_triton_writes_golden_json_beside_the_model(golden_onnx, tmp_path):
    from vitdeploy.serving.triton import write_triton_repo

    out = write_triton_repo(golden_onnx, tmp_path / "repo", name="m")
    written = GoldenSet.read(out.config.parent / "golden.json")
    assert written.to_json() == read_onnx_metadata(golden_onnx).golden.to_json()


def test_synthetic_images_are_deterministic():
    a = [np.asarray(im) for _, im in synthetic_images(2, (40, 30), seed=0)]
    b = [np.asarray(im) for _, im in synthetic_images(2, (40, 30), seed=0)]
    assert all((x == y).all() for x, y in zip(a, b, strict=True)) and a[0].shape == (40, 30, 3)
    assert not (a[0] == a[1]).all()


def test_write_tensors_gives_the_preprocessed_batch_and_expected_logits(golden_onnx, tmp_path):
    """What a program without an image decoder (the C++ example) checks: the raw batch, run by a plain
    ONNX Runtime session, gives the stored logits and top-1."""
    import onnxruntime as ort

    r = CliRunner().invoke(main, ["verify", str(golden_onnx), "--backend", "onnxruntime",
                                  "--write-tensors", str(tmp_path / "t")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "t" / "golden_tensors.json").read_text())
    assert manifest["input"] == {"file": "golden_input.bin", "dtype": "float32", "shape": [4, 3, 224, 224]}
    x = np.fromfile(tmp_path / "t" / "golden_input.bin", "<f4").reshape(manifest["input"]["shape"])
    expected = np.fromfile(tmp_path / "t" / "golden_logits.bin", "<f4").reshape(manifest["logits"]["shape"])
    out = ort.InferenceSession(str(golden_onnx), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]
    np.testing.assert_allclose(out, expected, atol=1e-4)
    assert manifest["top1"] == list(expected.argmax(1)) and manifest["images"][0] == "synthetic-0"


@pytest.mark.gpu
def test_build_verifies_the_engine_on_a_gpu(golden_onnx, tmp_path):
    """Where the engine runs (a GPU its flavour supports, that TensorRT installed), build verifies it and
    records GPU, driver, TensorRT version and figures; verify and the first load pass on it."""
    import importlib.util

    from vitdeploy import sysinfo
    from vitdeploy.engines.tensorrt.sidecar import EngineSidecar
    from vitdeploy.sysinfo import trt_flavours_for

    gpus = sysinfo.cuda_devices()
    if not gpus:
        pytest.skip("needs an NVIDIA GPU to run an engine")
    runnable = [f for f in trt_flavours_for(gpus[0].compute_capability) if importlib.util.find_spec(f)]
    if not runnable:
        pytest.skip(f"no TensorRT flavour that runs on {gpus[0].describe()} is installed")
    src = _copy(golden_onnx, tmp_path)
    flavour = {"tensorrt": "tensorrt", "tensorrt_rtx": "rtx"}[runnable[0]]
    r = CliRunner().invoke(main, ["build", str(src), "--trt", flavour, "--max-batch", "4"])
    assert r.exit_code == 0, r.output
    engine = tmp_path / "m.engine"
    record = EngineSidecar.read(engine).verification
    assert record["verified"] is True and record["passed"] is True and record["gpu"] == gpus[0].describe()
    assert record["trt_version"] and len(record["rows"]) == 4 and record["driver"]
    assert verify_artifact(engine).passed
    with open_verified(engine) as rt:
        assert rt.where == "cuda"
    assert json.loads(verified_path(engine).read_text())["entries"][0]["key"]["driver"] == record["driver"]


def test_the_triton_python_model_loads_verified_and_refuses_a_drifting_artifact(golden_onnx, tmp_path):
    """In a real tritonserver: the Python-backend model checks its artifact on load (the verdict lands
    beside it); a metadata mean changed after export fails the load with the image and the drift."""
    import os

    pytest.importorskip("tritonclient.http", reason="tritonclient not installed: pip install 'vitdeploy[triton]'")
    from benchmarks import local_triton as harness
    from vitdeploy.errors import VitDeployError
    from vitdeploy.serving import triton as triton_mod

    cache = Path(os.environ.get("VITDEPLOY_TEST_CACHE", Path(__file__).parent.parent / ".cache"))
    try:
        local = harness.prepare_local_triton(cache)
    except VitDeployError as e:
        pytest.skip(f"no local tritonserver: {e}")
    bad = _tamper(golden_onnx, tmp_path / "bad.onnx", mean=0.45)
    repo = tmp_path / "repo"
    for name, artifact in (("good", golden_onnx), ("bad", bad)):
        triton_mod.write_triton_repo(artifact, repo, name=name, triton_backend="python", execution_env=local.env,
                                     runtime_options={"threads": 1})
    server = harness.start_tritonserver(local, repo, models=["good"], log_dir=tmp_path / "good", timeout=120)
    server.stop()
    (entry,) = json.loads((repo / "good" / "1" / "model.verified.json").read_text())["entries"]
    assert entry["results"][0]["passed"] is True
    with pytest.raises(VitDeployError, match=r"(?s)load failed for model 'bad'.*golden image 'synthetic-\d' drifted"):
        harness.start_tritonserver(local, repo, models=["bad"], log_dir=tmp_path / "bad", timeout=120)


def test_warm_up_runs_each_batch_size_once_with_a_golden_image(golden_onnx):
    from vitdeploy.engines.base import Runtime
    from vitdeploy.verify import warm_up

    class Counting(Runtime):
        backend = "counting"

        def __init__(self, inner: Runtime) -> None:
            self.inner, self.spec, self.metadata, self.seen = inner, inner.spec, inner.metadata, []

        def _run(self, batch: np.ndarray) -> np.ndarray:
            self.seen.append(batch.copy())
            return self.inner._run(batch)

    with open_runtime(golden_onnx, backend="onnxruntime") as inner:
        rt = Counting(inner)
        assert sorted(warm_up(rt, (1, 8, 8))) == [1, 8]
        first = rt.preprocess(read_onnx_metadata(golden_onnx).golden.decoded()[:1])
    assert [len(b) for b in rt.seen] == [1, 8] and all((b == first).all() for b in rt.seen)


def test_tune_never_chooses_a_path_that_fails_the_golden_set(golden_onnx, tmp_path):
    """tune's own guard compares paths with each other on random tensors, so a preprocessing drift (the
    metadata's mean changed) passes it; the golden set catches it and no plan is written. (A drift as small
    as mean 0.45 passes the bf16 paths' looser tolerance on this random model: 0.018 x scale, cosine 0.9965.)"""
    from vitdeploy.engines.plan import plan_path
    from vitdeploy.errors import VitDeployError
    from vitdeploy.tune import tune

    bad = _tamper(golden_onnx, tmp_path / "bad.onnx", mean=0.0)
    with pytest.raises(VitDeployError, match=r"no CPU path passed the accuracy guard.*golden set: golden image "
                                             r"'synthetic-\d' drifted"):
        tune(bad, batch=2, threads=[1], iters=3)
    assert not plan_path(bad).exists()


def test_build_records_the_graphs_precision_not_the_metadatas_claim(golden_onnx, tmp_path):
    """An FP32 ONNX whose metadata (and golden set) claim fp8: the engine's sidecar records fp32, read from
    the graph, so the engine's golden check is held to FP32's tolerance."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX not installed: pip install 'vitdeploy[tensorrt-rtx]'")
    import onnx

    from vitdeploy.artifacts.golden import tolerance_for
    from vitdeploy.engines.tensorrt.build import BuildOptions, build_engine
    from vitdeploy.verify import artifact_precision

    claim = _with_golden(golden_onnx, tmp_path / "claim.onnx",
                         lambda d: d.update(precision="fp8", tolerance=tolerance_for("fp8")))
    model = onnx.load(str(claim))
    next(p for p in model.metadata_props if p.key == "vitdeploy.precision").value = "fp8"
    onnx.save(model, str(claim))
    assert read_onnx_metadata(claim).precision == "fp8" and artifact_precision(claim) == "fp32"
    report = build_engine(claim, tmp_path / "claim.engine",
                          BuildOptions(flavour="rtx", compute_capabilities=["sm89"], max_batch=2))
    assert report.precision == "fp32" and artifact_precision(tmp_path / "claim.engine") == "fp32"


@pytest.mark.parametrize("field,value", [("preprocessing", '{"image_size": [224, 224], "mean": [0.5], "std": [0.5], '
                                         '"crop_pct": 0.4}'), ("config", "[" * 100_000 + "]" * 100_000)],
                         ids=["crop_pct", "deep-config"])
def test_malformed_metadata_is_named_never_read_as_no_golden_set(golden_onnx, tmp_path, field, value):
    """Metadata that is there but malformed is named by verify and refused by build before it builds. Old code:
    verify said the artifact "carries no golden set", and build wrote an engine without one (unverified)."""
    import onnx

    model = onnx.load(str(golden_onnx))
    next(p for p in model.metadata_props if p.key == f"vitdeploy.{field}").value = value
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    r = CliRunner().invoke(main, ["verify", str(bad)])
    last = r.output.strip().splitlines()[-1]
    assert r.exit_code == 1 and last.startswith("Error: the artifact's ") and "golden set" not in last, r.output
    if importlib.util.find_spec("tensorrt_rtx") is None:
        return
    from vitdeploy.engines.tensorrt.build import BuildOptions, build_engine
    from vitdeploy.errors import VitDeployError

    with pytest.raises(VitDeployError, match="the artifact's"):
        build_engine(bad, tmp_path / "bad.engine", BuildOptions(flavour="rtx", compute_capabilities=["sm89"]))
    assert not (tmp_path / "bad.engine").exists()
