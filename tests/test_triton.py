"""Triton: repositories written by `vitdeploy triton`, loaded and served by a real tritonserver.

The server is the one in NVIDIA's nvidia-pytriton wheel (unpacked, with a numpy<2 serving venv for the
Python backend; both cached under the test cache dir). Only its Python backend is in the wheel, so the
native onnxruntime_onnx / tensorrt_plan configs are checked against Triton's ModelConfig schema, and the
Python-backend repository is checked by serving it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from benchmarks import local_triton as harness
from vitdeploy.cli import main
from vitdeploy.engines import open_runtime
from vitdeploy.errors import VitDeployError
from vitdeploy.io import free_port
from vitdeploy.serving import triton as triton_mod

CACHE = Path(os.environ.get("VITDEPLOY_TEST_CACHE", Path(__file__).parent.parent / ".cache"))
SHAPE = (3, 64, 64)

pytest.importorskip("tritonclient.http", reason="tritonclient not installed: pip install 'vitdeploy[triton]'")


def _parse_pbtxt(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _pixels(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE)).astype(np.float32)


@pytest.fixture(scope="module")
def small_onnx(hf_folders, tmp_path_factory) -> dict[str, Path]:
    """A small ViT (64x64 input) exported with a dynamic batch, a static batch of 2, and uint8 NHWC input."""
    from vitdeploy.exporters import ExportOptions, export_onnx

    root = tmp_path_factory.mktemp("triton_onnx")
    return {"dynamic": export_onnx(hf_folders["p16-w48"], root / "small.onnx",
                                   options=ExportOptions(dynamic_batch=True)).path,
            "b2": export_onnx(hf_folders["p16-w48"], root / "small-b2.onnx", options=ExportOptions(batch=2)).path,
            "uint8": export_onnx(hf_folders["p16-w48"], root / "small-u8.onnx",
                                 options=ExportOptions(dynamic_batch=True, uint8_input=True)).path}


@pytest.fixture(scope="module")
def reference(small_onnx):
    with open_runtime(small_onnx["dynamic"]) as rt:
        yield rt


@pytest.fixture(scope="session")
def local_triton() -> harness.LocalTriton:
    try:
        return harness.prepare_local_triton(CACHE)
    except VitDeployError as e:
        if "triton" in os.environ.get("VITDEPLOY_REQUIRE", ""):  # CI: a skip is not a pass
            pytest.fail(f"no local tritonserver, and VITDEPLOY_REQUIRE names triton: {e}")
        pytest.skip(f"no local tritonserver: {e}")


@pytest.fixture(scope="module")
def triton_server(local_triton, small_onnx, tmp_path_factory):
    """tritonserver on loopback ports, serving two Python-backend models written by `vitdeploy triton`."""
    repo = tmp_path_factory.mktemp("triton") / "repo"
    for name, onnx in (("small", small_onnx["dynamic"]), ("small_b2", small_onnx["b2"]),
                       ("small_u8", small_onnx["uint8"])):
        r = CliRunner().invoke(main, ["triton", str(onnx), "--repo", str(repo), "--name", name,
                                      "--triton-backend", "python",
                                      "--execution-env", str(local_triton.env), "--max-batch", "16",
                                      "--max-queue-delay-us", "2000", "--threads", "1"])
        assert r.exit_code == 0, r.output
    server = harness.start_tritonserver(local_triton, repo, log_dir=repo.parent)
    yield server
    server.stop()
    assert server.process.returncode is not None


def _http_infer(url: str, model: str, x: np.ndarray, binary: bool = True) -> np.ndarray:
    """The one client function: tritonclient.http, KServe v2 protocol. Runs unchanged against Triton and
    against `vitdeploy serve`."""
    import tritonclient.http as th

    with th.InferenceServerClient(url) as client:
        meta = client.get_model_metadata(model)
        inp = th.InferInput(meta["inputs"][0]["name"], list(x.shape), meta["inputs"][0]["datatype"])
        inp.set_data_from_numpy(x, binary_data=binary)
        out = th.InferRequestedOutput(meta["outputs"][0]["name"], binary_data=binary)
        return client.infer(model, [inp], outputs=[out]).as_numpy(meta["outputs"][0]["name"])


def _grpc_infer(url: str, model: str, x: np.ndarray) -> np.ndarray:
    import tritonclient.grpc as tg

    with tg.InferenceServerClient(url) as client:
        inp = tg.InferInput("pixel_values", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer(model, [inp]).as_numpy("logits")


# -- the repository (the native onnxruntime_onnx config: tests/test_serving.py) -------------------------
def test_python_backend_config(small_onnx, tmp_path):
    env = tmp_path / "venv"
    env.mkdir()
    r = CliRunner().invoke(main, ["triton", str(small_onnx["b2"]), "--repo", str(tmp_path / "repo"), "--name", "m",
                                  "--triton-backend", "python", "--execution-env", str(env), "--backend", "onnxruntime",
                                  "--instances", "3", "--threads", "2"])
    assert r.exit_code == 0, r.output
    out = triton_mod.TritonRepo(tmp_path / "repo" / "m", tmp_path / "repo" / "m" / "config.pbtxt", Path(), None)
    cfg = _parse_pbtxt(out.config)
    assert cfg.backend == "python" and not cfg.platform
    # the Runtime splits and pads to the static batch of 2, so Triton batches freely
    assert cfg.max_batch_size == 32 and list(cfg.input[0].dims) == list(SHAPE)
    assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_CPU and cfg.instance_group[0].count == 3
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params == {"VITDEPLOY_ARTIFACT": "model.onnx", "VITDEPLOY_BACKEND": "onnxruntime",
                      "VITDEPLOY_OPTIONS": '{"threads": 2}', "EXECUTION_ENV_PATH": str(env.resolve())}
    assert (out.model_dir / "1" / "model.py").read_text() == Path(triton_mod.__file__).with_name(
        "triton_model.py").read_text()
    assert sorted(p.name for p in out.model_dir.rglob("*")) == ["1", "config.pbtxt", "golden.json", "golden_input",
                                                                "labels.txt", "model.onnx", "model.py", "warmup"]
    # Triton warms the smallest and largest batch with the golden set's first image, preprocessed
    assert [(w.batch_size, w.inputs["pixel_values"].input_data_file) for w in cfg.model_warmup] == [
        (1, "golden_input"), (32, "golden_input")]
    assert (out.model_dir / "warmup" / "golden_input").stat().st_size == 4 * int(np.prod(SHAPE))


@pytest.mark.parametrize("args, message", [
    (["--execution-env", "{env}"], "are for a Python-backend model: add --triton-backend python"),
    (["--threads", "2"], "are for a Python-backend model: add --triton-backend python"),
    (["--triton-backend", "python", "--backend", "tensorrt"], "--backend tensorrt runs engine files"),
    (["--triton-backend", "python", "--execution-env", "{missing}"], "does not exist"),
    (["--name", "a/b"], "--name 'a/b'"),
])
def test_bad_options_one_line_error(small_onnx, tmp_path, args, message):
    args = [a.format(env=tmp_path, missing=tmp_path / "nope") for a in args]
    r = CliRunner().invoke(main, ["triton", str(small_onnx["dynamic"]), "--repo", str(tmp_path / "r"), *args])
    assert r.exit_code != 0 and message in r.output, r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_rtx_engine_is_refused_as_tensorrt_plan_and_served_by_python_backend(small_onnx, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX not installed: pip install 'vitdeploy[tensorrt-rtx]'")
    from vitdeploy.engines.tensorrt.build import BuildOptions, build_engine

    engine = tmp_path / "small.engine"
    build_engine(small_onnx["dynamic"], engine, BuildOptions(flavour="rtx", compute_capabilities=["sm89"],
                                                             max_batch=8))
    r = CliRunner().invoke(main, ["triton", str(engine), "--repo", str(tmp_path / "repo")])
    assert r.exit_code == 1
    assert "TensorRT-RTX engine" in r.output and "cannot load it" in r.output and "--triton-backend python" in r.output
    assert not (tmp_path / "repo" / "small").exists()

    out = triton_mod.write_triton_repo(engine, tmp_path / "repo", triton_backend="python")
    cfg = _parse_pbtxt(out.config)
    assert cfg.backend == "python" and cfg.max_batch_size == 8
    assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_GPU
    assert {k: v.string_value for k, v in cfg.parameters.items()}["VITDEPLOY_ARTIFACT"] == "model.engine"
    from vitdeploy.engines.tensorrt.sidecar import EngineSidecar

    side = EngineSidecar.read(out.model_file)  # the sidecar travels with the engine and still matches it
    assert side.flavour == "tensorrt_rtx"


def test_gpu_instances_each_get_their_own_device(monkeypatch):
    import types

    # the model file imports Triton's backend utilities, which exist only inside Triton's stub
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    from vitdeploy.serving.triton_model import visible_device

    assert visible_device("GPU", "1", None) == "1"
    assert visible_device("GPU", 1, "4,6") == "6"  # the host already narrowed the visible GPUs
    assert visible_device("GPU", "0", "GPU-5f2c") == "GPU-5f2c"
    assert visible_device("CPU", "0", "3") is None


def test_failed_write_leaves_the_old_model(small_onnx, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    first = triton_mod.write_triton_repo(small_onnx["dynamic"], repo, name="m")
    before = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    real_copy = shutil.copyfile

    def failing_copy(src, dst, *a, **k):
        if Path(dst).name == "model.py":
            raise OSError(28, "No space left on device")
        return real_copy(src, dst, *a, **k)

    monkeypatch.setattr(triton_mod.shutil, "copyfile", failing_copy)
    with pytest.raises(OSError, match="No space left"):
        triton_mod.write_triton_repo(small_onnx["b2"], repo, name="m", triton_backend="python")
    after = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    assert after == before and first.config.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no staging folder left behind
    monkeypatch.undo()
    second = triton_mod.write_triton_repo(small_onnx["b2"], repo, name="m", triton_backend="python")
    assert _parse_pbtxt(second.config).backend == "python"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


# -- a real tritonserver -----------------------------------------------------------------------------------
def test_grpc_and_http_answers_equal_vitdeploy(triton_server, reference):
    for n, seed in ((1, 0), (3, 1), (16, 2)):
        x = _pixels(seed, n)
        want = reference.infer(x)
        np.testing.assert_allclose(_grpc_infer(triton_server.grpc_url, "small", x), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(_http_infer(triton_server.http_url, "small", x), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(_http_infer(triton_server.http_url, "small", x, binary=False), want,
                                   rtol=1e-5, atol=1e-5)


def test_static_batch_artifact_batches_freely_in_triton(triton_server, reference):
    x = _pixels(3, 5)  # 5 rows on a static batch of 2: the Runtime splits and pads inside the model
    np.testing.assert_allclose(_grpc_infer(triton_server.grpc_url, "small_b2", x), reference.infer(x),
                               rtol=1e-5, atol=1e-5)


def test_uint8_input_model_takes_pixels(triton_server, small_onnx, tmp_path):
    import tritonclient.grpc as tg
    from tritonclient.grpc import model_config_pb2

    cfg = _parse_pbtxt(triton_server.repo / "small_u8" / "config.pbtxt")
    assert model_config_pb2.DataType.Name(cfg.input[0].data_type) == "TYPE_UINT8"
    assert list(cfg.input[0].dims) == [64, 64, 3]
    pixels = np.random.default_rng(9).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    with tg.InferenceServerClient(triton_server.grpc_url) as client:
        inp = tg.InferInput(cfg.input[0].name, list(pixels.shape), "UINT8")
        inp.set_data_from_numpy(pixels)
        got = client.infer("small_u8", [inp]).as_numpy(cfg.output[0].name)
    with open_runtime(small_onnx["uint8"]) as rt:
        np.testing.assert_allclose(got, rt.infer(pixels), rtol=1e-5, atol=1e-5)


def test_labels_travel_with_the_model(triton_server, small_onnx):
    import tritonclient.http as th

    with th.InferenceServerClient(triton_server.http_url) as client:
        inp = th.InferInput("pixel_values", [1, *SHAPE], "FP32")
        inp.set_data_from_numpy(_pixels(4, 1))
        res = client.infer("small", [inp], outputs=[th.InferRequestedOutput("logits", class_count=2)])
    with open_runtime(small_onnx["dynamic"]) as rt:
        labels = rt.labels
        top = np.argsort(-rt.infer(_pixels(4, 1))[0])[:2]
    got = [s.decode().split(":") for s in res.as_numpy("logits")[0]]
    assert [int(g[1]) for g in got] == list(top)
    assert [g[2] for g in got] == [labels[i] for i in top]


def test_concurrent_clients_get_their_own_rows_and_triton_batches(triton_server, reference):
    before = triton_server.metrics()
    clients, per_client = 12, 6

    def client(c: int) -> int:
        bad = 0
        for k in range(per_client):
            x = _pixels(1000 + c * per_client + k, 1 + (c + k) % 3)
            infer = _grpc_infer if (c + k) % 2 else _http_infer
            url = triton_server.grpc_url if (c + k) % 2 else triton_server.http_url
            got = infer(url, "small", x)
            bad += not np.allclose(got, reference.infer(x), rtol=1e-5, atol=1e-5)
        return bad

    with ThreadPoolExecutor(clients) as pool:
        assert sum(pool.map(client, range(clients))) == 0
    after = triton_server.metrics()

    def delta(metric: str) -> float:
        key = f'{metric}{{model="small",version="1"}}'
        return after[key] - before.get(key, 0.0)

    requests = clients * per_client
    rows = sum(1 + (c + k) % 3 for c in range(clients) for k in range(per_client))
    assert delta("nv_inference_request_success") == requests
    assert delta("nv_inference_count") == rows
    # Triton's dynamic batcher put several requests into one execute(): fewer executions than requests
    assert 0 < delta("nv_inference_exec_count") < requests


def test_bad_input_gets_triton_error_and_model_keeps_serving(triton_server, reference):
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    def send(x: np.ndarray, datatype: str = "FP32"):
        with th.InferenceServerClient(triton_server.http_url) as client:  # one per thread: not thread-safe
            inp = th.InferInput("pixel_values", list(x.shape), datatype)
            inp.set_data_from_numpy(x)
            return client.infer("small", [inp])

    with pytest.raises(InferenceServerException, match="unexpected shape for input 'pixel_values'"):
        send(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(InferenceServerException, match="FP64"):
        send(np.zeros((1, *SHAPE)), "FP64")
    with pytest.raises(InferenceServerException, match="batch-size must be <= 16"):
        send(_pixels(5, 17))
    nan = _pixels(6, 2)
    nan[1, 0, 0, 0] = np.nan
    with pytest.raises(InferenceServerException, match="NaN or infinite") as e:  # the model's own error
        send(nan)
    assert e.value.status() == "400"

    # good and bad requests batched together: each gets its own answer or its own error
    def one(i: int):
        x = nan if i % 3 == 0 else _pixels(100 + i, 1)
        try:
            return ("ok", np.allclose(send(x).as_numpy("logits"), reference.infer(x), rtol=1e-5, atol=1e-5))
        except InferenceServerException as err:
            return ("error", i % 3 == 0 and "NaN" in err.message())

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(24)))
    assert all(ok for _, ok in results)
    assert [kind for kind, _ in results] == ["error" if i % 3 == 0 else "ok" for i in range(24)]
    with th.InferenceServerClient(triton_server.http_url) as client:
        assert client.is_model_ready("small")
    assert triton_server.process.poll() is None
    x = _pixels(7, 2)
    np.testing.assert_allclose(_grpc_infer(triton_server.grpc_url, "small", x), reference.infer(x),
                               rtol=1e-5, atol=1e-5)


def test_model_control_unloads_and_reloads(triton_server, reference):
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    x = _pixels(8, 2)
    with tg.InferenceServerClient(triton_server.grpc_url) as client:
        index = {m.name: m.state for m in client.get_model_repository_index().models}
        assert index == {"small": "READY", "small_b2": "READY", "small_u8": "READY"}
        client.unload_model("small_b2")
        deadline = time.monotonic() + 30
        while client.is_model_ready("small_b2") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not client.is_model_ready("small_b2")
        with pytest.raises(InferenceServerException, match="no available versions"):
            _grpc_infer(triton_server.grpc_url, "small_b2", x)
        assert client.is_model_ready("small")  # the other model is untouched
        client.load_model("small_b2")
        assert client.is_model_ready("small_b2")
    np.testing.assert_allclose(_grpc_infer(triton_server.grpc_url, "small_b2", x), reference.infer(x),
                               rtol=1e-5, atol=1e-5)


def test_a_model_that_cannot_load_stops_the_start_with_its_reason(local_triton, small_onnx, tmp_path):
    out = triton_mod.write_triton_repo(small_onnx["dynamic"], tmp_path / "repo", name="broken", triton_backend="python",
                                       execution_env=local_triton.env)
    out.model_file.write_bytes(b"not an onnx file")  # a torn copy on the serving host
    started = time.monotonic()
    with pytest.raises(VitDeployError, match=r"(?s)tritonserver did not become ready.*load failed for model 'broken'"):
        harness.start_tritonserver(local_triton, tmp_path / "repo", log_dir=tmp_path, timeout=60)
    assert time.monotonic() - started < 60  # it exits on the error; nothing waits for the timeout


def test_repository_on_a_mount_point_and_a_killed_writers_staging(local_triton, small_onnx, tmp_path, monkeypatch):
    """`--repo MOUNTPOINT`: the model folder is staged inside the repository (a rename across file systems
    fails). Triton does NOT skip hidden folders: a Triton loading every folder (--model-control-mode none,
    what a plain `tritonserver --model-repository` does) refuses to start beside a killed writer's staging
    folder. So the next write removes such folders of dead writers, and that Triton then starts and serves."""
    import socket

    from tests.test_hostile_files import as_mount_point

    repo = tmp_path / "repo"
    repo.mkdir()
    with monkeypatch.context() as m:
        as_mount_point(m, repo)
        out = triton_mod.write_triton_repo(small_onnx["dynamic"], repo, name="small", triton_backend="python",
                                           execution_env=local_triton.env, runtime_options={"threads": 1})
    assert sorted(p.name for p in repo.iterdir()) == ["small"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname().replace(".", "_")
    leftover = repo / f".vitdeploy-staging-small.{host}.{dead.pid}.x1y2"  # what a writer killed mid-copy leaves
    shutil.copytree(out.model_dir, leftover)
    (leftover / "1" / "model.onnx").write_bytes(b"half a file")
    every_folder = ["--model-control-mode", "none"]
    with pytest.raises(VitDeployError, match=r"(?s)Poll failed for model directory '\.vitdeploy-staging-small"):
        harness.start_tritonserver(local_triton, repo, models=[], log_dir=tmp_path, extra_args=every_folder)
    with monkeypatch.context() as m:
        as_mount_point(m, repo)
        triton_mod.write_triton_repo(small_onnx["dynamic"], repo, name="small", triton_backend="python",
                                     execution_env=local_triton.env, runtime_options={"threads": 1})
    assert sorted(p.name for p in repo.iterdir()) == ["small"]  # the dead writer's folder is gone
    server = harness.start_tritonserver(local_triton, repo, models=[], log_dir=tmp_path, extra_args=every_folder)
    try:
        x = _pixels(30, 2)
        with open_runtime(small_onnx["dynamic"]) as rt:
            np.testing.assert_allclose(_grpc_infer(server.grpc_url, "small", x), rt.infer(x), rtol=1e-5, atol=1e-5)
    finally:
        server.stop()


# -- one client, two servers -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vitdeploy_serve(small_onnx):
    """`vitdeploy serve` in its own process on a free loopback port."""
    pytest.importorskip("fastapi", reason="vitdeploy serve needs the serve extra: pip install 'vitdeploy[serve]'")
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from vitdeploy.cli import main; main()", "serve",
                             "--model", str(small_onnx["dynamic"]), "--name", "small", "--drain-grace", "0",
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"vitdeploy serve did not become ready: {proc.stdout.read().decode()[-2000:]}")
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(30)


def test_same_http_client_code_against_vitdeploy_serve_and_triton(triton_server, vitdeploy_serve, reference):
    for n, seed, binary in ((1, 20, True), (4, 21, True), (3, 22, False)):
        x = _pixels(seed, n)
        ours = _http_infer(vitdeploy_serve, "small", x, binary=binary)
        theirs = _http_infer(triton_server.http_url, "small", x, binary=binary)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours, reference.infer(x), rtol=1e-5, atol=1e-5)


def test_backend_names_the_vitdeploy_backend_and_old_spellings_still_work(small_onnx, tmp_path):
    """--triton-backend is Triton's layout; --backend the vitdeploy backend, as in every command. The previous
    release's --backend python and --runtime X still work, with a note."""
    new = CliRunner().invoke(main, ["triton", str(small_onnx["dynamic"]), "--repo", str(tmp_path / "new"),
                                    "--triton-backend", "python", "--backend", "openvino"])
    assert new.exit_code == 0, new.output
    old = CliRunner().invoke(main, ["triton", str(small_onnx["dynamic"]), "--repo", str(tmp_path / "old"),
                                    "--backend", "python", "--runtime", "openvino"])
    assert old.exit_code == 0, old.output
    assert "--backend python is now --triton-backend python" in old.stderr
    assert "--runtime is now --backend" in old.stderr
    name = Path(small_onnx["dynamic"]).stem
    config = (tmp_path / "new" / name / "config.pbtxt").read_text()
    assert config == (tmp_path / "old" / name / "config.pbtxt").read_text() and 'string_value: "openvino"' in config
    with pytest.warns(DeprecationWarning, match="triton_backend"):
        triton_mod.write_triton_repo(small_onnx["dynamic"], tmp_path / "lib", backend="python")


