"""An artifact against its own golden set, on the runtime that will run it (``vitdeploy verify``).

Every exported artifact carries a golden set (:mod:`vitdeploy.artifacts.golden`): encoded images, the
logits torch FP32 gave for them and the tolerance of the artifact's precision. Checking it runs the
whole path a deployment runs: decode, the preprocessing in the artifact's metadata, the runtime.

Where it runs:
- ``vitdeploy verify ARTIFACT``: on demand, a row per image.
- ``vitdeploy build``: the engine just built, when it can run here; otherwise the sidecar records why not.
- First load (:func:`open_verified`, used by ``predict``, ``bench``, ``eval``, ``serve`` and the Triton
  Python model): once per artifact, runtime, library versions and CPU or GPU and driver, the verdict
  cached beside the artifact in ``<stem>.verified.json``. A failed verdict refuses to run.

This module sits above the engines (it opens runtimes), so the engines never import it: callers that
want the check open through :func:`open_verified` instead of ``open_runtime``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitdeploy.artifacts.golden import GoldenRow, GoldenSet, GoldenVerdict
from vitdeploy.engines import Runtime, artifact_kind, open_runtime
from vitdeploy.errors import VitDeployError

if TYPE_CHECKING:
    import numpy as np

    from vitdeploy.artifacts.metadata import ArtifactMetadata

log = logging.getLogger(__name__)

CACHE_FORMAT = "vitdeploy-verified/1"
CACHE_ENTRIES = 32  # verdicts kept per artifact (oldest dropped)
KEY_LIBRARIES = ("vitdeploy", "onnxruntime", "openvino", "tensorrt", "tensorrt_rtx", "torch")


class DriftError(VitDeployError):
    """An artifact whose answers on this runtime left its golden set's tolerance."""


class UnverifiedError(VitDeployError):
    """An artifact that cannot be verified (it carries no golden set) where verification is required."""


class ArtifactChanged(VitDeployError):
    """The artifact's file changed between loading it and checking it: the check would vouch for other bytes."""


def verified_path(artifact: str | Path) -> Path:
    """``m.onnx`` -> ``m.verified.json`` (same folder, same stem): the first-load verdicts."""
    p = Path(artifact)
    return p.with_name(p.stem + ".verified.json")


def artifact_metadata(path: str | Path) -> ArtifactMetadata | None:
    """The metadata an ONNX (its metadata_props) or an engine (its sidecar) carries; None when it has none."""
    from vitdeploy.artifacts.metadata import ArtifactMetadata, NoMetadataError, read_onnx_metadata

    kind = artifact_kind(path)
    if kind == "onnx":
        try:
            return read_onnx_metadata(path)
        except NoMetadataError:  # a plain ONNX; metadata that is there but malformed is its own error
            return None
    if kind == "engine":
        from vitdeploy.engines.tensorrt.sidecar import EngineSidecar

        side = EngineSidecar.read(path)
        return ArtifactMetadata.from_dict(side.model) if side.model else None
    return None


def artifact_golden(path: str | Path) -> GoldenSet | None:
    """The golden set an ONNX (its metadata) or an engine (its sidecar) carries; None when it has none."""
    meta = artifact_metadata(path)
    return meta.golden if meta is not None else None


def golden_batch(meta: ArtifactMetadata, golden: GoldenSet) -> np.ndarray:
    """The golden images decoded and preprocessed with ``meta``'s preprocessing, as the artifact takes
    them: float32 NCHW, or uint8 NHWC pixels for a model with its preprocessing in the graph."""
    import numpy as np

    from vitdeploy.preprocess import Preprocessing

    prep = Preprocessing.from_dict(meta.preprocessing)
    pixels = np.stack([prep.pixels(im) for im in golden.decoded()])
    return pixels if meta.extra.get("input") == "uint8_nhwc" else prep.normalize(pixels).astype("<f4")


