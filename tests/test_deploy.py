"""`vitdeploy deploy`: a real bundle from the trained digits model (FP32 and INT8 ONNX, TensorRT-RTX engines built
ahead of time where TensorRT-RTX is installed, verification, accuracy, tune, bench, Triton repository, reports),
its resume, and report.html in a real browser (Debian's chromium, headless).

The module's tests share one bundle and run in order: the first deploy (through the CLI), then a rerun that must
redo nothing, then a changed calibration folder that must redo the INT8 artifacts only."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from html import unescape
from html.parser import HTMLParser
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np
import pytest
from click.testing import CliRunner

from vitdeploy.cli import main
from vitdeploy.deploy import STAGES, DeployOptions, deploy
from vitdeploy.deploy.report_html import render

RTX = importlib.util.find_spec("tensorrt_rtx") is not None
FAST = ["--bench-iters", "3", "--bench-warmup", "1", "--tune-iters", "3", "--tune-seconds", "0.02",
        "--calib-samples", "40"]


def _options(calib: Path, data: Path) -> DeployOptions:
    """What the CLI call in the ``bundle`` fixture asks, as options (for the reruns)."""
    return DeployOptions(precisions=("fp32", "int8"), calib_dir=calib, calib_samples=40, data=data,
                         compute_capabilities=("sm89",) if RTX else (), bench_iters=3, bench_warmup=1, tune_iters=3,
                         tune_seconds=0.02)


def _subset(folder: Path, to: Path, per_class: int) -> Path:
    for d in sorted(folder.iterdir()):
        (to / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir())[:per_class]:
            shutil.copy(f, to / d.name / f.name)
    return to


@pytest.fixture(scope="module")
def bundle(digits, tmp_path_factory):
    """The first deploy, through the CLI as a user runs it: 4 training images per digit to calibrate on."""
    root = tmp_path_factory.mktemp("deploy")
    calib, data = _subset(digits["train"], root / "calib", 4), _subset(digits["test"], root / "test", 12)
    out = root / "bundle"
    args = ["deploy", "--model", str(digits["checkpoint"]), "--out", str(out), "--precision", "fp32,int8",
            "--calib-dir", str(calib), "--data", str(data), *FAST]
    if RTX:
        args += ["--compute-capability", "sm89", "--trt", "rtx"]
    t0 = time.perf_counter()
    r = CliRunner().invoke(main, args)
    seconds = time.perf_counter() - t0
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    print(f"\ndeploy on the digits model: {seconds:.1f} s; report.html {(out / 'report.html').stat().st_size} bytes; "
          + ", ".join(f"{s['name']} {s['seconds']:.1f} s" for s in report["stages"]))
    return SimpleNamespace(out=out, calib=calib, data=data, checkpoint=digits["checkpoint"],
                           stdout=r.stdout, report=report, seconds=seconds)


def _rows(report: dict) -> dict[str, dict]:
    return {r["artifact"]: r for r in report["rows"]}


def _torch_accuracy(checkpoint: Path, data: Path) -> float:
    """The reference: our torch model on the same images, preprocessed by the checkpoint's own config."""
    import torch

    from vitdeploy import load_model
    from vitdeploy.preprocess import Preprocessing, labelled_images, load_images

    model = load_model(checkpoint)
    files, classes = labelled_images(data)
    x = load_images(files, Preprocessing.from_config(model.config))
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).numpy().argmax(-1)
    return float(np.mean(pred == np.array([int(c) for c in classes])))


