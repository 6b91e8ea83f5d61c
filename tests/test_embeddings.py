"""Embedding artifacts through every consumer: eval (kNN top-1, cosine to FP32), predict (.npy), serve
(/v1/embed, KServe v2), Triton, deploy's report, compare, bench and inspect.

The embedding model here is the trained digits ViT's pooled output (the class token after the final
LayerNorm, as DINOv2's embedding is), exported with torch.onnx and given embedding metadata: real
weights, so kNN top-1 and the INT8-against-FP32 cosine are real numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vitdeploy.errors import VitDeployError

EMBED_SIZE = 64  # the digits ViT's hidden size


def export_embedding(checkpoint: Path, path: Path, normalize: bool = False, batch: int | None = None) -> Path:
    """The digits ViT's class token after its final LayerNorm (L2-normalized with ``normalize``), as an ONNX
    with input ``pixel_values`` and output ``embeddings``, and the metadata an embedding export carries."""
    import onnx
    import torch

    from vitdeploy import __version__
    from vitdeploy.artifacts.metadata import ArtifactMetadata, set_metadata
    from vitdeploy.checkpoints import resolve
    from vitdeploy.preprocess import Preprocessing

    vit = resolve(str(checkpoint), None).model.eval()
    cfg = vit.config

    class Embedder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit = vit.vit

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            x = self.vit(pixel_values)[:, 0]
            return torch.nn.functional.normalize(x, dim=-1) if normalize else x

    h, w = cfg.image_hw
    example = torch.zeros(batch or 2, cfg.num_channels, h, w)
    with torch.no_grad():
        torch.onnx.export(Embedder().eval(), (example,), str(path), dynamo=False, input_names=["pixel_values"],
                          output_names=["embeddings"], opset_version=17,
                          dynamic_axes=None if batch else {"pixel_values": {0: "N"}, "embeddings": {0: "N"}})
    model = onnx.load(str(path))
    set_metadata(model, ArtifactMetadata(
        version=__version__, config=cfg.to_dict(), preprocessing=Preprocessing.from_config(cfg).to_dict(), labels=[],
        precision="fp32", batch=str(batch) if batch else "dynamic", task="embedding", output_name="embeddings",
        output_size=cfg.hidden_size, normalized=normalize))
    onnx.save(model, str(path))
    return path


def quantize_embedding(fp32: Path, path: Path, calib_dir: Path, precision: str = "int8") -> Path:
    """``fp32`` as Q/DQ INT8 through vitdeploy's own quantizer, calibrated on images; metadata kept."""
    import onnx

    from vitdeploy.artifacts.metadata import read_onnx_metadata, set_metadata
    from vitdeploy.exporters.precision import quantize
    from vitdeploy.preprocess import Preprocessing, batches, find_images

    meta = read_onnx_metadata(fp32)
    prep = Preprocessing.from_dict(meta.preprocessing)
    quantize(fp32, path, "pixel_values", batches(find_images(calib_dir)[:64], prep, 16), precision=precision)
    model = onnx.load(str(path))
    meta.precision = precision
    set_metadata(model, meta)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def embed(digits, tmp_path_factory) -> dict[str, Path]:
    """The digits embedding model: fp32 (dynamic batch), L2-normalized, a static batch of 2, INT8."""
    root = tmp_path_factory.mktemp("embed")
    out = {"fp32": export_embedding(digits["checkpoint"], root / "embed.onnx"),
           "norm": export_embedding(digits["checkpoint"], root / "embed-norm.onnx", normalize=True),
           "b2": export_embedding(digits["checkpoint"], root / "embed-b2.onnx", batch=2)}
    out["int8"] = quantize_embedding(out["fp32"], root / "embed-int8.onnx", digits["train"])
    return out