def write_golden_tensors(path: str | Path, folder: str | Path) -> Path:
    """The golden set as the artifact's runtime takes it, for programs without Pillow (the C++ example):
    ``golden_input.bin`` (the preprocessed batch: float32 NCHW, or uint8 NHWC for a model with its
    preprocessing in the graph), ``golden_logits.bin`` (float32 [N, labels]), both raw little-endian, and
    ``golden_tensors.json`` naming shapes, dtypes, images, expected top-1 and the tolerance."""
    import numpy as np

    from vitdeploy.io import atomic_write_bytes

    meta = artifact_metadata(path)
    golden = meta.golden if meta is not None else None
    if meta is None or golden is None:
        raise VitDeployError(f"{path} carries no golden set: export it again with `vitdeploy export`")
    batch = golden_batch(meta, golden)
    logits = np.stack([im.logits for im in golden.images]).astype("<f4")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "golden_input.bin", np.ascontiguousarray(batch).tobytes())
    atomic_write_bytes(out / "golden_logits.bin", logits.tobytes())
    manifest = {"format": "vitdeploy-golden-tensors/1", "artifact": Path(path).name,
                "input": {"file": "golden_input.bin", "dtype": batch.dtype.name, "shape": list(batch.shape)},
                "logits": {"file": "golden_logits.bin", "dtype": "float32", "shape": list(logits.shape)},
                "images": [im.name for im in golden.images], "top1": [int(r.argmax()) for r in logits],
                "precision": golden.precision, "tolerance": golden.tolerance}
    atomic_write_bytes(out / "golden_tensors.json", json.dumps(manifest, indent=2).encode())
    return out / "golden_tensors.json"


# --- the artifact's real precision ------------------------------------------------------------------------
def artifact_precision(path: str | Path) -> str | None:
    """The number format ``path`` really computes in: an ONNX's from its graph (:func:`graph_precision`);
    an engine's as its build read it from the ONNX's graph (the sidecar's precision: a strongly typed
    engine computes in its ONNX's types); None for anything else (a checkpoint: fp32)."""
    from vitdeploy.artifacts.golden import LOSSINESS

    kind = artifact_kind(path)
    if kind == "onnx":
        from vitdeploy.artifacts.precision import graph_precision
        from vitdeploy.io import load_onnx_graph

        return graph_precision(load_onnx_graph(path))
    if kind == "engine":
        from vitdeploy.engines.tensorrt.sidecar import EngineSidecar

        recorded = EngineSidecar.read(path).precision
        return recorded if recorded in LOSSINESS else "fp8"  # unknown: the loosest floor, never the set's claim
    return None


# --- running the check --------------------------------------------------------------------------------
@dataclass
class PathResult:
    """One runtime path's verdict (a tuned plan has up to two paths)."""

    runtime: str
    verdict: GoldenVerdict
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "seconds": self.seconds, **self.verdict.to_dict()}


def compute_precision(options: Mapping[str, Any] | None) -> str | None:
    """The number format a runtime opened with ``options`` computes in when that is not its file's:
    OpenVINO's bf16 or f16 hint (``bench --dtype``, or a tune plan's choice); None otherwise."""
    return {"bf16": "bf16", "f16": "fp16"}.get(str((options or {}).get("precision_hint")))


def verify_runtime(rt: Runtime, golden: GoldenSet, options: Mapping[str, Any] | None = None,
                   precision: str | None = None) -> list[PathResult]:
    """Run ``golden`` through ``rt`` (opened with ``options``): decode, ``rt``'s preprocessing (from its
    metadata), inference. A tuned plan's paths are each checked (its throughput path runs batches the
    golden set would not), each with the tolerance of the format it computes in. ``precision``: the
    artifact's real one (:func:`artifact_precision`); the golden set's tolerance may only be tighter."""
    from vitdeploy.engines.plan import PlannedRuntime

    paths = [(rt, compute_precision(options))]
    if isinstance(rt, PlannedRuntime):
        plan = rt.plan
        paths = [(rt.runtime_for(1), compute_precision(plan.latency.options))]
        if rt.runtime_for(plan.throughput_batch) is not paths[0][0]:
            paths.append((rt.runtime_for(plan.throughput_batch), compute_precision(plan.throughput.options)))
    images = golden.decoded()
    out = []
    for r, compute in paths:
        t0 = time.perf_counter()
        verdict = golden.check(r.infer(rt.preprocess(images)), compute=compute, precision=precision)
        out.append(PathResult(r.describe(), verdict, time.perf_counter() - t0))
    return out