def test_bundle_holds_every_artifact_verified_measured_and_served(bundle):
    rows = _rows(bundle.report)
    onnx = {"onnx/digits_vit-fp32.onnx", "onnx/digits_vit-int8.onnx"}
    engines = {"engines/digits_vit-fp32-rtx.engine", "engines/digits_vit-int8-rtx.engine"} if RTX else set()
    assert set(rows) == onnx | engines
    assert [s["name"] for s in bundle.report["stages"]] == [s.name for s in STAGES] == [
        "export", "build", "verify", "accuracy", "tune", "bench", "triton", "report"]
    for name in onnx:
        r = rows[name]
        assert r["verdict"] == "passed", r
        assert "golden set: passed" in r["verdict_detail"]
        assert set(r["latency_ms"]) == {"1", "8"} and all(v > 0 for v in r["latency_ms"].values())
        plan = json.loads((bundle.out / name).with_suffix(".tune.json").read_text())
        assert plan["latency"]["backend"] in r["paths"]["1"] and plan["throughput"]["backend"] in r["paths"]["8"]
        assert (bundle.out / "triton" / Path(name).stem / "config.pbtxt").is_file()
        assert 'platform: "onnxruntime_onnx"' in (bundle.out / "triton" / Path(name).stem / "config.pbtxt").read_text()
    # accuracy: the FP32 file agrees with torch on the same images; INT8 stays close
    reference = _torch_accuracy(bundle.checkpoint, bundle.data)
    assert reference > 0.85
    assert abs(rows["onnx/digits_vit-fp32.onnx"]["accuracy"] - reference) < 0.005
    assert rows["onnx/digits_vit-int8.onnx"]["accuracy"] > reference - 0.05
    for name in engines:  # built ahead of time here; no GPU to run them, and the report says so
        r = rows[name]
        assert (bundle.out / name).stat().st_size > 0 and r["targets"] == ["sm89"]
        assert r["verdict"] == "not verified here" and "no GPU" in r["verdict_detail"]
        assert r["latency_ms"] == {} and "no GPU" in r["bench_note"]
        assert (bundle.out / "triton" / Path(name).stem / "config.pbtxt").is_file()
    if not RTX:
        assert bundle.report["units"]["build:engines"]["status"] == "not possible"


def test_summary_ends_with_the_bundle_and_the_fastest_verified_path(bundle):
    lines = bundle.stdout.strip().splitlines()
    passed = [r for r in bundle.report["rows"] if r["verdict"] == "passed"]
    best = min(passed, key=lambda r: r["latency_ms"]["1"])
    assert lines[-2].startswith(f"bundle: {bundle.out} (report.html")
    assert lines[-1].startswith(f"fastest verified path here: {best['artifact']} on {best['paths']['1']}: "
                                f"{best['latency_ms']['1']:.2f} ms at batch 1")


def test_row_commands_reproduce_the_row(bundle, tmp_path):
    """The FP32 row's export command, run as written (output elsewhere), writes the same bytes."""
    row = _rows(bundle.report)["onnx/digits_vit-fp32.onnx"]
    argv = shlex.split(row["commands"][0])
    assert argv[:2] == ["vitdeploy", "export"]
    argv[argv.index("--output") + 1] = str(tmp_path / "again.onnx")
    r = CliRunner().invoke(main, argv[1:])
    assert r.exit_code == 0, r.output
    again, original = tmp_path / "again.onnx", bundle.out / row["artifact"]
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(original.read_bytes()).digest()
    # its Triton command writes the same model configuration
    argv = shlex.split(row["commands"][-1])
    assert argv[:2] == ["vitdeploy", "triton"]
    argv[argv.index("--repo") + 1] = str(tmp_path / "repo")
    r = CliRunner().invoke(main, argv[1:])
    assert r.exit_code == 0, r.output
    config = "digits_vit-fp32/config.pbtxt"
    assert (tmp_path / "repo" / config).read_text() == (bundle.out / "triton" / config).read_text()
    # every command of every row, and the deploy command, is one the CLI takes as written
    for command in [bundle.report["command"], *(c for r in bundle.report["rows"] for c in r["commands"])]:
        argv = shlex.split(command)
        sub = main.get_command(click.Context(main), argv[1])
        assert sub is not None, command
        sub.make_context(argv[1], argv[2:])  # raises on an unknown option or a bad value
    int8 = _rows(bundle.report)["onnx/digits_vit-int8.onnx"]["commands"][0]
    assert f"--calib-dir {bundle.calib}" in int8 and "--calib-samples 40" in int8


def _statuses(report: dict) -> dict[str, str]:
    return {k: u["status"] for k, u in report["units"].items()}


