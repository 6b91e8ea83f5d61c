"""The ViT family (DeiT, DINOv2, CLIP and SigLIP image towers) and its two tasks, against HF transformers."""

from __future__ import annotations

import json

import pytest

from tests.test_hostile_files import good_metadata, tiny_onnx
from vitdeploy.errors import VitDeployError


# -- the task in the artifact's metadata -----------------------------------------------------------------
def test_an_artifact_without_a_task_reads_as_a_classifier(tmp_path):
    from vitdeploy.engines import open_runtime

    with open_runtime(tiny_onnx(tmp_path / "m.onnx", meta=good_metadata())) as rt:
        meta = rt.metadata
    assert (meta.task, meta.output_name, meta.output_size, meta.normalized) == ("classification", "logits", 3, False)
    assert not meta.is_embedding


def test_an_embedding_task_round_trips_through_onnx_and_json(tmp_path):
    from vitdeploy.artifacts.metadata import ArtifactMetadata
    from vitdeploy.engines import open_runtime

    meta = good_metadata(task="embedding", output_name="embeddings", output_size=3, normalized=True, labels=[])
    with open_runtime(tiny_onnx(tmp_path / "m.onnx", meta=meta, output_name="embeddings")) as rt:
        read = rt.metadata
    assert (read.task, read.output_name, read.output_size, read.normalized) == ("embedding", "embeddings", 3, True)
    assert read.is_embedding and "task" not in read.extra
    again = ArtifactMetadata.from_props(read.to_props())
    assert again == read == ArtifactMetadata.from_dict(json.loads(json.dumps(read.to_dict())))


TASK_CASES = {
    "unknown task": ({"task": "detection"}, "task"),
    "task not str": ({"task": 1}, "task"),
    "output name": ({"output_name": "probs"}, "output_name"),
    "embedding named logits": ({"task": "embedding", "output_name": "logits", "output_size": 3}, "output_name"),
    "embedding without size": ({"task": "embedding", "output_name": "embeddings"}, "output_size"),
    "size zero": ({"task": "embedding", "output_size": 0}, "output_size"),
    "size huge": ({"task": "embedding", "output_size": 1 << 40}, "output_size"),
    "size float": ({"task": "embedding", "output_size": 3.0}, "output_size"),
    "size not JSON": ({"task": "embedding", "output_size": "three"}, "output_size"),
    "size bool": ({"task": "embedding", "output_size": True}, "output_size"),
    "size vs labels": ({"output_size": 4}, "output_size"),
    "normalized str": ({"task": "embedding", "output_size": 3, "normalized": "yes"}, "normalized"),
    "normalized int": ({"task": "embedding", "output_size": 3, "normalized": 1}, "normalized"),
    "normalized logits": ({"normalized": True}, "normalized"),
}


@pytest.mark.parametrize("case", TASK_CASES)
def test_a_bad_task_is_refused_in_one_line_when_the_artifact_opens(tmp_path, case):
    from vitdeploy.engines import open_runtime

    over, field = TASK_CASES[case]
    onnx_path = tiny_onnx(tmp_path / "m.onnx", meta=good_metadata(**over))
    with pytest.raises(VitDeployError, match=field) as e:
        open_runtime(onnx_path).close()
    assert "\n" not in str(e.value) and "re-export" in str(e.value), str(e.value)