def engine_cannot_run_here(engine: str | Path) -> str | None:
    """Why the engine cannot run on this machine (no GPU, a GPU its flavour or targets exclude, its
    TensorRT not installed), or None when it can."""
    import importlib.util

    from vitdeploy import sysinfo
    from vitdeploy.engines.tensorrt.sidecar import TENSORRT_RTX, EngineSidecar, runs_on

    side = EngineSidecar.read(engine)
    gpus = sysinfo.cuda_devices()
    if not gpus:
        return "no GPU here"
    gpu = gpus[0]
    if not runs_on(side.flavour, gpu.compute_capability):
        return f"{side.title} engines cannot run on {gpu.describe()}"
    if side.flavour == TENSORRT_RTX and gpu.compute_capability not in side.targets:
        return f"built for {', '.join(side.targets)}, and this GPU is {gpu.describe()}"
    if importlib.util.find_spec(side.flavour) is None:
        return f"{side.title} is not installed here"
    return None


@dataclass
class VerifyReport:
    artifact: Path
    backend: str
    results: list[PathResult] = field(default_factory=list)
    skipped: str = ""  # why it was not verified here
    labels: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.skipped and all(r.verdict.passed for r in self.results)

    @property
    def failed(self) -> bool:
        return any(not r.verdict.passed for r in self.results)

    def reason(self) -> str:
        """One line: the first failing image and its drift, and the runtime."""
        for r in self.results:
            if not r.verdict.passed:
                return f"{self.artifact.name} on {r.runtime}: {r.verdict.reason()}"
        return ""

    def _label(self, i: int) -> str:
        return f"{i} {self.labels[i]}" if 0 <= i < len(self.labels) else str(i)

    def table(self, width: int | None = None, wide: bool = False) -> Any:
        """One rich Table per runtime checked, with the columns that fit ``width`` (all with ``wide``): a
        classifier's top-1 per image, an embedding's cosine and relative max error (what its check measures)."""
        from vitdeploy.tables import fit_table

        tables = []
        for r in self.results:
            columns, rows = _embedding_rows(r.verdict) if r.verdict.is_embedding else self._classifier_rows(r.verdict)
            tables.append(fit_table(self._title(r), columns, rows, width, wide))
        return tables

    def _title(self, r: PathResult) -> str:
        tol, v = r.verdict.tolerance, r.verdict
        if v.is_embedding:
            return (f"{self.artifact.name} on {r.runtime}: golden set (embeddings), {v.precision} tolerance (cosine >= "
                    f"{tol['min_cosine']:g}, max abs <= {tol['max_abs_rel']:g} x the vector's largest value)")
        return (f"{self.artifact.name} on {r.runtime}: golden set, {v.precision} tolerance "
                f"(max abs <= {tol['max_abs_rel']:g} x scale, cosine >= {tol['min_cosine']:g})")

    def _classifier_rows(self, verdict: GoldenVerdict) -> tuple[list[Any], list[list[str]]]:
        from vitdeploy.tables import Column

        columns = [Column("image", 0, "left", True), Column("top-1 expected", 2, "left", True),
                   Column("top-1 got", 0, "left", True), Column("match", 1, "left"),
                   Column("max abs / scale", 0), Column("cosine", 1), Column("status", 0, "left", True)]
        rows = []
        for row in verdict.rows:
            match = ("yes" if row.got == row.expected else "no") + ("" if row.top1_checked else " (near-tie)")
            rows.append([row.image, self._label(row.expected), self._label(row.got), match, f"{row.error:.3g}",
                         f"{row.cosine:.6f}", _status(row)])
        return columns, rows

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": str(self.artifact), "backend": self.backend, "passed": self.passed,
                "skipped": self.skipped, "results": [r.to_dict() for r in self.results]}


