"""An export killed (SIGKILL) at any point leaves the target as the old file set or the new one.

The target is an ONNX with its weights in an external ``.data`` file (the > 2 GB layout, forced on a
tiny model), so every trial exercises the multi-file publication (vitdeploy.io.publish_onnx).
Each trial runs ``vitdeploy.exporters.export_onnx`` in a child process and kills it:
- at every ``os.replace`` of the publication in turn (the child kills itself just before it), and
- at random moments during the export (after the imports, uniform over one export's duration).
Then the target must load with ONNX Runtime and give exactly the logits of the old or of the new
weights, with every data file it references present.

The default suite runs the deterministic points and a few random ones; the ``slow`` test runs 20
random trials; as a script: ``python tests/test_atomic.py --trials 20`` (prints the tally).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            image_size=64, patch_size=32, num_labels=3)
X = np.random.default_rng(0).standard_normal((1, 3, 64, 64), dtype=np.float32)


OPTIONS = dict(external_data_bytes=1, verify_inputs=2)


def _child(checkpoint: str, target: str, kill_at_replace: int) -> None:
    import onnx  # noqa: F401 - imported before "ready", so random kills land in the export itself
    import onnxruntime  # noqa: F401
    import torch  # noqa: F401

    from vitdeploy.exporters import ExportOptions, export_onnx

    if kill_at_replace >= 0:
        real, calls = os.replace, [0]

        def replace(src, dst):  # the child dies just before its k-th rename into the target's folder
            if Path(dst).resolve().is_relative_to(Path(target).resolve().parent):
                if calls[0] == kill_at_replace:
                    os.kill(os.getpid(), signal.SIGKILL)
                calls[0] += 1
            return real(src, dst)

        os.replace = replace
    print("ready", flush=True)
    export_onnx(checkpoint, target, options=ExportOptions(**OPTIONS))
    print("done", flush=True)


def _spawn(checkpoint: Path, target: Path, kill_at_replace: int = -1) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, "--child", str(checkpoint), str(target), str(kill_at_replace)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )


def _wait_ready(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    assert line.strip() == "ready", f"child did not start: {line!r}"


def snapshot(target: Path) -> str | None:
    """What a reader reads: the SHA-256 over the graph file and every data file it references (name and
    bytes), or None when there is no target. Raises FileNotFoundError when a referenced file is missing."""
    from vitdeploy.io import onnx_external_files

    if not target.exists():
        return None
    h = hashlib.sha256(target.read_bytes())
    for f in onnx_external_files(target):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def logits(target: Path) -> np.ndarray | None:
    """The target's output, or None when there is no target; raises if it is there but broken."""
    import onnxruntime as ort

    from vitdeploy.exporters import read_onnx_metadata
    from vitdeploy.io import onnx_external_files

    if not target.exists():
        return None
    assert all(f.is_file() for f in onnx_external_files(target)), "a referenced data file is missing"
    read_onnx_metadata(target)
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": X})[0]


class Trials:
    """Two checkpoints (A, B); each trial exports the one not at the target, killed somewhere."""

    def __init__(self, root: Path) -> None:
        from vitdeploy import save_model
        from vitdeploy.checkpoints import build_model
        from vitdeploy.config import ViTConfig

        self.root = root
        self.ckpt = {}
        for name, seed in (("A", 0), ("B", 1)):
            self.ckpt[name] = root / f"{name}.safetensors"
            save_model(build_model(ViTConfig(**TINY), seed=seed), self.ckpt[name])
        self.target = root / "out" / "model.onnx"
        self.target.parent.mkdir()
        self.refs: dict[str, np.ndarray] = {}
        self.digests: dict[str, str | None] = {}
        self.seconds = 0.0
        for name in ("B", "A"):  # one full export of each: references, and how long one takes
            t0 = time.perf_counter()
            self._export(name)
            self.seconds = max(self.seconds, time.perf_counter() - t0)
            self.refs[name] = logits(self.target)
            self.digests[name] = snapshot(self.target)
        assert not np.array_equal(self.refs["A"], self.refs["B"]) and self.digests["A"] != self.digests["B"]
        self.current = "A"
        self.tally: dict[str, int] = {"old": 0, "new": 0}

    def _export(self, name: str) -> None:
        from vitdeploy.exporters import ExportOptions, export_onnx

        export_onnx(self.ckpt[name], self.target, options=ExportOptions(**OPTIONS))

    def state(self) -> str:
        """'A' or 'B' when the files a reader finds are, byte for byte, the complete set of that export
        (and load to its logits); otherwise what is wrong, in words."""
        try:
            digest = snapshot(self.target)
        except FileNotFoundError as e:
            return f"torn: a referenced data file is missing ({Path(e.filename).name})"
        name = next((n for n, d in self.digests.items() if d == digest), None)
        if name is None:
            return "no target" if digest is None else f"torn: the files are neither export's set ({digest[:12]})"
        out = logits(self.target)
        if not np.array_equal(out, self.refs[name]):
            return f"the files are {name}'s, but they load to other logits"
        return name

    def trial(self, kill_at_replace: int = -1, delay: float | None = None) -> str:
        new = "B" if self.current == "A" else "A"
        proc = _spawn(self.ckpt[new], self.target, kill_at_replace)
        _wait_ready(proc)
        if delay is not None:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=300)
        self.killed = proc.returncode == -signal.SIGKILL
        now = self.state()
        if now not in self.refs:
            return now  # a torn or missing target: the caller's assertion shows it
        self.tally["new" if now == new else "old"] += 1
        self.current = now
        return "new" if now == new else "old"

    def clean_export(self) -> list[str]:
        """A full export after the kills: exactly the target and the one data file it references (the
        killed exports' staging folders and unreferenced data files are gone too)."""
        self._export("A")
        assert np.array_equal(logits(self.target), self.refs["A"])
        assert snapshot(self.target) == self.digests["A"]  # an export is byte for byte repeatable
        return sorted(p.name for p in self.target.parent.iterdir())


