"""The bundle and its stages: export -> build -> verify -> accuracy -> tune -> bench -> triton -> report.

Every stage works in units, one per artifact. A unit's record (kept in ``report.json``) holds the hash
of its inputs (the source checkpoint, the options, the bytes of the files the stage before wrote, the
library versions, and the machine where the result depends on it) and the hashes of the files it
wrote. A later run whose unit has the same inputs, and whose files are still there unchanged, reuses
the record instead of redoing the work ("skipped"). So a changed calibration folder changes the INT8
export's inputs only, and from there only the units downstream of the INT8 files.

The records are written to ``manifest.json`` after every unit, so a run stopped half-way (Ctrl-C, a
crash) keeps what it finished, and into ``report.json`` at the end.

Bundle layout: ``onnx/`` (the ONNX files, their tune plans and first-load verdicts), ``engines/``
(TensorRT engines and sidecars), ``triton/`` (a Triton model repository), ``manifest.json``,
``report.json``, ``report.html``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vitdeploy import __version__
from vitdeploy.errors import VitDeployError

REPORT_FORMAT = "vitdeploy-deploy/1"
PRECISIONS = ("fp32", "fp16", "int8", "fp8")
DONE, SKIPPED, FAILED, NOT_POSSIBLE = "done", "skipped", "failed", "not possible"
REPORT_JSON, REPORT_HTML = "report.json", "report.html"
MANIFEST = "manifest.json"  # every unit's record, rewritten after each unit (an interrupted run keeps its work)
BUNDLE_FOLDERS = ("onnx", "engines", "triton")


@dataclass
class DeployOptions:
    precisions: tuple[str, ...] = ("fp32", "fp16")
    calib_dir: Path | None = None
    calib_samples: int = 512
    data: Path | None = None  # DIR/CLASS/image files: accuracy of every artifact
    compute_capabilities: tuple[str, ...] = ()  # TensorRT-RTX targets (sm89, ...)
    trt: str = "auto"  # auto | tensorrt | rtx
    max_batch: int = 32  # the engines' profile maximum and Triton's max_batch_size
    config: str | None = None  # config.json or preset for bare weight files
    seed: int | None = None  # random-init seed for a preset
    bench_batches: tuple[int, ...] = (1, 8)
    bench_warmup: int = 10
    bench_iters: int = 50
    tune_batch: int = 8
    tune_iters: int = 10
    tune_seconds: float = 0.5
    eval_batch: int = 32
    task: str | None = None  # classification | embedding; None: what the checkpoint is
    normalize: bool = False  # embeddings L2-normalized in the graph

    def check(self) -> None:
        """A one-line VitDeployError for options that cannot work, before any work is done."""
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or not self.precisions:
            raise VitDeployError(f"--precision {','.join(self.precisions) or '(none)'}: choose from "
                                 f"{', '.join(PRECISIONS)} (comma-separated)")
        lossy = [p for p in self.precisions if p in ("int8", "fp8")]
        if lossy and self.calib_dir is None:
            raise VitDeployError(f"--precision {lossy[0]} needs --calib-dir DIR with calibration images")
        for what, folder in (("--calib-dir", self.calib_dir), ("--data", self.data)):
            if folder is not None and not Path(folder).is_dir():
                raise VitDeployError(f"{what} {folder} is not a folder of images")
        if self.max_batch < 1 or any(b < 1 for b in self.bench_batches) or self.tune_batch < 2:
            raise VitDeployError("batch sizes must be positive (the tune batch at least 2)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("calib_dir", "data"):
            d[k] = str(d[k]) if d[k] is not None else None
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass
class Artifact:
    kind: str  # onnx | engine
    precision: str
    path: Path
    onnx: Path | None = None  # an engine's ONNX
    flavour: str = ""  # an engine's TensorRT flavour
    targets: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class Work:
    """What a unit's work returns: its result (JSON), the files it wrote (hashed: a change redoes the
    unit) and files that must exist but that later stages may update (an engine's sidecar)."""

    result: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    present: list[Path] = field(default_factory=list)


class NotPossible(VitDeployError):
    """A unit this machine cannot do (no TensorRT, an engine without its GPU): recorded with the reason."""


@dataclass
class Bundle:
    """One deploy run: where it writes, what it was asked, what the last run recorded and this one did."""

    source: str
    out: Path
    options: DeployOptions
    previous: dict[str, dict[str, Any]]
    log: Callable[[str], None]
    progress: bool = False
    source_key: dict[str, Any] = field(default_factory=dict)
    units: dict[str, dict[str, Any]] = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)  # what report.json holds, once written
    started: float = field(default_factory=time.perf_counter)
    _hashes: dict[tuple[str, int, int], str] = field(default_factory=dict)

    def rel(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.out.resolve()).as_posix()

    def sha(self, path: Path) -> str:
        """sha256 of a file, computed once per run for the same path, size and mtime."""
        from vitdeploy.io import sha256_file

        st = Path(path).stat()
        key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = sha256_file(path)
        return self._hashes[key]

    def record(self, stage: str, name: str) -> dict[str, Any] | None:
        return self.units.get(f"{stage}:{name}")

    def stem(self) -> str:
        text = self.source.rstrip("/")
        base = Path(text).stem if Path(text).suffix in (".safetensors", ".pth", ".pt", ".bin") else Path(text).name
        return re.sub(r"[^A-Za-z0-9_-]", "_", base) or "model"

    def onnx_files(self) -> list[Artifact]:
        return [a for a in self.artifacts if a.kind == "onnx"]