def _status(row: GoldenRow) -> str:
    return "ok" if row.ok else f"DRIFT: {row.problem}"


def _embedding_rows(verdict: GoldenVerdict) -> tuple[list[Any], list[list[str]]]:
    """An embedding's check per image: its cosine to the stored vector, the max abs error relative to that
    vector's largest value, and the verdict (an embedding has no top-1)."""
    from vitdeploy.tables import Column

    columns = [Column("image", 0, "left", True), Column("cosine to golden", 0),
               Column("max abs / largest value", 0), Column("status", 0, "left", True)]
    return columns, [[row.image, f"{row.cosine:.6f}", f"{row.error:.3g}", _status(row)] for row in verdict.rows]


def verify_artifact(path: str | Path, backend: str = "auto", device: str = "auto", **options: Any) -> VerifyReport:
    """Check ``path`` against its golden set on ``backend`` (``auto``: the tune plan when one holds
    here, as :func:`open_runtime` chooses). An engine that cannot run here is skipped, with the reason."""
    path = Path(path)
    golden = artifact_golden(path)
    if golden is None:
        raise VitDeployError(f"{path} carries no golden set: export it again with `vitdeploy export` "
                             "(and rebuild an engine from that ONNX)")
    report = VerifyReport(path, backend)
    if artifact_kind(path) == "engine":
        why = engine_cannot_run_here(path)
        if why:
            report.skipped = why
            return report
    with open_runtime(path, backend=backend, device=device, **options) as rt:
        report.labels = rt.labels
        report.results = verify_runtime(rt, golden, options, artifact_precision(path))
    return report


def warm_up(rt: Runtime, batch_sizes: Iterable[int]) -> dict[int, float]:
    """Run each batch size once (the golden set's first image repeated; zeros without a golden set), so
    the first requests do not pay for allocation, kernel choice or graph capture; seconds per size."""
    import numpy as np

    golden = rt.metadata.golden if rt.metadata else None
    one = rt.preprocess(golden.decoded()[:1]) if golden else np.zeros((1, *rt.spec.shape), rt.spec.dtype)
    seconds = {}
    for batch in sorted(set(batch_sizes)):
        t0 = time.perf_counter()
        rt.warm(np.repeat(one, batch, axis=0))  # on every instance (each TensorRT slot captures its own)
        seconds[batch] = time.perf_counter() - t0
    return seconds


# --- first load on a target ---------------------------------------------------------------------------
def _driver_version() -> str | None:
    from vitdeploy import sysinfo

    rt = sysinfo.cudart()
    if rt is None:
        return None
    try:
        err, version = rt.cudaDriverGetVersion()
    except Exception:
        return None
    return f"{version // 1000}.{version % 1000 // 10}" if int(err) == 0 else None


def target_key(path: str | Path, rt: Runtime, artifact_sha256: str | None = None) -> dict[str, Any]:
    """What must be equal for a verdict to hold: the artifact (and the metadata the runtime read), the
    runtime as opened, the library versions on the path, and the CPU or the GPU and its driver."""
    from importlib import metadata as md

    from vitdeploy import sysinfo

    libs = sysinfo.library_versions()
    versions: dict[str, str | None] = {k: libs.get(k) for k in KEY_LIBRARIES}
    for dist in ("numpy", "pillow"):  # decoding and resizing are on the checked path
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    meta = json.dumps(rt.metadata.to_dict(), sort_keys=True) if rt.metadata else ""
    key: dict[str, Any] = {"artifact_sha256": artifact_sha256 or _artifact_sha256(Path(path)),
                           "metadata_sha256": hashlib.sha256(meta.encode()).hexdigest(),
                           "runtime": rt.describe(), "where": rt.where, "libraries": versions}
    if rt.where == "cuda":
        key.update(gpus=sysinfo.gpus(), driver=_driver_version())
    else:
        key.update(cpu=sysinfo.cpu_model(), cpu_flags=sysinfo.cpu_flags())
    return key