def test_second_run_redoes_nothing(bundle):
    """The report's own deploy command, run again as written: every unit is skipped, the figures reused."""
    argv = shlex.split(bundle.report["command"])
    t0 = time.perf_counter()
    r = CliRunner().invoke(main, argv[1:])
    seconds = time.perf_counter() - t0
    assert r.exit_code == 0, r.output
    report = json.loads((bundle.out / "report.json").read_text())
    statuses = _statuses(report)
    assert set(statuses) == set(_statuses(bundle.report))
    assert all(s in ("skipped", "not possible") for s in statuses.values()), statuses
    assert sum(s == "skipped" for s in statuses.values()) >= 12
    for stage in report["stages"][:-1]:
        assert stage.get("done", 0) == stage.get("failed", 0) == 0, stage
    assert "export   digits_vit-int8.onnx: skipped" in r.stdout
    assert _rows(report)["onnx/digits_vit-fp32.onnx"]["latency_ms"] == \
        _rows(bundle.report)["onnx/digits_vit-fp32.onnx"]["latency_ms"]
    assert seconds < bundle.seconds / 3, (seconds, bundle.seconds)


def test_an_interrupted_run_keeps_the_units_it_finished(bundle, monkeypatch):
    """Ctrl-C during bench: the FP32 tune redone before it (its plan was deleted) is not redone next time."""
    import vitdeploy.bench

    (bundle.out / "onnx/digits_vit-fp32.tune.json").unlink()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(vitdeploy.bench, "measure", interrupted)
        with pytest.raises(KeyboardInterrupt):
            deploy(bundle.checkpoint, bundle.out, _options(bundle.calib, bundle.data))
    manifest = json.loads((bundle.out / "manifest.json").read_text())["units"]
    assert manifest["tune:digits_vit-fp32.onnx"]["status"] == "done"
    statuses = _statuses(deploy(bundle.checkpoint, bundle.out, _options(bundle.calib, bundle.data)).report)
    assert statuses["tune:digits_vit-fp32.onnx"] == "skipped"
    assert statuses["bench:digits_vit-fp32.onnx"] == "done"  # its input, the plan, changed
    assert statuses["export:digits_vit-fp32.onnx"] == statuses["bench:digits_vit-int8.onnx"] == "skipped"


def test_changed_calibration_folder_redoes_the_int8_artifacts_only(bundle):
    for d in bundle.calib.iterdir():  # one image fewer per digit: other calibration data, other golden images
        sorted(d.iterdir())[0].unlink()
    before = (bundle.out / "onnx/digits_vit-int8.onnx").read_bytes()
    result = deploy(bundle.checkpoint, bundle.out, _options(bundle.calib, bundle.data))
    statuses = _statuses(result.report)
    assert statuses["export:digits_vit-int8.onnx"] == "done"
    assert (bundle.out / "onnx/digits_vit-int8.onnx").read_bytes() != before
    for uid, status in statuses.items():
        if "int8" in uid:
            assert status in ("done", "not possible"), (uid, status)
        elif uid != "build:engines":
            assert status in ("skipped", "not possible"), (uid, status)
    assert _rows(result.report)["onnx/digits_vit-int8.onnx"]["verdict"] == "passed"


# --- report.html ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium; a skip where it is not installed, a failure where VITDEPLOY_REQUIRE names it."""
    path = shutil.which("chromium")
    if path is None:
        reason = "chromium is not installed (apt-get install -y chromium)"
        if "chromium" in os.environ.get("VITDEPLOY_REQUIRE", ""):  # CI: a skip is not a pass
            pytest.fail(f"{reason}, and VITDEPLOY_REQUIRE names chromium")
        pytest.skip(reason)
    return path