# -- an embedding model: any output name and size (issue 30) -------------------------------------------------
@pytest.fixture(scope="module")
def embedding_onnx(digits, tmp_path_factory) -> dict[str, Path]:
    """The digits ViT as an embedding model: `vitdeploy export --task embedding` (golden set and all), and
    traced by torch.onnx's TorchScript exporter (which leaves the output's size symbolic)."""
    from tests.test_embeddings import export_embedding
    from vitdeploy.exporters import ExportOptions, export_onnx

    root = tmp_path_factory.mktemp("triton_embed")
    return {"real": export_onnx(digits["checkpoint"], root / "embed.onnx",
                                options=ExportOptions(dynamic_batch=True, task="embedding")).path,
            "traced": export_embedding(digits["checkpoint"], root / "traced.onnx")}


@pytest.mark.parametrize("which", ["real", "traced"])
def test_an_embedding_models_repository_declares_its_output(embedding_onnx, tmp_path, which):
    from tritonclient.grpc import model_config_pb2

    for backend in ("native", "python"):
        out = triton_mod.write_triton_repo(embedding_onnx[which], tmp_path / backend, name="emb",
                                           triton_backend=backend)
        cfg = _parse_pbtxt(out.config)
        assert [(o.name, list(o.dims), o.label_filename) for o in cfg.output] == [("embeddings", [64], "")]
        assert model_config_pb2.DataType.Name(cfg.output[0].data_type) == "TYPE_FP32"
        assert out.labels is None and not (out.model_dir / "labels.txt").exists()  # no labels: no label file