def _image(path: Path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def _torch_embeddings(checkpoint: Path, x: np.ndarray) -> np.ndarray:
    """The reference: our torch ViT's pooled output, computed without any ONNX."""
    import torch

    from vitdeploy.checkpoints import resolve

    vit = resolve(str(checkpoint), None).model.eval()
    with torch.no_grad():
        return vit.vit(torch.from_numpy(x))[:, 0].numpy()


# -- the fixture itself --------------------------------------------------------------------------------------
def test_the_embedding_artifact_is_the_models_pooled_output(embed, digits):
    from vitdeploy.engines import open_runtime

    x = np.random.default_rng(0).standard_normal((3, 3, 224, 224)).astype(np.float32)
    want = _torch_embeddings(digits["checkpoint"], x)
    with open_runtime(embed["fp32"]) as rt, open_runtime(embed["norm"]) as rn:
        assert (rt.metadata.task, rt.metadata.output_size, rt.output_name) == ("embedding", EMBED_SIZE, "embeddings")
        np.testing.assert_allclose(rt.infer(x), want, atol=1e-4)
        np.testing.assert_allclose(rn.infer(x), want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)


# -- eval: kNN top-1 and the cosine to FP32 ------------------------------------------------------------------
def _sklearn_knn(x: np.ndarray, classes: list[str], k: int) -> list[str]:
    """Leave-one-out kNN by scikit-learn's NearestNeighbors (cosine distance): the k nearest other images,
    majority vote, a tie to the nearest of the tied."""
    from collections import Counter

    from sklearn.neighbors import NearestNeighbors

    _, idx = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(x).kneighbors(x)
    preds = []
    for i, row in enumerate(idx):
        near = [classes[j] for j in row if j != i][:k]
        counts = Counter(near)
        preds.append(next(c for c in near if counts[c] == max(counts.values())))
    return preds


@pytest.mark.parametrize("k", [1, 3, 5])
def test_knn_top1_matches_scikit_learn(k):
    from vitdeploy.evaluate import knn_result

    rng = np.random.default_rng(k)
    centres = rng.standard_normal((4, 16))
    classes = [str(c) for c in rng.integers(0, 4, 300)]
    x = (centres[[int(c) for c in classes]] + 1.5 * rng.standard_normal((300, 16))).astype(np.float32)
    x *= rng.uniform(0.1, 10, (300, 1)).astype(np.float32)  # cosine: each row's scale must not matter
    result = knn_result(x, classes, k)
    want = _sklearn_knn(x, classes, k)
    assert result.predictions == want
    assert result.correct == sum(p == c for p, c in zip(want, classes, strict=True))
    assert 0.4 < result.knn_top1 < 1.0  # a task with errors, so agreement on the misses counts too
    assert result.size == 16 and result.non_finite == 0


def test_knn_counts_a_broken_embedding_as_a_miss_and_refuses_what_cannot_be_scored():
    from vitdeploy.evaluate import knn_result, row_cosines

    x = np.array([[1, 0], [1, 0.1], [1, -0.1], [0, 1], [0.1, 1], [-0.1, 1]], np.float32)
    classes = ["a", "a", "a", "b", "b", "b"]
    assert knn_result(x, classes).correct == 6
    x[0] = np.nan
    r = knn_result(x, classes)
    assert (r.correct, r.non_finite, r.predictions[0]) == (5, 1, "")
    assert r.mean_norm == pytest.approx(np.sqrt(1.01) * 4 / 5 + 1 / 5)  # over the finite ones
    want = [0.0, 1.1 / np.sqrt(2 * 1.01), 0.9 / np.sqrt(2 * 1.01), 1 / np.sqrt(2)]
    np.testing.assert_allclose(row_cosines(x[:4], np.ones((4, 2))), want, rtol=1e-6)
    with pytest.raises(VitDeployError, match="at least 2"):
        knn_result(x[:1], ["a"])
    with pytest.raises(VitDeployError, match="k=6"):
        knn_result(x, classes, k=6)


def test_eval_of_an_embedding_model_is_knn_top1_and_its_cosine_to_fp32(embed, digits, tmp_path):
    from click.testing import CliRunner

    from vitdeploy.artifacts.metadata import read_onnx_metadata
    from vitdeploy.cli import main
    from vitdeploy.preprocess import Preprocessing, labelled_images, load_images

    out = tmp_path / "eval.json"
    r = CliRunner().invoke(main, ["eval", "-m", str(embed["int8"]), "--data", str(digits["test"]), "--reference",
                                  str(embed["fp32"]), "--json", str(out)])
    assert r.exit_code == 0, r.output
    got = json.loads(out.read_text())
    # the independent figures: torch's pooled output, scikit-learn's kNN
    files, classes = labelled_images(digits["test"])
    prep = Preprocessing.from_dict(read_onnx_metadata(embed["fp32"]).preprocessing)
    ref = _torch_embeddings(digits["checkpoint"], load_images(files, prep))
    want_fp32 = np.mean([p == c for p, c in zip(_sklearn_knn(ref, classes, 1), classes, strict=True)])
    assert got["task"] == "embedding" and got["k"] == 1 and got["size"] == EMBED_SIZE and got["total"] == len(files)
    assert got["reference"]["measure"] == "cosine"
    assert got["reference"]["reference_score"] == pytest.approx(want_fp32, abs=1 / len(files))
    assert want_fp32 > 0.9  # a trained model: the figure means something
    assert got["reference"]["mean"] >= 0.99 and got["reference"]["lowest"] > 0.9
    assert abs(got["knn_top1"] - want_fp32) <= 0.02  # INT8 keeps its neighbours
    assert "kNN top-1" in r.output and "cosine to" in r.output


def test_eval_refuses_a_reference_of_another_task_in_one_line(embed, digits, tmp_path):
    from click.testing import CliRunner

    from tests.test_hostile_files import good_metadata, tiny_onnx
    from vitdeploy.cli import main

    other = tiny_onnx(tmp_path / "clf.onnx", meta=good_metadata())
    r = CliRunner().invoke(main, ["eval", "-m", str(embed["fp32"]), "--data", str(digits["test"]), "--reference",
                                  str(other), "--no-verify"])
    assert r.exit_code == 1 and "classification model with 3 outputs" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    plain = tiny_onnx(tmp_path / "plain.onnx")  # no vitdeploy metadata at all
    r = CliRunner().invoke(main, ["eval", "-m", str(embed["fp32"]), "--data", str(digits["test"]), "--reference",
                                  str(plain), "--no-verify"])
    assert r.exit_code == 1 and "the reference carries no vitdeploy metadata" in r.output, r.output


def test_evaluate_folder_refuses_an_embedding_model(embed, digits):
    from vitdeploy.engines import open_runtime
    from vitdeploy.evaluate import evaluate_folder

    with open_runtime(embed["fp32"]) as rt, pytest.raises(VitDeployError, match="embedding model, not a classifier"):
        evaluate_folder(rt, digits["test"])


# -- predict: the vectors to a .npy, their norms printed -----------------------------------------------------
def test_predict_writes_an_embedding_models_vectors_and_prints_their_norms(embed, digits, tmp_path):
    from click.testing import CliRunner

    from vitdeploy.cli import main
    from vitdeploy.preprocess import Preprocessing, find_images, load_images

    files = find_images(digits["test"])[:3]
    out = tmp_path / "vectors.npy"
    r = CliRunner().invoke(main, ["predict", *map(str, files), "-m", str(embed["fp32"]), "--output", str(out)])
    assert r.exit_code == 0, r.output
    got = np.load(out)
    from vitdeploy.artifacts.metadata import read_onnx_metadata

    x = load_images(files, Preprocessing.from_dict(read_onnx_metadata(embed["fp32"]).preprocessing))
    want = _torch_embeddings(digits["checkpoint"], x)
    assert got.shape == (3, EMBED_SIZE) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-4)
    for f, v in zip(files, want, strict=True):
        line = next(line for line in r.output.splitlines() if line.startswith(f"{f}:"))
        assert line.endswith(f"norm {np.linalg.norm(v):.4f}"), line
    # normalized in the graph: unit norms; as JSON on stdout
    r = CliRunner().invoke(main, ["predict", *map(str, files), "-m", str(embed["norm"]), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["size"] == EMBED_SIZE and doc["normalized"] is True and doc["output"] is None
    assert [d["norm"] for d in doc["images"]] == pytest.approx([1.0] * 3, abs=1e-5)


def test_predict_output_must_be_a_npy_and_a_classifier_writes_its_logits(embed, digits, tmp_path):
    from click.testing import CliRunner

    from vitdeploy.cli import main
    from vitdeploy.engines import open_runtime
    from vitdeploy.preprocess import find_images

    files = find_images(digits["test"])[:2]
    r = CliRunner().invoke(main, ["predict", str(files[0]), "-m", str(embed["fp32"]), "--output", str(tmp_path / "x")])
    assert r.exit_code == 2 and "does not end in .npy" in r.output and not (tmp_path / "x").exists()
    out = tmp_path / "logits.npy"
    r = CliRunner().invoke(main, ["predict", *map(str, files), "-m", str(digits["checkpoint"]), "--output", str(out),
                                  "--top-k", "1"])
    assert r.exit_code == 0, r.output
    with open_runtime(digits["checkpoint"]) as rt:
        want = rt.infer(rt.preprocess([_image(f) for f in files]))
    np.testing.assert_allclose(np.load(out), want, atol=1e-5)
    top = [line.split(": ")[1].split()[0] for line in r.output.splitlines() if ": " in line and "running" not in line]
    assert top == [str(int(i)) for i in want.argmax(1)]


# -- serve: /v1/embed, the other task's routes, KServe v2 with the artifact's output -------------------------
def test_serve_answers_embed_and_kserve_v2_with_the_artifacts_output(embed, digits):
    import httpx

    from tests.http_server import Server
    from vitdeploy.engines import open_runtime
    from vitdeploy.preprocess import find_images

    png = find_images(digits["test"])[0]
    with open_runtime(embed["fp32"]) as rt, Server(rt, model_name="emb") as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        want = rt.infer(rt.preprocess([_image(png)]))[0]
        r = c.post("/v1/embed", content=png.read_bytes())
        assert r.status_code == 200, r.text
        doc = r.json()
        np.testing.assert_allclose(doc["embedding"], want, atol=1e-5)
        assert doc["size"] == EMBED_SIZE and doc["normalized"] is False
        assert doc["norm"] == pytest.approx(float(np.linalg.norm(want)), rel=1e-5)
        r = c.post("/v1/embed", content=png.read_bytes(), headers={"accept": "application/octet-stream"})
        assert r.headers["x-shape"] == f"1,{EMBED_SIZE}"
        np.testing.assert_allclose(np.frombuffer(r.content, "<f4"), want, atol=1e-5)
        # the classifier's routes: a 404 that names the route to use, before any body is read
        for route in ("/v1/classify", "/v1/logits"):
            r = c.post(route, content=png.read_bytes())
            assert r.status_code == 404 and "/v1/embed" in r.text and "task embedding" in r.text, (route, r.text)
        meta = c.get("/v2/models/emb").json()
        assert meta["outputs"] == [{"name": "embeddings", "datatype": "FP32", "shape": [-1, EMBED_SIZE]}]
        assert c.get("/v2/models/emb/config").json()["output"] == [
            {"name": "embeddings", "data_type": "TYPE_FP32", "dims": [EMBED_SIZE]}]
        x = np.random.default_rng(1).standard_normal((3, 3, 224, 224)).astype(np.float32)
        got = _kserve_infer(srv.url, "emb", x)
        np.testing.assert_allclose(got, rt.infer(x), atol=1e-5)


def _kserve_infer(url: str, model: str, x: np.ndarray) -> np.ndarray:
    """tritonclient.http, the names read from the model's metadata (as against Triton)."""
    import tritonclient.http as th

    with th.InferenceServerClient(url.removeprefix("http://")) as client:
        meta = client.get_model_metadata(model)
        inp = th.InferInput(meta["inputs"][0]["name"], list(x.shape), meta["inputs"][0]["datatype"])
        inp.set_data_from_numpy(x, binary_data=True)
        out = th.InferRequestedOutput(meta["outputs"][0]["name"], binary_data=True)
        return client.infer(model, [inp], outputs=[out]).as_numpy(meta["outputs"][0]["name"])


def test_a_classifier_server_answers_embed_with_a_404_naming_its_routes(serving_onnx):
    import httpx

    from tests.http_server import Server
    from vitdeploy.engines import open_runtime

    with open_runtime(serving_onnx) as rt, Server(rt) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/embed", content=b"\x89PNG")
        assert r.status_code == 404 and "/v1/classify" in r.text and "task classification" in r.text, r.text
        assert c.get("/v2/models/m").json()["outputs"][0] == {"name": "logits", "datatype": "FP32", "shape": [-1, 7]}


# -- every backend returns the artifact's output, whatever its name ------------------------------------------
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("artifact", ["fp32", "b2"])
def test_every_backend_returns_the_embedding_output(embed, digits, backend, artifact):
    from vitdeploy.engines import open_runtime

    if backend == "openvino":
        pytest.importorskip("openvino", reason="OpenVINO not installed: pip install 'vitdeploy[openvino]'")
    x = np.random.default_rng(2).standard_normal((3, 3, 224, 224)).astype(np.float32)  # 3 on a batch of 2: split
    with open_runtime(embed[artifact], backend=backend) as rt:
        assert rt.output_name == "embeddings" and rt.metadata.is_embedding
        np.testing.assert_allclose(rt.infer(x), _torch_embeddings(digits["checkpoint"], x), atol=1e-4)


# -- the C++ example: any output name and size, an embedding model's norms and golden cosines ----------------
OUTPUTS_CHECK = r"""
#include "outputs.h"
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>
// stdin: n size precision, then n*size float32 values of a and of b as text; stdout: per row norm(a) cosine(a, b),
// then the precision's floor
int main() {
  int n; size_t size; std::string precision;
  std::cin >> n >> size >> precision;
  std::vector<float> a(n * size), b(n * size);
  for (auto& v : a) std::cin >> v;
  for (auto& v : b) std::cin >> v;
  std::cout.precision(17);
  for (int i = 0; i < n; ++i)
    std::cout << vit::rowNorm(&a[i * size], size) << " " << vit::rowCosine(&a[i * size], &b[i * size], size) << "\n";
  std::cout << vit::minCosine(precision) << "\n";
}
"""


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "int8", "fp8"])
def test_cpp_example_norms_and_golden_cosines_match_numpy_and_the_tolerances(tmp_path, precision):
    import shutil
    import subprocess

    from vitdeploy.artifacts.golden import COMPUTE_TOLERANCES

    if shutil.which("c++") is None:
        pytest.skip("c++ not found: apt-get install g++")
    example = Path(__file__).resolve().parent.parent / "examples" / "cpp"
    (tmp_path / "check.cpp").write_text(OUTPUTS_CHECK)
    done = subprocess.run(["c++", "-std=c++17", "-Wall", f"-I{example}", str(tmp_path / "check.cpp"), "-o",
                           str(tmp_path / "check")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rng = np.random.default_rng(3)
    a = rng.standard_normal((5, 384)).astype(np.float32)
    b = (a + rng.standard_normal(a.shape).astype(np.float32) * np.float32([0, 1e-3, 0.1, 1, 10])[:, None])
    b[4] = 0  # a zero row scores 0
    text = f"5 384 {precision}\n" + " ".join(repr(float(v)) for v in [*a.ravel(), *b.ravel()])
    out = subprocess.run([str(tmp_path / "check")], input=text, capture_output=True, text=True, timeout=60).stdout
    rows = np.array([line.split() for line in out.splitlines()[:5]], float)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    np.testing.assert_allclose(rows[:, 0], np.linalg.norm(a64, axis=1), rtol=1e-12)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))
    np.testing.assert_allclose(rows[:4, 1], cos[:4], rtol=1e-12)
    assert rows[4, 1] == 0.0
    assert float(out.splitlines()[5]) == COMPUTE_TOLERANCES[precision]["min_cosine"]