def model_name(path: Path) -> str:
    """The artifact's Triton model name (a folder and a URL part)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).stem)


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:400] or type(e).__name__


def hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _outputs_hold(b: Bundle, outputs: Any) -> bool:
    """Every file a record names is still there, inside the bundle, with the bytes it had."""
    if not isinstance(outputs, dict):
        return False
    root = b.out.resolve()
    for rel, sha in outputs.items():
        p = (b.out / str(rel)).resolve()
        if not p.is_relative_to(root) or not p.is_file() or (sha is not None and b.sha(p) != sha):
            return False
    return True


def run_unit(b: Bundle, stage: str, name: str, key: dict[str, Any], work: Callable[[], Work]) -> dict[str, Any]:
    """Reuse the last run's record of this unit when its inputs and files are unchanged; else do the work.
    A VitDeployError becomes a failed unit (the others go on); :class:`NotPossible`, a unit not possible here."""
    uid = f"{stage}:{name}"
    key_hash = hash_json(key)
    prev = b.previous.get(uid)
    if (prev is not None and prev.get("key") == key_hash and prev.get("status") in (DONE, SKIPPED)
            and _outputs_hold(b, prev.get("outputs"))):
        record = {**prev, "status": SKIPPED, "seconds": 0.0}
    else:
        t0 = time.perf_counter()
        try:
            done = work()
            outputs: dict[str, str | None] = {b.rel(p): b.sha(p) for p in done.files}
            outputs.update({b.rel(p): None for p in done.present})
            record = {"status": DONE, "result": done.result, "outputs": outputs,
                      "work_seconds": round(time.perf_counter() - t0, 3)}
        except NotPossible as e:
            record = {"status": NOT_POSSIBLE, "reason": one_line(e)}
        except VitDeployError as e:
            record = {"status": FAILED, "reason": one_line(e)}
        record.update(seconds=round(time.perf_counter() - t0, 3))
    record.update(stage=stage, unit=name, key=key_hash)
    b.units[uid] = record
    write_manifest(b)
    reason = f": {record['reason']}" if record.get("reason") else ""
    took = f" in {record['seconds']:.1f} s" if record["status"] == DONE else ""
    b.log(f"  {stage:<8} {name}: {record['status']}{took}{reason}")
    return record


# --- fingerprints -------------------------------------------------------------------------------------
def files_sha256(b: Bundle, root: Path, files: list[Path]) -> str:
    """One hash over the files' names (relative to ``root``) and contents."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + b.sha(f).encode())
    return h.hexdigest()


def source_key(b: Bundle) -> dict[str, Any]:
    """The checkpoint's identity: the bytes of every file loading it reads (a weights file and the
    config.json beside it, a folder's files, a Hub id's resolved snapshot and its commit); for a preset,
    the name (and seed)."""
    from vitdeploy.checkpoints import SourceFiles, source_files

    opts = b.options
    try:
        src = source_files(b.source, opts.config)
    except VitDeployError:  # a Hub id that cannot be resolved: the export stage fails with the reason
        src = SourceFiles(None, [])
    config_file = Path(opts.config) if opts.config and Path(opts.config).is_file() else None
    files = files_sha256(b, src.root, src.files) if src.root is not None and src.files else None
    return {"source": b.source if not files else None, "files": files, "revision": src.revision,
            "config": opts.config if config_file is None else None,
            "config_sha256": b.sha(config_file) if config_file else None, "seed": opts.seed}


def folder_key(b: Bundle, folder: Path | None) -> str | None:
    from vitdeploy.preprocess import find_images

    if folder is None:
        return None
    return files_sha256(b, Path(folder), find_images(folder))