@pytest.fixture(scope="module")
def trials(tmp_path_factory) -> Trials:
    return Trials(tmp_path_factory.mktemp("atomic"))


def test_killed_at_each_rename_leaves_old_or_new(trials):
    # renames into the target's folder (the staged files', the data file to its content-hashed name,
    # the data file into place, the graph into place): killed before each of them in turn, the old set
    # stays (the graph's rename is the switch), until an export gets past them all and the new set is
    # there; the clean export after it leaves exactly one set
    outcomes = []
    for k in range(20):
        outcomes.append(trials.trial(kill_at_replace=k))
        if not trials.killed:
            break
    assert len(outcomes) >= 4 and outcomes == ["old"] * (len(outcomes) - 1) + ["new"], outcomes
    files = trials.clean_export()
    assert len(files) == 2 and files[0] == "model.onnx" and files[1].startswith("model.onnx.")


def test_killed_at_random_moments_leaves_old_or_new(trials):
    rng = random.Random(0)
    outcomes = [trials.trial(delay=rng.uniform(0, trials.seconds)) for _ in range(2)]
    assert [o for o in outcomes if o not in ("old", "new")] == []
    assert len(trials.clean_export()) == 2


@pytest.mark.slow
def test_killed_at_20_random_moments(trials):
    rng = random.Random(1)
    outcomes = [trials.trial(delay=rng.uniform(0, trials.seconds * 1.1)) for _ in range(20)]
    # each outcome is what a reader found after the kill, by content: the old set, the new set, or words
    assert [o for o in outcomes if o not in ("old", "new")] == []
    assert len(trials.clean_export()) == 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("CHECKPOINT", "TARGET", "KILL_AT_REPLACE"))
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], int(args.child[2]))
        return
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        t = Trials(Path(d))
        rng = random.Random(args.seed)
        delays = [rng.uniform(0, t.seconds * 1.1) for _ in range(args.trials)]
        for i, delay in enumerate(delays):
            print(f"trial {i + 1:2d}: killed {delay:5.2f} s into a {t.seconds:.2f} s export -> {t.trial(delay=delay)}")
        print(f"{args.trials} random SIGKILLs: target was the old set {t.tally['old']}x, the new set "
              f"{t.tally['new']}x, broken 0x; after a clean export: {t.clean_export()}")


if __name__ == "__main__":
    main()


def test_publish_file_set_renames_the_entry_file_last(tmp_path, monkeypatch):
    """The generic primitive (engine + sidecar + cache use it too): companions first, the entry file
    last, stale companions removed only after. remove_dead_staging: the staging folders of dead
    writers on this host go, a live writer's stays."""
    import socket

    from vitdeploy import io as vio

    target = tmp_path / "model.engine"
    (tmp_path / "model.old.cache").write_bytes(b"old")
    host = socket.gethostname().replace(".", "_")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".vitdeploy-model.engine.{host}.{dead.pid}.abc").mkdir()
    live = tmp_path / f".vitdeploy-model.engine.{host}.{os.getpid()}.def"
    live.mkdir()
    renames = []
    real = os.replace
    monkeypatch.setattr(vio.os, "replace", lambda a, b: (renames.append(Path(b).name), real(a, b)))
    with vio.staging_dir(target) as d:
        for name in ("model.engine", "model.json", "model.new.cache"):
            (d / name).write_bytes(name.encode())
        vio.publish_file_set({tmp_path / n: d / n for n in ("model.engine", "model.json", "model.new.cache")},
                             last=target, stale=[tmp_path / "model.old.cache"])
    assert renames == ["model.json", "model.new.cache", "model.engine"]
    vio.remove_dead_staging(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, "model.engine", "model.json", "model.new.cache"])
    with pytest.raises(ValueError, match="not one of the files"):
        vio.publish_file_set({tmp_path / "a": tmp_path / "b"}, last=tmp_path / "c")