def _headless(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


class _Page(HTMLParser):
    """The artifact rows and the images of a dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.body: dict[str, str | None] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and a.get("class") == "artifact-row":
            self.rows.append(a["data-artifact"] or "")
        elif tag == "img":
            self.images.append(a)
        elif tag == "body":
            self.body = a


def test_report_html_in_a_real_browser(chromium, bundle, tmp_path):
    from PIL import Image

    html = bundle.out / "report.html"
    text = html.read_text()
    report = json.loads((bundle.out / "report.json").read_text())  # the last run's, as the page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)  # nothing from the network
    assert "Content-Security-Policy" in text and "default-src 'none'" in unescape(text)
    shot = tmp_path / "report.png"
    _headless(chromium, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000", html.as_uri())
    image = Image.open(shot)
    assert image.size == (1280, 2000)
    pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.std() > 10  # a page, not a blank
    keep = os.environ.get("VITDEPLOY_SCREENSHOT")  # CI: where to keep the screenshot for the record
    if keep:
        Path(keep).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, keep)
    print(f"\nscreenshot {keep or shot} ({shot.stat().st_size} bytes)")

    run = _headless(chromium, tmp_path / "profile2", "--virtual-time-budget=5000", "--enable-logging=stderr", "--v=0",
                    "--dump-dom", html.as_uri())
    page = _Page()
    page.feed(run.stdout)
    assert page.body.get("data-loaded") == "yes"  # the inline script ran after load
    # under the CSP (its one script by hash): the console names any script it refused (an injected one does)
    assert "Content Security Policy" not in run.stderr, run.stderr
    assert page.rows == [r["artifact"] for r in report["rows"]]
    golden = [im for g in report["golden"] for im in g["images"]]
    assert len(page.images) == len(golden) >= 8  # FP32's synthetic set and INT8's from the calibration images
    for img in page.images:
        png = base64.b64decode(str(img["src"]).split(",", 1)[1])
        width, height = Image.open(BytesIO(png)).size
        assert (img.get("data-natural-width"), img.get("data-natural-height")) == (str(width), str(height)), img["alt"]
    for im in golden:  # each image with the reference's top-5 under it
        top5 = "".join(f'<li>{t["label"]} <span class="muted">{t["probability"] * 100:.1f}%</span></li>'
                       for t in im["top5"])
        assert f"<figcaption>{im['name']}<ol>{top5}</ol></figcaption>" in text


def test_report_html_escapes_every_text(bundle):
    hostile = '<script>alert("x")</script>&<img src=x onerror=alert(1)>'
    report = {**bundle.report, "source": hostile, "command": hostile,
              "rows": [{**r, "verdict_detail": hostile, "commands": [hostile]} for r in bundle.report["rows"]],
              "golden": [{**g, "source": hostile, "images": []} for g in bundle.report["golden"]]}
    page = render(report)
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in page


def test_report_html_csp_allows_only_its_own_script_by_hash(bundle):
    """script-src names the page's one inline script by its SHA-256 (as a browser computes it over the
    script's text), with no 'unsafe-inline': an injected script or event handler would not run."""
    page = (bundle.out / "report.html").read_text()
    csp = unescape(re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page)[1])
    directives = {d.split()[0]: d.split()[1:] for d in csp.split(";") if d.strip()}
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert len(scripts) == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert directives["script-src"] == [f"'sha256-{digest}'"]
    assert "'unsafe-inline'" not in directives["script-src"] and "'unsafe-eval'" not in csp
    assert directives["default-src"] == ["'none'"]


def test_report_html_of_a_bundle_with_nothing_measured(bundle):
    """No row benchmarked or evaluated, no golden set: the page still renders, saying so."""
    report = {**bundle.report, "rows": [{**r, "latency_ms": {}, "throughput": {}, "paths": {}, "accuracy": None}
                                        for r in bundle.report["rows"]], "golden": [], "fastest": None}
    page = render(report)
    assert "nothing measured" in page and "no accuracy measured (give --data DIR)" in page
    assert "No artifact was both verified and benchmarked on this machine." in page
    assert page.count('class="artifact-row"') == len(report["rows"]) and "<img" not in page


def test_deploy_refuses_bad_options_in_one_line(tmp_path):
    for args, words in ((["--precision", "int8"], "needs --calib-dir"), (["--precision", "fp7"], "choose from fp32"),
                        (["--compute-capability", "sm90", "--trt", "rtx"], "sm90" if RTX else "no TensorRT")):
        r = CliRunner().invoke(main, ["deploy", "--model", "vit-tiny-patch16-224", "--out", str(tmp_path / "b"), *args])
        assert r.exit_code == 1 and words in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "b").exists()
    r = CliRunner().invoke(main, ["deploy", "--model", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "b"),
                                  "--precision", "fp32"])
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1] == (
        f"Error: no ONNX exported, nothing to deploy: checkpoint {tmp_path / 'none.safetensors'} does not exist")


def test_triton_stage_without_tritonclient_is_not_possible_not_failed(monkeypatch, tmp_path):
    """The Triton repository needs tritonclient (config.pbtxt goes through Triton's schema): without it the
    unit is 'not possible' with the install line, and the deploy does not fail for it."""
    import importlib.util

    from vitdeploy.deploy import stages

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tritonclient" else real(name, *a))
    with pytest.raises(stages.NotPossible, match=r"pip install 'vitdeploy\[triton\]'"):
        stages._triton(None, None, "m", {})