def library_key() -> dict[str, Any]:
    from vitdeploy import sysinfo

    return {"vitdeploy": __version__, **sysinfo.library_versions()}


def machine_key() -> dict[str, Any]:
    from vitdeploy import sysinfo

    return {"cpu": sysinfo.cpu_model(), "flags": sysinfo.cpu_flags(), "cpus": sysinfo.usable_cpus(),
            "gpus": sysinfo.gpus()}


def write_manifest(b: Bundle) -> None:
    """The records so far, this run's over the last run's (those this run has not reached yet are kept)."""
    from vitdeploy.io import atomic_write_bytes

    units = {**b.previous, **b.units}
    atomic_write_bytes(b.out / MANIFEST, json.dumps({"format": REPORT_FORMAT, "units": units}).encode())


def read_previous(path: Path) -> dict[str, dict[str, Any]]:
    """The unit records of the last run's manifest; nothing (all is redone) when it is missing or not ours."""
    import logging

    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
        units = data.get("units", {}) if data.get("format") == REPORT_FORMAT else {}
        return {k: v for k, v in units.items() if isinstance(v, dict)}
    except (OSError, ValueError, AttributeError, RecursionError) as e:  # nested too deep: not ours either
        logging.getLogger(__name__).warning("ignoring %s (%s): every stage runs again", path,
                                            type(e).__name__ if isinstance(e, RecursionError) else e)
        return {}


def refuse_links(out: Path) -> None:
    """A VitDeployError naming the first symbolic link among the bundle's parts (``onnx/``, ``engines/``,
    ``triton/``, the reports, and everything under those folders): deploy writes and cleans only inside
    ``--out``, and a link would take its writes (and its removal of stale files) elsewhere."""
    if not out.is_dir():
        return
    for name in (*BUNDLE_FOLDERS, MANIFEST, REPORT_JSON, REPORT_HTML):
        part = out / name
        inner = part.rglob("*") if part.is_dir() and not part.is_symlink() else iter(())
        link = next((p for p in (part, *inner) if p.is_symlink()), None)
        if link is not None:
            raise VitDeployError(f"{link} is a symbolic link (to {os.readlink(link)}): a bundle's parts must be "
                                 f"inside --out {out}; remove the link, or deploy into another --out")


# --- the run ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Bundle], None]
    what: str


@dataclass
class DeployResult:
    out: Path
    report: dict[str, Any]  # what report.json holds
    seconds: float

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [u for u in self.report["units"].values() if u["status"] == FAILED]

    def summary_table(self, width: int | None = None, wide: bool = False) -> Any:
        from vitdeploy.deploy.report import summary_table

        return summary_table(self.report, width, wide)

    def summary_lines(self) -> list[str]:
        from vitdeploy.deploy.report import summary_lines

        return summary_lines(self.report, self.out)


def deploy(source: str | Path, out: str | Path, options: DeployOptions | None = None,
           log: Callable[[str], None] | None = None, progress: bool = False) -> DeployResult:
    """Write (or bring up to date) the bundle for ``source`` in ``out``; see the module docstring."""
    from vitdeploy.deploy.stages import STAGES

    opts = options or DeployOptions()
    opts.check()
    if opts.compute_capabilities or opts.trt != "auto":  # engines asked for: refuse targets no TensorRT can build
        from vitdeploy.engines.tensorrt.build import BuildOptions, check_build_targets

        check_build_targets(BuildOptions(flavour=opts.trt, compute_capabilities=list(opts.compute_capabilities)))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VitDeployError(f"--out {out} is a file: name a folder for the bundle")
    refuse_links(out)
    out.mkdir(parents=True, exist_ok=True)
    b = Bundle(str(source), out, opts, read_previous(out / MANIFEST), log or (lambda _m: None), progress)
    b.source_key = source_key(b)
    for stage in STAGES:
        b.log(f"[{stage.name}] {stage.what}")
        entry: dict[str, Any] = {"name": stage.name, "seconds": 0.0}
        b.stages.append(entry)  # the report stage writes this list, its own entry included
        started, before = time.perf_counter(), set(b.units)
        stage.run(b)
        new = [u for k, u in b.units.items() if k not in before]
        entry.update(seconds=round(time.perf_counter() - started, 3),
                     **{s: sum(u["status"] == s for u in new) for s in (DONE, SKIPPED, FAILED, NOT_POSSIBLE)})
    return DeployResult(out, b.report, time.perf_counter() - b.started)