def _key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _read_cache(path: Path) -> list[dict[str, Any]]:
    cache = verified_path(path)
    try:
        if not cache.is_file() or cache.stat().st_size > 4 << 20:
            return []
        data = json.loads(cache.read_text())
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data["entries"], list):
            raise ValueError(f"not {CACHE_FORMAT}")
        return [e for e in data["entries"] if isinstance(e, dict)]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:  # untrusted: nested deep is as bad
        log.warning("ignoring %s (%s): the artifact is checked again", cache, type(e).__name__
                    if isinstance(e, RecursionError) else e)
        return []


def _cached(entries: list[dict[str, Any]], key_hash: str) -> list[PathResult] | None:
    for entry in entries:
        if entry.get("key_sha256") == key_hash:
            try:
                return [PathResult(str(r["runtime"]), GoldenVerdict.from_dict(r), float(r["seconds"]))
                        for r in entry["results"]]
            except (KeyError, TypeError, ValueError):
                return None
    return None


def _loaded_files(path: Path) -> list[Path]:
    """The files a runtime loads for ``path``: an ONNX and its external data (a large model's weights live
    there, not in the .onnx), else the file itself."""
    if artifact_kind(path) != "onnx":
        return [path]
    from vitdeploy.io import onnx_external_files

    st = path.stat()  # the list is the .onnx's: read once per version of it (parsing ViT-B's takes 0.4 s)
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _EXTERNAL_FILES:
        if len(_EXTERNAL_FILES) > 64:
            _EXTERNAL_FILES.clear()
        _EXTERNAL_FILES[key] = onnx_external_files(path)
    return [path, *_EXTERNAL_FILES[key]]


_EXTERNAL_FILES: dict[tuple[Any, ...], list[Path]] = {}


def _file_stamp(path: Path) -> list[int]:
    """Size, mtime and inode of each file loaded for ``path`` (:func:`_loaded_files`)."""
    out = []
    for f in _loaded_files(path):
        try:
            st = f.stat()
        except FileNotFoundError:
            if f == path:
                raise
            raise VitDeployError(f"{path.name} keeps its weights in {f.name}, which is not beside it: copy it "
                                 "there with the ONNX") from None
        out += [st.st_size, st.st_mtime_ns, st.st_ino]
    return out


def _artifact_sha256(path: Path) -> str:
    """The SHA-256 of the file, or of an ONNX with external data, of each loaded file's SHA-256 in turn."""
    from vitdeploy.io import sha256_file

    files = _loaded_files(path)
    if len(files) == 1:
        return sha256_file(path)
    return hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()


@dataclass(frozen=True)
class LoadStamp:
    """The artifact's files (an ONNX's external data too) as they were just before a runtime loaded them
    (size, mtime, inode): the check that follows vouches only for those bytes, so it refuses a file that has
    changed since (issue 29)."""

    path: Path
    stamp: tuple[int, ...]

    @classmethod
    def take(cls, path: str | Path) -> LoadStamp | None:
        """Stat ``path`` now (before opening it); None for what is not a file (a preset name, a folder)."""
        p = Path(path)
        return cls(p, tuple(_file_stamp(p))) if p.is_file() else None

    def check_unchanged(self) -> None:
        """ArtifactChanged when the file is no longer the one loaded (replaced, rewritten or removed)."""
        try:
            now = tuple(_file_stamp(self.path))
        except (OSError, VitDeployError):
            now = ()
        if now != self.stamp:
            raise ArtifactChanged(f"{self.path.name} changed on disk after it was loaded: the model running is not "
                                  "the file there now, so it is not verified as that file; load it again (restart)")