CUDA_STUB = """#pragma once
#include <cstddef>
typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;
typedef int cudaError_t;
enum { cudaSuccess = 0 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2 };
cudaError_t cudaMalloc(void**, size_t);
cudaError_t cudaFree(void*);
cudaError_t cudaMemcpyAsync(void*, const void*, size_t, cudaMemcpyKind, cudaStream_t);
cudaError_t cudaStreamCreate(cudaStream_t*);
cudaError_t cudaStreamSynchronize(cudaStream_t);
cudaError_t cudaStreamDestroy(cudaStream_t);
const char* cudaGetErrorString(cudaError_t);
"""


@pytest.mark.parametrize("flavour", ["", "-DVITDEPLOY_TENSORRT_LEAN", "-DVITDEPLOY_TENSORRT_RTX"])
def test_cpp_example_compiles_in_every_flavour(tmp_path, flavour):
    """main.cpp against the vendored TensorRT and JSON headers and a stub of the few CUDA runtime names it calls
    (tests/test_cpp_example.py builds and runs it where CUDA's headers are installed)."""
    import shutil
    import subprocess

    if shutil.which("c++") is None:
        pytest.skip("c++ not found: apt-get install g++")
    root = Path(__file__).resolve().parent.parent
    (tmp_path / "cuda_runtime_api.h").write_text(CUDA_STUB)
    cmd = ["c++", "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", "-Wno-deprecated-declarations",
           *([flavour] if flavour else []), f"-I{tmp_path}", f"-I{root / 'third_party' / 'tensorrt' / 'include'}",
           f"-I{root / 'third_party' / 'nlohmann_json' / 'include'}", str(root / "examples" / "cpp" / "main.cpp")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


# -- compare, bench, inspect ---------------------------------------------------------------------------------
def test_compare_reports_each_inputs_cosine_for_embeddings(embed, tmp_path):
    from click.testing import CliRunner

    from vitdeploy.cli import main
    from vitdeploy.engines import open_runtime

    r = CliRunner().invoke(main, ["compare", str(embed["fp32"]), str(embed["int8"]), "--inputs", "4", "--atol", "10",
                                  "--json", str(tmp_path / "c.json")])
    assert r.exit_code == 0, r.output
    assert "cosine per input" in r.output and "top-1" not in r.output
    got = json.loads((tmp_path / "c.json").read_text())
    x = np.random.default_rng(0).standard_normal((4, 3, 224, 224), dtype=np.float32)  # compare's random inputs
    with open_runtime(embed["fp32"]) as a, open_runtime(embed["int8"]) as b:
        ya, yb = a.infer(x).astype(np.float64), b.infer(x).astype(np.float64)
    cos = (ya * yb).sum(1) / np.linalg.norm(ya, axis=1) / np.linalg.norm(yb, axis=1)
    assert got["task"] == "embedding"
    assert got["cosine_mean"] == pytest.approx(cos.mean(), abs=1e-6)
    assert got["cosine_lowest"] == pytest.approx(cos.min(), abs=1e-6)


def test_compare_refuses_two_tasks_in_one_line(embed, tmp_path):
    from click.testing import CliRunner

    from tests.test_hostile_files import good_metadata, tiny_onnx
    from vitdeploy.cli import main

    clf = tiny_onnx(tmp_path / "clf.onnx", meta=good_metadata())
    emb = tiny_onnx(tmp_path / "emb.onnx", meta=good_metadata(task="embedding", output_name="embeddings",
                                                              output_size=3, labels=[]), output_name="embeddings")
    r = CliRunner().invoke(main, ["compare", str(clf), str(emb)])
    assert r.exit_code == 1 and "A is a classifier and B an embedding model" in r.output, r.output


# -- a family's own embedding export (CLIP's and SigLIP's image towers) through predict, serve and compare ------
FAMILY_PRESETS = {"clip-test": 16, "siglip-test": 32}  # their output size: CLIP's projection's (hidden 32), SigLIP's


def _export_preset(name: str, out: Path, *args: str) -> Path:
    from click.testing import CliRunner

    from vitdeploy.cli import main

    r = CliRunner().invoke(main, ["export", "--model", name, "--seed", "0", "--task", "embedding", "--dynamic-batch",
                                  "--output", str(out), *args])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module", params=list(FAMILY_PRESETS))
def family_embed(request, tmp_path_factory) -> dict[str, Any]:
    """A tiny family preset exported by `vitdeploy export --task embedding`, in FP32 and FP16 (the same weights:
    random init, seed 0); clip-test's FP32 is the session's :func:`clip_embedding`."""
    root = tmp_path_factory.mktemp(request.param)
    fp32 = (request.getfixturevalue("clip_embedding") if request.param == "clip-test" else
            _export_preset(request.param, root / "fp32.onnx"))
    return {"name": request.param, "fp32": fp32,
            "fp16": _export_preset(request.param, root / "fp16.onnx", "--precision", "fp16")}


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    """A plain ONNX Runtime session's output for ``x`` (the reference)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]


def test_a_family_embedding_export_through_predict_serve_and_compare(family_embed, images, tmp_path):
    """CLIP's and SigLIP's image towers as `vitdeploy export` writes them: predict's .npy holds ONNX Runtime's
    vectors for the same images (their norms printed), /v1/embed answers the same vector at the artifact's width
    (CLIP's 16 is its projection's, not its hidden 32), and compare holds the FP16 export to FP32 by cosine."""
    import httpx
    from click.testing import CliRunner

    from tests.http_server import Server
    from vitdeploy.artifacts.metadata import read_onnx_metadata
    from vitdeploy.cli import main
    from vitdeploy.engines import open_runtime
    from vitdeploy.preprocess import Preprocessing, find_images, load_images
    from vitdeploy.verify import golden_batch

    fp32, fp16 = family_embed["fp32"], family_embed["fp16"]
    meta = read_onnx_metadata(fp32)
    size = meta.output_size
    assert (meta.task, meta.output_name, meta.config["hidden_size"], size) == (
        "embedding", "embeddings", 32, FAMILY_PRESETS[family_embed["name"]])
    files = find_images(images)[:3]
    want = _ort(fp32, load_images(files, Preprocessing.from_dict(meta.preprocessing)))
    r = CliRunner().invoke(main, ["predict", *map(str, files), "-m", str(fp32), "--output", str(tmp_path / "v.npy")])
    assert r.exit_code == 0, r.output
    got = np.load(tmp_path / "v.npy")
    assert got.shape == (3, size) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    for f, v in zip(files, want, strict=True):
        assert f"{f}: embedding of {size}, norm {np.linalg.norm(v):.4f}" in r.output, r.output
    png = next(f for f in files if f.suffix == ".png")
    with open_runtime(fp32) as rt, Server(rt, model_name="emb") as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/embed", content=png.read_bytes())
        assert r.status_code == 200, r.text
        assert r.json()["size"] == size == len(r.json()["embedding"]) and r.json()["normalized"] is False
        np.testing.assert_allclose(r.json()["embedding"], want[files.index(png)], atol=1e-5)
        assert c.get("/v2/models/emb").json()["outputs"] == [{"name": "embeddings", "datatype": "FP32",
                                                              "shape": [-1, size]}]
    r = CliRunner().invoke(main, ["compare", str(fp32), str(fp16), "--inputs", "3", "--atol", "0.05",
                                  "--json", str(tmp_path / "c.json")])
    assert r.exit_code == 0, r.output
    assert "cosine per input" in r.output and "top-1" not in r.output
    doc = json.loads((tmp_path / "c.json").read_text())
    h, w = meta.preprocessing["image_size"]  # compare's inputs: 3 random ones (seed 0), then the golden images
    x = np.concatenate([np.random.default_rng(0).standard_normal((3, 3, h, w), dtype=np.float32),
                        golden_batch(meta, meta.golden)])
    ya, yb = _ort(fp32, x).astype(np.float64), _ort(fp16, x).astype(np.float64)
    cos = (ya * yb).sum(1) / np.linalg.norm(ya, axis=1) / np.linalg.norm(yb, axis=1)
    assert doc["task"] == "embedding" and doc["pass"] and doc["samples"] == len(x)
    assert doc["cosine_lowest"] == pytest.approx(cos.min(), abs=1e-5) and cos.min() >= 0.999


class _OneRowTurned:
    """A runtime whose answers are the real ones except the first row of every call, turned a quarter away
    from itself (same norm, cosine 0): small against the batch's scale, so only a per-input cosine sees it."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def infer(self, batch):
        out = self.real.infer(batch).copy()
        v = out[0]
        turned = np.roll(v, 1) - (np.roll(v, 1) @ v) / (v @ v) * v  # orthogonal to v
        out[0] = turned * np.linalg.norm(v) / np.linalg.norm(turned)
        return out


def test_tune_guards_an_embedding_model_by_each_inputs_cosine(embed, tmp_path):
    import shutil

    from vitdeploy.engines import open_runtime
    from vitdeploy.engines.base import Runtime
    from vitdeploy.engines.plan import PathChoice
    from vitdeploy.tune import tune

    path = tmp_path / "e-int8.onnx"
    shutil.copy(embed["int8"], path)
    good = PathChoice("onnxruntime", {"threads": 1, "qdq_activations": "uint8"}, "good")
    bad = PathChoice("onnxruntime", {"threads": 2, "qdq_activations": "int8"}, "one input turned")

    class Turned(Runtime):
        def __init__(self, real):
            self.real, self.spec, self.metadata, self.backend = real, real.spec, real.metadata, real.backend

        def _run(self, batch):
            return _OneRowTurned(self.real).infer(batch)

        def close(self):
            self.real.close()

    def opener(choice):
        rt = open_runtime(path, backend=choice.backend, use_plan=False, **choice.options)
        return Turned(rt) if choice == bad else rt

    report = tune(path, batch=2, candidates=[bad, good], opener=opener, warmup=1, iters=3, min_seconds=0.0)
    status = {c.choice.label: c for c in report.candidates}
    assert status["one input turned"].status == "rejected", status["one input turned"].reason
    assert "cosine 0.00000" in status["one input turned"].reason
    assert status["good"].status == "ok" and status["good"].decisive == 0  # an embedding has no top-1
    assert report.plan.latency == good


def test_bench_and_inspect_take_an_embedding_model(embed, tmp_path):
    from click.testing import CliRunner

    from vitdeploy.cli import main

    r = CliRunner().invoke(main, ["inspect", str(embed["norm"])])
    assert r.exit_code == 0, r.output
    assert "embedding: embeddings of 64, L2-normalized" in r.output and "labels" not in r.output.split("model:")[-1]
    r = CliRunner().invoke(main, ["bench", str(embed["fp32"]), "--batch", "1,2", "--warmup", "0", "--iters", "2",
                                  "--threads", "1", "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "b.json").read_text())["results"]
    assert sorted(row["batch"] for row in rows) == [1, 2], rows
    assert all(row["status"] == "ok" and row["latency_ms"]["median"] > 0 and row["throughput"] > 0 for row in rows)


def test_a_load_test_checks_a_served_embedding_model_against_its_artifact(embed, tmp_path):
    from click.testing import CliRunner

    from tests.http_server import Server
    from vitdeploy.cli import main
    from vitdeploy.engines import open_runtime

    with open_runtime(embed["fp32"]) as rt, Server(rt, model_name="emb") as srv:
        args = ["bench", "--url", srv.url, "--model", "emb", "--concurrency", "1,2", "--requests", "8", "--rows", "4",
                "--processes", "1", "--json", str(tmp_path / "l.json")]
        r = CliRunner().invoke(main, [*args, "--reference", str(embed["fp32"])])
        assert r.exit_code == 0, r.output
        # the same load test against another model's vectors (unit length): refused, and it says why
        r = CliRunner().invoke(main, [*args, "--reference", str(embed["norm"])])
        assert r.exit_code == 1 and "is not the reference's" in r.output, r.output


# -- deploy: the task in the report, INT8 against FP32 by cosine and kNN top-1 (the real exporter) -----------
@pytest.fixture(scope="module")
def embed_bundle(digits, tmp_path_factory):
    from click.testing import CliRunner

    from tests.test_deploy import FAST, _subset
    from vitdeploy.cli import main

    root = tmp_path_factory.mktemp("embed_deploy")
    calib, data = _subset(digits["train"], root / "calib", 4), _subset(digits["test"], root / "test", 12)
    out = root / "bundle"
    r = CliRunner().invoke(main, ["deploy", "--model", str(digits["checkpoint"]), "--out", str(out), "--task",
                                  "embedding", "--precision", "fp32,int8", "--calib-dir", str(calib), "--data",
                                  str(data), *FAST])
    assert r.exit_code == 0, r.output
    return {"out": out, "data": data, "stdout": r.stdout, "report": json.loads((out / "report.json").read_text())}


def test_deploy_of_an_embedding_model_scores_it_by_knn_and_int8_by_its_cosine_to_fp32(embed_bundle, digits):
    from vitdeploy.preprocess import Preprocessing, labelled_images, load_images

    report, out = embed_bundle["report"], embed_bundle["out"]
    assert report["model"] == {"task": "embedding", "output_name": "embeddings", "output_size": EMBED_SIZE,
                               "normalized": False}
    rows = {r["precision"]: r for r in report["rows"] if r["kind"] == "onnx"}
    assert all(r["verdict"] == "passed" and r["measure"] == "kNN top-1" for r in rows.values()), rows
    # FP32's kNN top-1 as scikit-learn finds it on torch's embeddings of the same images
    files, classes = labelled_images(embed_bundle["data"])
    from vitdeploy import load_model

    x = load_images(files, Preprocessing.from_config(load_model(digits["checkpoint"]).config))
    want = np.mean([p == c for p, c in zip(_sklearn_knn(_torch_embeddings(digits["checkpoint"], x), classes, 1),
                                           classes, strict=True)])
    assert rows["fp32"]["accuracy"] == pytest.approx(want, abs=1 / len(files)) and want > 0.8
    assert rows["fp32"]["vs_fp32"] is None
    vs = rows["int8"]["vs_fp32"]
    assert vs["measure"] == "cosine" and vs["mean"] >= 0.99 and vs["lowest"] > 0.9
    assert vs["reference_score"] == rows["fp32"]["accuracy"]
    assert rows["int8"]["accuracy"] >= rows["fp32"]["accuracy"] - 0.05
    assert all("embedding" in im and im["embedding"]["size"] == EMBED_SIZE and not im["top5"]
               for g in report["golden"] for im in g["images"])
    html = (out / "report.html").read_text()
    assert "an embedding model: embeddings of 64" in html and "<th>kNN top-1</th>" in html
    assert "<th>mean cosine to FP32</th>" in html and f"{vs['mean']:.4f}" in html
    cfg = (out / "triton" / "digits_vit-int8" / "config.pbtxt").read_text()
    assert 'name: "embeddings"' in cfg and "dims: 64" in cfg and "label_filename" not in cfg
    assert "cos to fp32" in embed_bundle["stdout"]


def test_an_embedding_bundles_row_commands_reproduce_its_figures(embed_bundle):
    import shlex

    from click.testing import CliRunner

    from vitdeploy.cli import main

    row = next(r for r in embed_bundle["report"]["rows"] if r["precision"] == "int8")
    export = next(c for c in row["commands"] if c.startswith("vitdeploy export"))
    assert "--task embedding" in export
    command = next(c for c in row["commands"] if c.startswith("vitdeploy eval"))
    r = CliRunner().invoke(main, [*shlex.split(command)[1:], "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    # eval recomputes both models' outputs in a run of its own (its own batches and threads), and the INT8
    # model's cosines then differ in the sixth digit (seen: 3e-6 apart): the figure is reproduced to 1e-4
    assert got["knn_top1"] == row["accuracy"]
    assert got["reference"]["mean"] == pytest.approx(row["vs_fp32"]["mean"], abs=1e-4)


def test_a_tensorrt_rtx_engine_of_an_embedding_model_keeps_its_output_and_task(embed, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX not installed: pip install 'vitdeploy[tensorrt-rtx]'")
    from tests.test_triton import _parse_pbtxt
    from vitdeploy.engines.tensorrt.build import BuildOptions, build_engine
    from vitdeploy.engines.tensorrt.sidecar import EngineSidecar
    from vitdeploy.serving.triton import write_triton_repo

    engine = tmp_path / "embed.engine"
    build_engine(embed["fp32"], engine, BuildOptions(flavour="rtx", compute_capabilities=["sm89"], max_batch=4))
    side = EngineSidecar.read(engine)
    assert (side.output.name, side.output.shape) == ("embeddings", [-1, EMBED_SIZE])
    assert (side.model["task"], side.model["output_size"]) == ("embedding", EMBED_SIZE)
    cfg = _parse_pbtxt(write_triton_repo(engine, tmp_path / "repo", triton_backend="python").config)
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("embeddings", [EMBED_SIZE])]


def test_vitdeploy_serve_gets_ready_on_a_real_embedding_export_and_embeds(embed_bundle):
    """The exporter's own embedding artifact (golden set and all) through a real `vitdeploy serve` process:
    ready once its golden embeddings pass, then /v1/embed answers as ONNX Runtime does here."""
    import httpx

    from tests.http_server import ServeProcess
    from vitdeploy.engines import open_runtime
    from vitdeploy.preprocess import find_images

    onnx = embed_bundle["out"] / "onnx" / "digits_vit-fp32.onnx"
    png = find_images(embed_bundle["data"])[0]
    with open_runtime(onnx) as rt:
        assert rt.metadata.golden is not None and rt.metadata.golden.task == "embedding"
        want = rt.infer(rt.preprocess([_image(png)]))[0]
    with ServeProcess(onnx, "--max-batch", "4") as srv:
        ready = httpx.get(srv.url + "/readyz", timeout=10).json()
        assert ready["status"] == "ready" and ready.get("verified", True) is True, ready
        r = httpx.post(srv.url + "/v1/embed", content=png.read_bytes(), timeout=30)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["embedding"], want, atol=1e-5)


def test_eval_of_a_classifier_against_its_fp32_reference_is_top1_agreement(digits, tmp_path):
    from click.testing import CliRunner

    from tests.test_deploy import _subset, _torch_accuracy
    from vitdeploy.cli import main
    from vitdeploy.exporters import ExportOptions, export_onnx

    data = _subset(digits["test"], tmp_path / "test", 8)
    fp16 = export_onnx(digits["checkpoint"], tmp_path / "d-fp16.onnx",
                       options=ExportOptions(dynamic_batch=True, precision="fp16")).path
    r = CliRunner().invoke(main, ["eval", "-m", str(fp16), "--data", str(data), "--reference",
                                  str(digits["checkpoint"]), "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    torch_top1 = _torch_accuracy(digits["checkpoint"], data)
    assert got["task"] == "classification" and got["measure"] == "top-1"
    assert got["reference"]["measure"] == "top-1 agreement" and got["reference"]["mean"] >= 0.98
    assert got["reference"]["reference_score"] == pytest.approx(torch_top1, abs=1e-9)  # torch's own top-1
    assert abs(got["accuracy"] - torch_top1) <= 1 / got["total"]


def test_the_torch_runtime_of_an_embedding_checkpoint_says_so_and_answers_as_its_export(embed, digits, tmp_path):
    """A checkpoint saved as an embedding model runs on the torch backend with the metadata the exporter
    writes (task, output name and size), so eval, predict and serve treat it as they treat its ONNX."""
    from vitdeploy import save_model
    from vitdeploy.checkpoints import resolve
    from vitdeploy.engines import open_runtime

    ckpt = tmp_path / "embed.safetensors"
    save_model(resolve(str(digits["checkpoint"]), None, task="embedding").model, ckpt)
    x = np.random.default_rng(4).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with open_runtime(ckpt, backend="torch") as rt, open_runtime(embed["fp32"]) as ref:
        meta = rt.metadata
        assert (meta.task, meta.output_size, meta.labels, rt.output_name) == ("embedding", EMBED_SIZE, [],
                                                                             "embeddings")
        np.testing.assert_allclose(rt.infer(x), ref.infer(x), atol=1e-4)
