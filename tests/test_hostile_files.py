"""Untrusted files (issue 18, files): an artifact names nothing outside its own folder, and every file
vitdeploy reads (ONNX metadata, engine sidecar, tune plan) is validated, so a hostile or corrupt one
gets one line of VitDeployError, never another exception, and never touches a file elsewhere.

The artifacts here are hand-made ONNX graphs (Flatten + MatMul on a [N, 3, 8, 8] input) that ONNX
Runtime runs for real: they load in milliseconds, and each test edits exactly the field it attacks.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from vitdeploy.errors import VitDeployError

W = (np.arange(192 * 3, dtype=np.float32).reshape(192, 3) - 288) / 1000


def good_metadata(**over: object) -> dict:
    meta = {"version": "0.0", "config": {"num_labels": 3, "image_size": 8},
            "preprocessing": {"image_size": [8, 8], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                              "crop_pct": None, "interpolation": "bilinear"},
            "labels": ["cat", "dog", "eel"], "precision": "fp32", "batch": "dynamic"}
    meta.update(over)
    return meta


def tiny_onnx(path: Path, location: str | None = None, meta: dict | None = None, props: dict | None = None,
              input_name: str = "pixel_values", output_name: str = "logits") -> Path:
    """A real ONNX file: logits = flatten(pixels) @ W. ``location``: W is stored as external data there
    (relative to the file's folder, or absolute; the caller writes the bytes). ``meta``: vitdeploy
    metadata (JSON-encoded as export writes it); ``props``: raw metadata_props, as given."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(W, "W")
    if location is not None:
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", str(W.nbytes))):
            entry = w.external_data.add()
            entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Flatten", [input_name], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "W"],
                                                                                       [output_name])],
        "tiny", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if meta is not None:
        props = {**(props or {}), **{f"vitdeploy.{k}": v if isinstance(v, str) else json.dumps(v)
                                     for k, v in meta.items()}}
    for key, value in (props or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file outside every artifact folder, holding W's bytes (so a follower would even load it)."""
    path = tmp_path / "secret" / "canary.bin"
    path.parent.mkdir()
    path.write_bytes(W.tobytes())
    os.chmod(path, 0o600)
    return path


def hostile_locations(tmp_path: Path, secret: Path) -> dict[str, str]:
    """External-data locations that leave the folder ``tmp_path / 'v'``: '..', absolute, a symlink."""
    link = tmp_path / "v" / "link.bin"
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(secret)
    return {"dotdot": "../secret/canary.bin", "absolute": str(secret), "symlink": "link.bin"}


# -- 1. publish never deletes, and no reader follows, a file outside the artifact's folder ---------------
@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_publish_never_deletes_files_outside_the_folder(tmp_path, secret, kind):
    from vitdeploy.io import publish_onnx, staging_dir

    location = hostile_locations(tmp_path, secret)[kind]
    target = tiny_onnx(tmp_path / "v" / "m.onnx", location)
    with staging_dir(target) as stage:  # a re-export onto the hostile file
        tiny_onnx(stage / "m.onnx", "m.onnx.data")
        shutil.copyfile(secret, stage / "m.onnx.data")
        data = publish_onnx(stage / "m.onnx", target, durable=False)
    assert secret.read_bytes() == W.tobytes()  # the canary is still there
    assert [p.name for p in data] == [f"m.onnx.{hashlib.sha256(W.tobytes()).hexdigest()[:16]}.data"]


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_readers_refuse_external_data_outside_the_folder(tmp_path, secret, kind):
    from vitdeploy.engines import open_runtime
    from vitdeploy.inspection import inspect_artifact
    from vitdeploy.io import onnx_external_files

    location = hostile_locations(tmp_path, secret)[kind]
    onnx_path = tiny_onnx(tmp_path / "v" / "m.onnx", location, meta=good_metadata())
    readers = {"onnx_external_files": lambda: onnx_external_files(onnx_path),
               "inspect": lambda: inspect_artifact(onnx_path),
               "onnxruntime": lambda: open_runtime(onnx_path, backend="onnxruntime")}
    pytest.importorskip("openvino")
    readers["openvino"] = lambda: open_runtime(onnx_path, backend="openvino")
    for name, read in readers.items():
        with pytest.raises(VitDeployError) as e:
            read()
        assert "\n" not in str(e.value), name
        if name != "onnxruntime":  # ONNX Runtime refuses first, in its own words (it names the tensor too)
            assert "'W'" in str(e.value) and repr(location) in str(e.value), (name, str(e.value))


def test_engine_build_refuses_a_symlinked_data_file(tmp_path, secret):
    """TensorRT's ONNX parser refuses '..' and absolute locations itself, but follows a symlink."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX not installed")
    from vitdeploy.engines.tensorrt.build import BuildOptions, build_engine

    location = hostile_locations(tmp_path, secret)["symlink"]
    onnx_path = tiny_onnx(tmp_path / "v" / "m.onnx", location, meta=good_metadata())
    with pytest.raises(VitDeployError, match=r"tensor 'W' keeps its data at 'link\.bin', which resolves outside"):
        build_engine(onnx_path, tmp_path / "v" / "m.engine",
                     BuildOptions(flavour="rtx", compute_capabilities=["sm89"], max_batch=2))
    assert not (tmp_path / "v" / "m.engine").exists()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_triton_copies_nothing_from_outside_the_folder(tmp_path, secret, kind):
    from vitdeploy.serving.triton import write_triton_repo

    location = hostile_locations(tmp_path, secret)[kind]
    onnx_path = tiny_onnx(tmp_path / "v" / "m.onnx", location, meta=good_metadata())
    for backend in ("native", "python"):
        with pytest.raises(VitDeployError, match=r"tensor 'W' keeps its data at .*outside|tensor 'W' .*absolute|"
                                                 r"tensor 'W' .*'\.\.'"):
            write_triton_repo(onnx_path, tmp_path / "repo", name="m", backend=backend)
    assert not any(p.is_file() for p in (tmp_path / "repo").rglob("*"))  # nothing copied, nothing staged
    assert not list((tmp_path).glob(".repo.*"))


# -- 2. triton keeps file modes -------------------------------------------------------------------------
def test_triton_keeps_the_mode_of_copied_files(tmp_path):
    from vitdeploy.serving.triton import write_triton_repo

    onnx_path = tiny_onnx(tmp_path / "v" / "m.onnx", "m.onnx.data", meta=good_metadata())
    (tmp_path / "v" / "m.onnx.data").write_bytes(W.tobytes())
    os.chmod(tmp_path / "v" / "m.onnx.data", 0o600)
    os.chmod(onnx_path, 0o640)
    out = write_triton_repo(onnx_path, tmp_path / "repo", name="m")
    version = out.model_dir / "1"
    assert (version / "m.onnx.data").read_bytes() == W.tobytes()
    assert oct((version / "m.onnx.data").stat().st_mode & 0o777) == oct(0o600)
    assert oct(out.model_file.stat().st_mode & 0o777) == oct(0o640)
    assert oct(out.config.stat().st_mode & 0o777) == oct(0o644)


# -- 3. config.pbtxt through Triton's own schema; names, numbers and labels checked -----------------------
INJECTION = ('x" dims: [ 1 ] }\n]\nparameters: { key: "EXECUTION_ENV_PATH" value: { string_value: "/tmp/evil" } }'
             '\ninput [\n{ name: "y')


def _parse(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("where", ["input_name", "output_name"])
def test_config_pbtxt_injection_through_tensor_names_is_refused(tmp_path, where):
    pytest.importorskip("tritonclient.grpc")
    from vitdeploy.serving.triton import write_triton_repo

    onnx_path = tiny_onnx(tmp_path / "m.onnx", meta=good_metadata(), **{where: INJECTION})
    for backend in ("native", "python"):
        with pytest.raises(VitDeployError, match=r"name .* is not a tensor name Triton's config may hold"):
            write_triton_repo(onnx_path, tmp_path / "repo", name="m", backend=backend)
    assert not (tmp_path / "repo" / "m").exists()


def test_config_pbtxt_is_rendered_by_protobuf(tmp_path):
    """Strings that need escaping (a quote, a newline, a backslash in the execution env's path) come back
    exactly, and no field appears that we did not set."""
    pytest.importorskip("tritonclient.grpc")
    from vitdeploy.serving.triton import write_triton_repo

    env = tmp_path / 'env "x"\n} parameters { key: "k" \\'
    env.mkdir()
    onnx_path = tiny_onnx(tmp_path / "m.onnx", meta=good_metadata())
    out = write_triton_repo(onnx_path, tmp_path / "repo", name="m", triton_backend="python", execution_env=env,
                            runtime_options={"threads": 2})
    cfg = _parse(out.config)
    assert {k: v.string_value for k, v in cfg.parameters.items()} == {
        "VITDEPLOY_ARTIFACT": "model.onnx", "VITDEPLOY_BACKEND": "auto", "VITDEPLOY_OPTIONS": '{"threads": 2}',
        "EXECUTION_ENV_PATH": str(env.resolve())}
    assert [i.name for i in cfg.input] == ["pixel_values"] and [o.name for o in cfg.output] == ["logits"]
    assert (out.model_dir / "labels.txt").read_text() == "cat\ndog\neel\n"


@pytest.mark.parametrize("max_batch", [10**30, 2**40, -3])
def test_absurd_max_batch_is_refused(tmp_path, max_batch):
    pytest.importorskip("tritonclient.grpc")
    from vitdeploy.serving.triton import write_triton_repo

    onnx_path = tiny_onnx(tmp_path / "m.onnx", meta=good_metadata())
    with pytest.raises(VitDeployError, match=r"max_batch_size|--max-batch"):
        write_triton_repo(onnx_path, tmp_path / "repo", name="m", max_batch=max_batch)
    assert not (tmp_path / "repo" / "m").exists()


@pytest.mark.parametrize("label", ["two\nlines", "carriage\rreturn"])
def test_label_with_a_line_break_is_refused(tmp_path, label):
    pytest.importorskip("tritonclient.grpc")
    from vitdeploy.serving.triton import write_triton_repo

    onnx_path = tiny_onnx(tmp_path / "m.onnx", meta=good_metadata(labels=["cat", label, "eel"]))
    with pytest.raises(VitDeployError, match=r"label 1 .* holds a line break"):
        write_triton_repo(onnx_path, tmp_path / "repo", name="m")
    assert not (tmp_path / "repo" / "m").exists()


# -- 4. corrupt tune plans and sidecars -------------------------------------------------------------------
def _plan_dict(onnx_path: Path, **over: object) -> dict:
    from vitdeploy.engines.plan import MachineKey
    from vitdeploy.io import sha256_file

    choice = {"backend": "onnxruntime", "options": {"threads": 1}, "label": "onnxruntime, 1 thread"}
    plan = {"format": "vitdeploy-tune/1", "artifact": onnx_path.name, "artifact_sha256": sha256_file(onnx_path),
            "machine": MachineKey.current().to_dict(), "latency": choice, "throughput": copy.deepcopy(choice),
            "throughput_batch": 4, "candidates": []}
    plan.update(over)
    return plan


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


PLAN_CASES = {
    "list": "[]", "null": "null", "number": "7", "latency list": {"latency": []},
    "latency null": {"latency": None}, "machine list": {"machine": []}, "flags str": {"machine": "x"},
    "batch str": {"throughput_batch": "4"}, "batch float": {"throughput_batch": 4.5},
    "batch huge": {"throughput_batch": 10**30}, "deep": _nested(100_000),
    "deep in field": "DEEP", "unknown option": {"latency": {"backend": "onnxruntime", "options": {"bogus": 1}}},
    "constructor arg": {"latency": {"backend": "onnxruntime", "options": {"path": "/etc/passwd"}}},
    "device option": {"throughput": {"backend": "openvino", "options": {"device": "GPU"}}},
    "bad threads": {"latency": {"backend": "onnxruntime", "options": {"threads": "many"}}},
    "bad hint": {"latency": {"backend": "openvino", "options": {"hint": []}}},
    "bad backend": {"latency": {"backend": "torch", "options": {}}},
    "options list": {"latency": {"backend": "onnxruntime", "options": []}},
    "candidates dict": {"candidates": {"a": 1}},
}


@pytest.mark.parametrize("case", PLAN_CASES)
def test_corrupt_plan_is_refused_in_one_line(tmp_path, case):
    from vitdeploy.engines.plan import TunePlan, plan_path

    onnx_path = tiny_onnx(tmp_path / "m.onnx", meta=good_metadata())
    value = PLAN_CASES[case]
    if value == "DEEP":
        text = json.dumps(_plan_dict(onnx_path)).replace('"candidates": []', '"candidates": ' + _nested(50_000))
    else:
        text = value if isinstance(value, str) else json.dumps(_plan_dict(onnx_path, **value))
    plan_path(onnx_path).write_text(text)
    with pytest.raises(VitDeployError, match=r"tune plan .* is unreadable .*: rerun `vitdeploy tune`") as e:
        TunePlan.read(plan_path(onnx_path))
    assert "\n" not in str(e.value)


def test_matching_plan_with_unknown_options_is_ignored_by_open_runtime(tmp_path, caplog):
    import logging

    from vitdeploy.engines import open_runtime
    from vitdeploy.engines.plan import plan_path

    onnx_path = tiny_onnx(tmp_path / "m.onnx", meta=good_metadata())
    bad = {"backend": "onnxruntime", "options": {"threads": 1, "optimisation": "all"}}
    plan_path(onnx_path).write_text(json.dumps(_plan_dict(onnx_path, latency=bad)))
    x = np.ones((2, 3, 8, 8), np.float32)
    with caplog.at_level(logging.WARNING, logger="vitdeploy"), open_runtime(onnx_path, device="cpu") as rt:
        assert rt.backend == "onnxruntime"  # the plan is ignored, the default path runs
        np.testing.assert_allclose(rt.infer(x), x.reshape(2, -1) @ W, rtol=1e-5, atol=1e-5)
    assert any("takes no option 'optimisation'" in r.getMessage() for r in caplog.records)


def test_a_valid_plan_still_opens_its_path(tmp_path):
    from vitdeploy.engines import open_runtime
    from vitdeploy.engines.plan import plan_path

    onnx_path = tiny_onnx(tmp_path / "m.onnx", meta=good_metadata())
    good = {"backend": "onnxruntime", "options": {"threads": 1, "qdq_activations": "int8", "optimization": "basic"}}
    plan_path(onnx_path).write_text(json.dumps(_plan_dict(onnx_path, latency=good, throughput=good)))
    with open_runtime(onnx_path, device="cpu") as rt:
        assert rt.backend == "planned" and rt.threads == 1


def test_plan_options_match_the_runtime_constructors():
    """The allow-list names only keyword arguments the runtimes' constructors really take."""
    import inspect

    from vitdeploy.engines.onnxruntime_backend import QDQ_ACTIVATIONS, OnnxRuntime
    from vitdeploy.engines.openvino_backend import OpenVinoRuntime
    from vitdeploy.engines.plan import PATH_OPTIONS

    for backend, cls in (("onnxruntime", OnnxRuntime), ("openvino", OpenVinoRuntime)):
        assert set(PATH_OPTIONS[backend]) <= set(inspect.signature(cls.__init__).parameters) - {"self", "path"}
    assert PATH_OPTIONS["onnxruntime"]["qdq_activations"] == QDQ_ACTIVATIONS


@pytest.fixture
def engine(tmp_path) -> Path:
    """An engine file (bytes only: nothing here deserializes it) and its sidecar, written by write_engine."""
    from vitdeploy.engines.tensorrt.sidecar import EngineSidecar, TensorIO, write_engine

    side = EngineSidecar(flavour="tensorrt_rtx", trt_version="1.7.1.116", targets=["sm89"], precision="fp32",
                         io=[TensorIO("pixel_values", "input", [-1, 3, 8, 8], "float"),
                             TensorIO("logits", "output", [-1, 3], "float")],
                         profile={"min": [1, 3, 8, 8], "opt": [2, 3, 8, 8], "max": [4, 3, 8, 8]},
                         onnx_path="m.onnx", model=good_metadata())
    path = tmp_path / "m.engine"
    write_engine(path, b"fake-engine-1", side, durable=False)
    return path


def _edit_sidecar(engine: Path, edit) -> None:
    side = engine.with_suffix(".json")
    data = json.loads(side.read_text())
    edit(data)
    side.write_text(json.dumps(data))


SIDECAR_CASES = {
    "onnx str": lambda d: d.update(onnx="x"),
    "engine str": lambda d: d.update(engine="x"),
    "sha null": lambda d: d["engine"].update(sha256=None),
    "bytes null": lambda d: d["engine"].update(bytes=None),
    "engine null": lambda d: d.update(engine=None),
    "engine missing": lambda d: d.pop("engine"),
    "bytes str": lambda d: d["engine"].update(bytes="13"),
    "sha short": lambda d: d["engine"].update(sha256="abc"),
    "io dict": lambda d: d.update(io={"name": "x"}),
    "io entry list": lambda d: d.update(io=[[1, 2]]),
    "shape str": lambda d: d["io"][0].update(shape="3x8x8"),
    "shape float": lambda d: d["io"][0].update(shape=[-1, 3.5, 8, 8]),
    "profile list": lambda d: d.update(profile=[1, 2]),
    "profile 1e30": lambda d: d["profile"].update(max=[10**30, 3, 8, 8]),
    "profile order": lambda d: d["profile"].update(min=[8, 3, 8, 8]),
    "targets str": lambda d: d.update(targets="sm89"),
    "options list": lambda d: d.update(options=[1]),
    "model list": lambda d: d.update(model=[1]),
    "model bad std": lambda d: d["model"]["preprocessing"].update(std=[0, 1, 1]),
    "name int": lambda d: d["io"][0].update(name=5),
    "seconds str": lambda d: d.update(build_seconds="1"),
}


@pytest.mark.parametrize("case", SIDECAR_CASES)
def test_corrupt_sidecar_is_refused_in_one_line(engine, case):
    from vitdeploy.engines.tensorrt.sidecar import EngineSidecar

    _edit_sidecar(engine, SIDECAR_CASES[case])
    with pytest.raises(VitDeployError, match=r"sidecar .*m\.json") as e:
        EngineSidecar.read(engine)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["[]", "null", "[" * 100_000 + "]" * 100_000, "\xff\xfe", '{"format": 1}'])
def test_sidecar_that_is_not_a_sidecar_is_refused(engine, text):
    from vitdeploy.engines.tensorrt.sidecar import EngineSidecar

    engine.with_suffix(".json").write_bytes(text.encode("latin-1"))
    with pytest.raises(VitDeployError, match=r"sidecar .*m\.json") as e:
        EngineSidecar.read(engine)
    assert "\n" not in str(e.value)


def test_sidecar_without_the_engine_hash_cannot_pair_with_another_engine(engine):
    """Nulling the hash used to switch the check off: another build's engine then passed as this one."""
    from vitdeploy.engines.tensorrt.sidecar import EngineSidecar

    _edit_sidecar(engine, lambda d: d.update(engine={"bytes": None, "sha256": None}))
    engine.write_bytes(b"another build")
    with pytest.raises(VitDeployError, match=r"engine\.bytes"):
        EngineSidecar.read(engine)


# -- 5. artifact metadata is checked when the artifact opens ----------------------------------------------
def _prep(**over: object) -> dict:
    return {**good_metadata()["preprocessing"], **over}


METADATA_CASES = {
    "negative size": ({"preprocessing": _prep(image_size=[-8, 8])}, "image_size"),
    "huge size": ({"preprocessing": _prep(image_size=[3000, 3000])}, "image_size"),
    "size str": ({"preprocessing": _prep(image_size="8")}, "image_size"),
    "crop 0": ({"preprocessing": _prep(crop_pct=0)}, "crop_pct"),
    "crop 2": ({"preprocessing": _prep(crop_pct=2.0)}, "crop_pct"),
    "crop str": ({"preprocessing": _prep(crop_pct="0.9")}, "crop_pct"),
    "interpolation": ({"preprocessing": _prep(interpolation="sinc")}, "interpolation"),
    "nan mean": ({"preprocessing": _prep(mean=[float("nan"), 0.5, 0.5])}, "mean"),
    "inf mean": ({"preprocessing": _prep(mean=[float("inf"), 0.5, 0.5])}, "mean"),
    "zero std": ({"preprocessing": _prep(std=[0.0, 0.5, 0.5])}, "std"),
    "negative std": ({"preprocessing": _prep(std=[-0.5, 0.5, 0.5])}, "std"),
    "nan std": ({"preprocessing": _prep(std=[float("nan")] * 3)}, "std"),
    "std 2 values": ({"preprocessing": _prep(std=[0.5, 0.5])}, "std"),
    "prep list": ({"preprocessing": [1]}, "preprocessing"),
    "labels not JSON": ({"labels": "['cat', 'dog'"}, "labels"),
    "labels dict": ({"labels": {"0": "cat"}}, "labels"),
    "labels ints": ({"labels": [1, 2, 3]}, "labels"),
    "config list": ({"config": [1]}, "config"),
    "num_labels str": ({"config": {"num_labels": "3"}}, "num_labels"),
    "deep labels": ({"labels": "[" * 100_000 + "]" * 100_000}, "labels"),
}


@pytest.mark.parametrize("case", METADATA_CASES)
def test_bad_metadata_is_refused_when_the_artifact_opens(tmp_path, case):
    from vitdeploy.engines import open_runtime

    over, field = METADATA_CASES[case]
    onnx_path = tiny_onnx(tmp_path / "m.onnx", meta=good_metadata(**over))  # a str is written as is (not JSON)
    for backend in ("onnxruntime", "openvino"):
        if backend == "openvino":
            pytest.importorskip("openvino")
        with pytest.raises(VitDeployError, match=field) as e:
            open_runtime(onnx_path, backend=backend).close()
        assert "\n" not in str(e.value) and "re-export" in str(e.value), str(e.value)


def test_a_plain_onnx_without_metadata_still_opens(tmp_path):
    from vitdeploy.engines import open_runtime
    from vitdeploy.inspection import inspect_artifact

    onnx_path = tiny_onnx(tmp_path / "m.onnx", props={"producer.note": "not ours"})
    assert inspect_artifact(onnx_path)["model"] is None
    x = np.ones((1, 3, 8, 8), np.float32)
    for backend in ("onnxruntime", "openvino"):
        if backend == "openvino":
            pytest.importorskip("openvino")
        with open_runtime(onnx_path, backend=backend) as rt:
            assert rt.metadata is None
            np.testing.assert_allclose(rt.infer(x), x.reshape(1, -1) @ W, rtol=1e-4, atol=1e-4)


def test_good_metadata_opens_and_preprocesses(tmp_path):
    from PIL import Image

    from vitdeploy.engines import open_runtime
    from vitdeploy.preprocess import Preprocessing

    onnx_path = tiny_onnx(tmp_path / "m.onnx", meta=good_metadata(
        preprocessing=_prep(crop_pct=0.875, interpolation="bicubic", mean=[0.5], std=[0.25])))
    with open_runtime(onnx_path) as rt:
        prep = Preprocessing.from_dict(rt.metadata.preprocessing)
        assert rt.labels == ["cat", "dog", "eel"]
    assert prep == Preprocessing((8, 8), (0.5,), (0.25,), 0.875, "bicubic")
    x = prep(Image.new("RGB", (20, 10), (255, 0, 51)))
    np.testing.assert_allclose(x[:, 0, 0], [2.0, -2.0, -1.2], atol=1e-6)


# -- 6. a reader that finishes a publish does not make the writer fail ------------------------------------
def test_reader_completing_the_publish_does_not_fail_the_writer(engine, monkeypatch):
    """A real interleaving: between the writer's engine rename and its sidecar rename, a reader opens the
    engine, finds the new engine with the old sidecar, and completes the publish from the staging folder."""
    from vitdeploy import io as vio
    from vitdeploy.engines.tensorrt.sidecar import EngineSidecar, write_engine

    old = EngineSidecar.read(engine)
    real_replace = os.replace
    seen = []

    def replace(src, dst):
        real_replace(src, dst)
        if Path(dst) == engine and not seen:  # the engine is in, the sidecar still staged: a reader arrives
            seen.append(EngineSidecar.read(engine))

    monkeypatch.setattr(vio.os, "replace", replace)
    new = write_engine(engine, b"fake-engine-2", __import__("dataclasses").replace(old, precision="fp16"),
                       durable=False)
    monkeypatch.undo()
    assert seen and seen[0].precision == "fp16" and seen[0].engine_sha256 == new.engine_sha256  # the reader's view
    now = EngineSidecar.read(engine)
    assert now.precision == "fp16" and engine.read_bytes() == b"fake-engine-2"
    assert sorted(p.name for p in engine.parent.iterdir()) == ["m.engine", "m.json"]  # no staging left


def test_a_different_file_at_the_target_still_fails_the_writer(tmp_path, monkeypatch):
    """Idempotent means 'the very file we staged is in place', not 'ignore a vanished file'."""
    from vitdeploy import io as vio

    target, other = tmp_path / "m.json", tmp_path / "m.engine"
    with vio.staging_dir(target) as stage:
        (stage / "m.json").write_text("ours")
        (stage / "m.engine").write_text("engine")
        real_replace = os.replace

        def replace(src, dst):
            if Path(dst) == target:  # someone removed our staged file and put another one in place
                os.unlink(src)
                target.write_text("theirs")
            return real_replace(src, dst)

        monkeypatch.setattr(vio.os, "replace", replace)
        with pytest.raises(FileNotFoundError):
            vio.publish_file_set({other: stage / "m.engine", target: stage / "m.json"}, last=target, durable=False)


# -- 7. `vitdeploy triton --repo MOUNTPOINT` ----------------------------------------------------------------
def as_mount_point(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make ``folder`` behave as a file system of its own: what is in it has another st_dev, and a rename
    between it and anything outside fails with EXDEV, as the kernel's does (tests/test_triton.py too)."""
    real_stat, real_replace = os.stat, os.replace

    def inside(p) -> bool:
        return Path(os.path.abspath(p)).is_relative_to(folder)

    def stat(p, *a, **k):
        st = real_stat(p, *a, **k)
        if inside(p):
            return os.stat_result((st.st_mode, st.st_ino, st.st_dev + 1, *tuple(st)[3:]))
        return st

    def replace(src, dst):
        if inside(src) != inside(dst):
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "replace", replace)


def test_triton_repo_on_its_own_file_system(tmp_path, monkeypatch):
    """The repository is a mount point: a rename between it and anything outside it fails with EXDEV,
    as the kernel does. The model folder is staged inside it and renamed in; nothing is left behind."""
    pytest.importorskip("tritonclient.grpc")
    from vitdeploy.serving import triton as triton_mod

    repo = tmp_path / "repo"
    repo.mkdir()
    as_mount_point(monkeypatch, repo)
    onnx_path = tiny_onnx(tmp_path / "v" / "m.onnx", meta=good_metadata())
    first = triton_mod.write_triton_repo(onnx_path, repo, name="m")
    second = triton_mod.write_triton_repo(onnx_path, repo, name="m", triton_backend="python")  # replaces the model
    monkeypatch.undo()
    assert first.model_dir == second.model_dir and _parse(second.config).backend == "python"
    assert sorted(p.name for p in repo.iterdir()) == ["m"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo", "v"]


# -- property-based: arbitrary and near-valid JSON into the metadata, sidecar and plan readers -------------
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
FUZZ = hypothesis.settings(max_examples=300, deadline=None, derandomize=True,
                           suppress_health_check=[hypothesis.HealthCheck.too_slow])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=24)


# one of each JSON type and the edge values: what a near-valid document most often gets wrong
TYPE_SWAPS = st.sampled_from([None, True, 0, -1, 2**63, 1e308, float("nan"), float("-inf"), "", "x", [], [[]], {},
                              {"a": None}])


def _paths(doc, prefix=()):
    """Every place in a JSON document: dict keys and list indices, depth first."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield (*prefix, key)
        yield from _paths(value, (*prefix, key))


@st.composite
def near_valid(draw, base: dict):
    """``base`` with one place replaced by arbitrary JSON, deleted, or (a list) given an extra item."""
    doc = copy.deepcopy(base)
    path = draw(st.sampled_from(list(_paths(doc))))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["replace", "delete", "append"]))
    value = draw(st.one_of(TYPE_SWAPS, JSON))
    if action == "delete":
        del parent[path[-1]]
    elif action == "append" and isinstance(parent[path[-1]], list):
        parent[path[-1]].append(value)
    else:
        parent[path[-1]] = value
    return doc


def _refused_or_valid(read, value, kind):
    """The property: ``read(value)`` gives an instance of ``kind`` or a one-line VitDeployError."""
    try:
        out = read(value)
    except VitDeployError as e:
        assert str(e) and "\n" not in str(e), str(e)
        return None
    assert isinstance(out, kind), out
    return out


def _valid_sidecar() -> dict:
    from vitdeploy.engines.tensorrt.sidecar import EngineSidecar, TensorIO

    return EngineSidecar(flavour="tensorrt", trt_version="10.16.1.11", targets=["sm89"], precision="fp16",
                         io=[TensorIO("pixel_values", "input", [-1, 3, 8, 8], "float"),
                             TensorIO("logits", "output", [-1, 3], "float")],
                         profile={"min": [1, 3, 8, 8], "opt": [2, 3, 8, 8], "max": [4, 3, 8, 8]},
                         onnx_path="m.onnx", onnx_sha256="0" * 64, gpu="NVIDIA L4", options={"fp16": True},
                         model=good_metadata(), engine_bytes=13, engine_sha256="ab" * 32).to_dict()


def _valid_plan() -> dict:
    from vitdeploy.engines.plan import MachineKey

    choice = {"backend": "openvino", "options": {"threads": 2, "precision_hint": "f32", "hint": "LATENCY"},
              "label": "openvino"}
    return {"format": "vitdeploy-tune/1", "artifact": "m.onnx", "artifact_sha256": "cd" * 32,
            "machine": MachineKey.current().to_dict(), "latency": choice,
            "throughput": {"backend": "onnxruntime", "options": {"threads": 1}, "label": ""},
            "throughput_batch": 4, "candidates": [{"label": "x", "ms": 1.0}]}


def _read_metadata(d):
    from vitdeploy.artifacts.metadata import ArtifactMetadata
    from vitdeploy.preprocess import Preprocessing

    meta = ArtifactMetadata.from_dict(d)
    Preprocessing.from_dict(meta.preprocessing)  # valid metadata has usable preprocessing
    again = ArtifactMetadata.from_props(meta.to_props())  # and survives the trip through ONNX metadata_props
    assert json.dumps(again.to_dict(), sort_keys=True) == json.dumps(meta.to_dict(), sort_keys=True)
    return meta


def _read_plan_file(folder: Path):
    from vitdeploy.engines.plan import TunePlan

    def read(value):
        path = folder / "m.tune.json"
        path.write_text(value if isinstance(value, str) else json.dumps(value))
        plan = TunePlan.read(path)
        assert TunePlan.from_dict(json.loads(json.dumps(plan.to_dict()))).to_dict() == plan.to_dict()
        return plan
    return read


def test_valid_documents_are_accepted():
    """The fuzz bases are valid: a refusal of a mutation is the mutation's doing."""
    from vitdeploy.engines.tensorrt.sidecar import EngineSidecar

    assert EngineSidecar.from_dict(_valid_sidecar()).engine_bytes == 13
    assert _read_metadata(good_metadata()).labels == ["cat", "dog", "eel"]


def _read_sidecar(d):
    """A sidecar accepted is one a runtime can use: the engine's size and hash, I/O, and a round trip."""
    from vitdeploy.engines.tensorrt.sidecar import EngineSidecar

    side = EngineSidecar.from_dict(d)
    assert type(side.engine_bytes) is int and len(side.engine_sha256 or "") == 64
    assert side.input.shape and side.output.shape and side.title
    assert EngineSidecar.from_dict(json.loads(side.to_json())).to_dict() == side.to_dict()
    return side


@FUZZ
@hypothesis.given(JSON)
def test_fuzz_sidecar_arbitrary_json(value):
    from vitdeploy.engines.tensorrt.sidecar import EngineSidecar

    _refused_or_valid(_read_sidecar, value, EngineSidecar)


@FUZZ
@hypothesis.given(near_valid(_valid_sidecar()))
def test_fuzz_sidecar_near_valid(doc):
    from vitdeploy.engines.tensorrt.sidecar import EngineSidecar

    _refused_or_valid(_read_sidecar, doc, EngineSidecar)


@FUZZ
@hypothesis.given(st.one_of(JSON, near_valid(good_metadata())))
def test_fuzz_metadata_dict(doc):
    from vitdeploy.artifacts.metadata import ArtifactMetadata

    _refused_or_valid(_read_metadata, doc, ArtifactMetadata)


@FUZZ
@hypothesis.given(st.dictionaries(
    st.sampled_from(["vitdeploy.version", "vitdeploy.config", "vitdeploy.preprocessing", "vitdeploy.labels",
                     "vitdeploy.precision", "vitdeploy.batch", "vitdeploy.golden", "vitdeploy.x", "other"]),
    st.one_of(st.text(max_size=30), JSON.map(json.dumps)), max_size=9))
def test_fuzz_metadata_props(props):
    """ONNX metadata_props as a hostile file carries them: any keys, any text, JSON or not."""
    from vitdeploy.artifacts.metadata import ArtifactMetadata

    _refused_or_valid(ArtifactMetadata.from_props, props, ArtifactMetadata)


@FUZZ
@hypothesis.given(st.binary(max_size=64) | JSON.map(lambda v: json.dumps(v).encode()))
def test_fuzz_sidecar_file_bytes(tmp_path_factory, data):
    """Any bytes as the sidecar file beside an engine: read through EngineSidecar.read."""
    from vitdeploy.engines.tensorrt.sidecar import EngineSidecar

    engine = tmp_path_factory.getbasetemp() / "fuzz.engine"
    engine.write_bytes(b"fake-engine")
    engine.with_suffix(".json").write_bytes(data)
    _refused_or_valid(EngineSidecar.read, engine, EngineSidecar)


@FUZZ
@hypothesis.given(st.one_of(JSON, near_valid(_valid_plan()), st.text(max_size=40)))
def test_fuzz_plan_file(tmp_path_factory, doc):
    from vitdeploy.engines.plan import TunePlan

    _refused_or_valid(_read_plan_file(tmp_path_factory.getbasetemp()), doc, TunePlan)


# --- issue 29: a golden set nested too deep -------------------------------------------------------------
@pytest.mark.parametrize("command", ["verify", "predict"])
def test_golden_metadata_nested_100000_deep_is_one_line(tmp_path, command):
    """A golden set of 100,000 nested arrays: json raises RecursionError; verify and predict give one line
    naming the golden set (exit 1), never a traceback."""
    from click.testing import CliRunner
    from PIL import Image

    from vitdeploy.cli import main

    deep = "[" * 100_000 + "]" * 100_000
    model = tiny_onnx(tmp_path / "m.onnx", meta=good_metadata(), props={"vitdeploy.golden": deep})
    image = tmp_path / "i.png"
    Image.new("RGB", (9, 9)).save(image)
    args = ["verify", str(model)] if command == "verify" else ["predict", "--model", str(model), str(image)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and not isinstance(r.exception, RecursionError), r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "golden set" in last and "nested too deep" in last, r.output