def _known_sha256(stamp: list[int], entries: list[dict[str, Any]]) -> str | None:
    """The artifact's SHA-256 from a cached entry whose file stamp (size, mtime, inode) is ``stamp``:
    hashing a 350 MB ViT-B on every load is what this saves (a file rewritten in place with its old
    mtime restored goes unnoticed; whoever can do that can also edit the cache)."""
    for entry in entries:
        sha = (entry.get("key") or {}).get("artifact_sha256") if isinstance(entry.get("key"), dict) else None
        if entry.get("artifact_stamp") == stamp and isinstance(sha, str):
            return sha
    return None


def _store(path: Path, entries: list[dict[str, Any]], key: dict[str, Any], results: list[PathResult],
           stamp: list[int]) -> None:
    from vitdeploy.io import atomic_write_bytes

    key_hash = _key_hash(key)
    entry = {"key_sha256": key_hash, "key": key, "artifact_stamp": stamp,
             "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "results": [r.to_dict() for r in results]}
    kept = [e for e in entries if e.get("key_sha256") != key_hash][-(CACHE_ENTRIES - 1):]
    try:
        atomic_write_bytes(verified_path(path),
                           json.dumps({"format": CACHE_FORMAT, "entries": [*kept, entry]}, indent=1).encode())
    except OSError as e:
        log.warning("cannot keep the verdict in %s (%s): the check runs again at the next load",
                    verified_path(path), e.strerror or e)


@dataclass
class FirstLoad:
    """The first-load check's outcome: the verdicts, and whether they came from the cache."""

    results: list[PathResult]
    cached: bool

    @property
    def passed(self) -> bool:
        return all(r.verdict.passed for r in self.results)


def first_load_check(path: str | Path, rt: Runtime, allow_drift: bool = False,
                     options: Mapping[str, Any] | None = None, loaded: LoadStamp | None = None,
                     require: bool = False) -> FirstLoad | None:
    """Verify ``rt`` (opened on ``path``) against the artifact's golden set, once per target: the
    verdict is cached in ``<stem>.verified.json`` under :func:`target_key`, keyed on the bytes that were
    loaded: ``loaded`` is the file's stamp taken before opening (:meth:`LoadStamp.take`; None: as it is
    now), and a file changed since is refused (:class:`ArtifactChanged`), never checked in its place.
    A failed verdict raises :class:`DriftError` naming the image and the drift, unless ``allow_drift``
    (then a warning). None when there is nothing to check (a checkpoint, or an artifact without a golden
    set), or :class:`UnverifiedError` with ``require``."""
    path = Path(path)
    golden = rt.metadata.golden if rt.metadata else None
    checkpoint = not path.is_file() or artifact_kind(path) == "checkpoint"
    if checkpoint or golden is None:
        why = unverified_reason(path)
        if require:
            raise UnverifiedError(f"{why}; --require-verified refuses it")
        log.log(logging.INFO if checkpoint else logging.WARNING, "not verified: %s", why)
        return None
    loaded = loaded or LoadStamp(path, tuple(_file_stamp(path)))
    entries = _read_cache(path)
    sha = _known_sha256(list(loaded.stamp), entries) or _artifact_sha256(path)
    loaded.check_unchanged()  # what was hashed is what was loaded
    key = target_key(path, rt, sha)
    results = _cached(entries, _key_hash(key))
    outcome = FirstLoad(results or [], results is not None)
    if results is None:
        outcome.results = verify_runtime(rt, golden, options, artifact_precision(path))
        _store(path, entries, key, outcome.results, list(loaded.stamp))
    bad = next((r for r in outcome.results if not r.verdict.passed), None)
    if bad is not None:
        message = f"{path.name} fails its golden set on {bad.runtime}: {bad.verdict.reason()}"
        if not allow_drift:
            where = f"verdict cached in {verified_path(path).name}" if outcome.cached else "checked on first load"
            raise DriftError(f"{message}; {where}. This runtime or machine answers differently from export: "
                             "re-export or rebuild here, or run anyway with --allow-drift")
        log.warning("%s; running anyway (--allow-drift)", message)
    return outcome


def unverified_reason(path: str | Path) -> str:
    """Why ``path`` cannot be verified (no golden set to check), in words a banner or /readyz can show."""
    name = Path(path).name or str(path)
    if not Path(path).is_file() or artifact_kind(path) == "checkpoint":
        return f"{name} is a checkpoint: there is no golden set to check (export it with `vitdeploy export`)"
    return f"{name} carries no golden set: re-export it with `vitdeploy export` to add one"


def verification_status(path: str | Path, outcome: FirstLoad | None, checked: bool = True) -> dict[str, Any]:
    """What readiness reports: ``verified`` (the golden set passed on this machine) and, in words, why
    (or why not): not ``checked`` (--no-verify), no golden set, passed, or failed and run anyway."""
    if not checked:
        return {"verified": False, "verification": "not checked (--no-verify)"}
    if outcome is None:
        return {"verified": False, "verification": unverified_reason(path)}
    if not outcome.passed:
        bad = next(r for r in outcome.results if not r.verdict.passed)
        return {"verified": False, "verification": f"fails its golden set, run anyway (--allow-drift): "
                f"{bad.verdict.reason()}"}
    return {"verified": True, "verification": "golden set passed on this machine"
            + (" (cached verdict)" if outcome.cached else "")}


def open_verified(path: str | Path, backend: str = "auto", device: str = "auto", verify: bool = True,
                  allow_drift: bool = False, require_verified: bool = False, **options: Any) -> Runtime:
    """:func:`vitdeploy.engines.open_runtime`, then :func:`first_load_check` (``verify=False`` skips it;
    ``require_verified`` refuses an artifact without a golden set). The file is stamped before it is
    opened, so the check vouches for the bytes that were loaded. The runtime is closed again if the check
    refuses it."""
    if require_verified and not verify:
        raise VitDeployError("--require-verified and --no-verify contradict each other: drop one")
    loaded = LoadStamp.take(path) if verify else None
    rt = open_runtime(path, backend=backend, device=device, **options)
    if not verify:
        return rt
    try:
        if loaded is not None:
            loaded.check_unchanged()
        first_load_check(path, rt, allow_drift=allow_drift, options=options, loaded=loaded,
                         require=require_verified)
    except BaseException:
        rt.close()
        raise
    return rt


# --- after a build --------------------------------------------------------------------------------------
def check_built_engine(engine: str | Path) -> dict[str, Any]:
    """Verify an engine just built where it can run here, and record the verdict in its sidecar
    (GPU, driver, TensorRT version, figures); where it cannot (an ahead-of-time TensorRT-RTX build on a
    machine without its GPU), record "not verified" and why."""
    from dataclasses import replace

    from vitdeploy import sysinfo
    from vitdeploy.engines.tensorrt.sidecar import EngineSidecar, sidecar_path
    from vitdeploy.io import atomic_write_bytes

    engine = Path(engine)
    side = EngineSidecar.read(engine)
    record: dict[str, Any] = {"checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "flavour": side.flavour, "trt_version": side.trt_version}
    why = "the ONNX it was built from carries no golden set" if artifact_golden(engine) is None else (
        engine_cannot_run_here(engine))
    result = None
    if not why:
        try:
            result = verify_artifact(engine, backend="tensorrt").results[0]
        except Exception as e:  # the build stands; that it would not run here is the verdict
            why = f"it did not run here ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
    if result is None:
        record.update(verified=False, passed=None, reason=f"not verified: {why}")
    else:
        record.update(verified=True, passed=result.verdict.passed, reason=result.verdict.reason(),
                      gpu=sysinfo.gpus()[0], driver=_driver_version(), runtime=result.runtime,
                      summary=result.verdict.summary(), seconds=round(result.seconds, 3),
                      rows=[r.to_dict() for r in result.verdict.rows])
    atomic_write_bytes(sidecar_path(engine), replace(side, verification=record).to_json().encode())
    return record