def test_triton_serves_an_embedding_model_as_onnx_runtime_answers(local_triton, embedding_onnx, tmp_path):
    repo = tmp_path / "repo"
    r = CliRunner().invoke(main, ["triton", str(embedding_onnx["real"]), "--repo", str(repo), "--name", "emb",
                                  "--triton-backend", "python", "--execution-env", str(local_triton.env),
                                  "--max-batch", "8", "--threads", "1"])
    assert r.exit_code == 0, r.output
    server = harness.start_tritonserver(local_triton, repo, log_dir=tmp_path)
    try:
        x = np.random.default_rng(5).standard_normal((5, 3, 224, 224)).astype(np.float32)
        with open_runtime(embedding_onnx["real"]) as rt:
            want = rt.infer(x)  # and the model verified its golden embeddings as it loaded in Triton
        got = _http_infer(server.http_url, "emb", x)  # the output's name read from Triton's model metadata
        assert got.shape == (5, 64)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    finally:
        server.stop()


def test_an_output_size_the_graph_contradicts_is_refused_in_one_line(tmp_path):
    from tests.test_hostile_files import good_metadata, tiny_onnx

    meta = good_metadata(task="embedding", output_name="embeddings", output_size=5, labels=[])
    onnx = tiny_onnx(tmp_path / "m.onnx", meta=meta, output_name="embeddings")  # the graph gives 3 per image
    r = CliRunner().invoke(main, ["triton", str(onnx), "--repo", str(tmp_path / "repo")])
    assert r.exit_code == 1 and "output has 3 values per image and its metadata says 5" in r.output, r.output
    assert not (tmp_path / "repo" / "m").exists()