# --- issue 29: the resume key covers every file a source reads; no writes through links ---------------------
def _source_key(source: str, out: Path, **options) -> dict:
    from vitdeploy.deploy.bundle import Bundle, source_key

    return source_key(Bundle(source, out, DeployOptions(**options), {}, lambda _m: None))


def test_resume_key_covers_the_config_beside_bare_weights(hf_folders, tmp_path):
    """Bare HF weights take config.json from beside them: a changed id2label or image_mean there changes the
    key (so the export is redone, not skipped with the old labels and mean); a given --config replaces it."""
    folder = tmp_path / "w"
    folder.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copy(hf_folders["p16-w48"] / name, folder / name)
    weights = str(folder / "model.safetensors")
    before = _source_key(weights, tmp_path / "out")
    assert before == _source_key(weights, tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {str(i): f"changed-{i}" for i in range(len(config["id2label"]))}
    config["image_mean"] = [0.1, 0.2, 0.3]
    (folder / "config.json").write_text(json.dumps(config))
    assert _source_key(weights, tmp_path / "out") != before
    given = tmp_path / "given.json"
    shutil.copy(folder / "config.json", given)
    keyed = _source_key(weights, tmp_path / "out", config=str(given))
    (folder / "config.json").write_text("{}")  # not read when --config is given
    assert _source_key(weights, tmp_path / "out", config=str(given)) == keyed


def test_resume_key_of_a_hub_id_is_its_resolved_snapshot(hf_folders, tmp_path, monkeypatch):
    """refs/main moved to a new revision in the local cache: the key changes with the snapshot's commit and
    files (the old key was the name only, and the export was skipped with the old weights)."""
    from tests.test_checkpoints import _populate_hub_cache

    cache = tmp_path / "hub"
    src = hf_folders["p16-w48"]
    files = {n: (src / n).read_bytes() for n in ("config.json", "model.safetensors")}
    _populate_hub_cache(cache, "org/tiny-vit", files)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _source_key("org/tiny-vit", tmp_path / "out")
    repo = cache / "models--org--tiny-vit"
    new = repo / "snapshots" / ("1" * 40)
    shutil.copytree(repo / "snapshots" / ("0" * 40), new)
    (repo / "refs" / "main").write_text("1" * 40)
    after = _source_key("org/tiny-vit", tmp_path / "out")
    assert after != before
    assert before.get("revision") == "0" * 40 and after["revision"] == "1" * 40 and before["files"] is not None
    (new / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    assert _source_key("org/tiny-vit", tmp_path / "out")["files"] != before["files"]


@pytest.mark.parametrize("part", ["onnx", "engines", "triton", "report.html", "onnx/m.onnx"])
def test_deploy_refuses_a_symlinked_part_of_the_bundle(tiny_checkpoint, tmp_path, part):
    """A bundle part (or a file in one) that is a symbolic link would take deploy's writes, and its cleaning
    of stale files, outside --out: one line, exit 1, nothing written there."""
    out, elsewhere = tmp_path / "bundle", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.data").write_bytes(b"not the bundle's")
    target = elsewhere if "." not in part else elsewhere / "keep.data"
    (out / part).parent.mkdir(parents=True, exist_ok=True)
    (out / part).symlink_to(target)
    r = CliRunner().invoke(main, ["deploy", "--model", str(tiny_checkpoint), "--out", str(out), "--precision", "fp32",
                                  *FAST])
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "is a symbolic link" in lines[0] and str(out / part) in lines[0], r.output
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.data"]
    assert (elsewhere / "keep.data").read_bytes() == b"not the bundle's"


def test_a_manifest_nested_deep_is_ignored(tmp_path, caplog):
    """manifest.json is read back on a rerun: nested 100,000 deep it is ignored (every stage runs again), not a
    RecursionError traceback."""
    import logging

    from vitdeploy.deploy.bundle import read_previous

    manifest = tmp_path / "manifest.json"
    manifest.write_text("[" * 100_000 + "]" * 100_000)
    with caplog.at_level(logging.WARNING):
        assert read_previous(manifest) == {}
    assert "every stage runs again" in caplog.text
