"""Files, the base layer: atomic writes (a temporary file in the target's folder, renamed into place when
complete) and multi-file publishing; the one check that an ONNX file's external data stays in its folder
(:func:`external_data_path`); bounded, one-line-error reading of the small JSON files we write."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vitdeploy.errors import VitDeployError


def load_onnx_graph(path: str | Path) -> Any:
    """An ONNX model without its external weights (graph, metadata, initializer names), or one
    VitDeployError for a file that is missing or not ONNX."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError, a missing file, ...
        raise VitDeployError(f"{path} is not a readable ONNX file ({type(e).__name__})") from None


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for a server this process starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_output_dir(path: Path) -> None:
    """Refuse an output path whose folder does not exist, before any work is done."""
    parent = path.resolve().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"output folder {parent} does not exist: create it or choose another --output")


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    check_output_dir(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.resolve().parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        make_readable(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def make_readable(path: Path) -> None:
    """mkstemp makes 0600 files; give the final file the mode a plain open() would (0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --- multi-file outputs -------------------------------------------------------------------------------
# A set of files (ONNX + its external weights; an engine + its sidecar + runtime cache) is published so
# that a reader sees the old set or the new set, never a mix. The recipe:
#   1. write every file into ``staging_dir(target)``, a temporary folder beside the target (same file
#      system, so renames are atomic);
#   2. give each companion file a name that no older set uses (``content_name``: its content hash), and
#      make the entry file refer to it;
#   3. ``publish_file_set``: rename the companions into place first, the entry file last, then remove
#      the previous set's companions (``stale``).
# A reader opens the entry file and follows its references, so before step 3's last rename it gets the
# old set (whose companions still exist), after it the new one. A SIGKILL at any point leaves at most a
# ``.vitdeploy-*`` staging folder or an unreferenced companion, never a target that loads wrongly.


@contextlib.contextmanager
def staging_dir(target: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``target`` (removed with whatever is left in it when the block ends).
    Its name carries this host and process id (see :func:`remove_dead_staging`)."""
    target = Path(target)
    check_output_dir(target)
    with tempfile.TemporaryDirectory(prefix=staging_prefix(target), dir=target.resolve().parent) as d:
        yield Path(d)


def staging_prefix(target: str | Path) -> str:
    """The name prefix of this process's staging folders for ``target``: ``.vitdeploy-<name>.<host>.<pid>.``
    (what :func:`remove_dead_staging` recognizes)."""
    return f".vitdeploy-{Path(target).name}.{_host()}.{os.getpid()}."


def _host() -> str:
    return socket.gethostname().replace(".", "_")


def remove_dead_staging(target: str | Path) -> None:
    """Remove the staging folders that killed writers of ``target`` on this host left (their process
    is gone); a live writer's folder, or another host's, is left alone. Call it after publishing: a
    reader may still need a dead writer's folder before that (the engine sidecar's recovery does)."""
    target = Path(target)
    prefix = f".vitdeploy-{target.name}.{_host()}."
    for old in target.resolve().parent.glob(glob.escape(prefix) + "*"):
        pid = old.name[len(prefix):].split(".", 1)[0]
        if not old.is_dir() or not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def content_name(path: str | Path, stem: str, suffix: str = ".data", digits: int = 16) -> str:
    """``<stem>.<sha256 prefix><suffix>``: a name that changes whenever the content does."""
    return f"{stem}.{sha256_file(path)[:digits]}{suffix}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _identity(path: Path) -> tuple[int, ...]:
    """What a rename keeps and a new file (even one reusing a freed inode number) does not."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def publish_file_set(files: dict[Path, Path], last: Path, stale: list[Path] | tuple[Path, ...] = (),
                     durable: bool = True) -> None:
    """Rename staged files onto their targets (``{target: staged}``): every other file first, ``last``
    (the entry file a reader opens) last; then delete ``stale`` (the old set's companions that the new
    entry file no longer references). ``durable`` fsyncs the files and the folder so the set also
    survives a power cut, not only a killed process."""
    if last not in files:
        raise ValueError(f"{last} is not one of the files to publish")
    order = [t for t in files if t != last] + [last]
    folders = {t.resolve().parent for t in order}
    for target in order:
        staged = files[target]
        make_readable(staged)
        if durable:
            _fsync(staged)
    identities = {t: _identity(files[t]) for t in order}
    for target in order:
        try:
            os.replace(files[target], target)
        except FileNotFoundError:
            # a reader completed this rename for us (the engine sidecar's recovery moves a staged
            # sidecar into place): the very file we staged is there now, so the publish is done
            if not (target.exists() and _identity(target) == identities[target]):
                raise
    if durable:
        for folder in folders:
            _fsync(folder)
    keep = {t.resolve() for t in order}
    for old in stale:
        if old.resolve() not in keep:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()


def _onnx_tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto of a ModelProto: initializers and tensor attributes, subgraphs included."""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


def _external_locations(model: Any) -> list[tuple[str, str]]:
    """``(tensor name, location)`` of every tensor stored as external data (each location once)."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for tensor in _onnx_tensors(model):
        if tensor.data_location == 1:  # TensorProto.EXTERNAL
            loc = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if loc not in seen:
                seen.add(loc)
                out.append((tensor.name, loc))
    return out


def external_data_path(folder: str | Path, location: str, tensor: str = "?") -> Path:
    """The file an ONNX external-data ``location`` names, checked to stay inside ``folder`` (the ONNX
    file's own folder): a location that is empty, absolute, has a ``..`` part, or resolves (through
    symlinks) outside the folder is refused with VitDeployError naming the tensor and the location.
    Every reader and writer of external data (publish cleanup, triton, loading, inspect) goes through it."""
    def refuse(why: str) -> VitDeployError:
        return VitDeployError(f"ONNX tensor {tensor!r} keeps its data at {location!r}, {why}: external data "
                              "must sit in the ONNX file's own folder; re-export the model with `vitdeploy export`")

    parts = location.replace("\\", "/").split("/")
    if not location or "\x00" in location:
        raise refuse("which is not a file name")
    if location.startswith(("/", "\\")) or os.path.isabs(location) or re.match(r"^[A-Za-z]:", location):
        raise refuse("an absolute path")
    if ".." in parts:
        raise refuse("a path with '..'")
    root = Path(folder).resolve()
    try:
        resolved = (root / location).resolve()
    except (OSError, RuntimeError, ValueError):
        raise refuse("which cannot be resolved") from None
    if resolved == root or not resolved.is_relative_to(root):
        raise refuse(f"which resolves outside the folder (to {resolved})")
    return Path(folder) / location


def onnx_external_data(model: Any, folder: str | Path) -> list[Path]:
    """The checked external-data files of a loaded ``onnx.ModelProto`` whose file sits in ``folder``
    (see :func:`external_data_path`); raises VitDeployError on the first location that leaves it."""
    return [external_data_path(folder, loc, name) for name, loc in _external_locations(model)]


def onnx_external_files(path: str | Path) -> list[Path]:
    """The external-data files an ONNX file references (its ``location`` entries), beside it; only the
    graph is read. A copier (``vitdeploy triton``) copies exactly these, never a stale ``*.data``.
    A location outside the file's folder is refused (VitDeployError, see :func:`external_data_path`)."""

    path = Path(path)
    return onnx_external_data(load_onnx_graph(path), path.parent)


def check_onnx_external_data(path: str | Path) -> None:
    """Refuse an ONNX file whose external data leaves its folder (see :func:`external_data_path`), before
    a loader that would follow it (TensorRT's parser follows a symlink). A file that is not readable ONNX
    passes: the loader reports it in its own words."""

    path = Path(path)
    try:
        model = load_onnx_graph(path)
    except VitDeployError:  # unreadable: its loader says so in its own words
        return
    onnx_external_data(model, path.parent)


def publish_onnx(staged: Path, target: str | Path, durable: bool = True) -> list[Path]:
    """Publish an ONNX file written at ``staged`` (inside ``staging_dir(target)``), with its external
    data if any, onto ``target``: each data file is renamed ``<target name>.<content hash>.data`` and the
    graph's references rewritten, the data goes in first, the graph last, and the data files of the
    previous export (and any left by a killed one) are removed. Returns the data files now in use."""
    import onnx

    target = Path(target)
    model = onnx.load(str(staged), load_external_data=False)
    files: dict[Path, Path] = {}
    renamed: dict[str, str] = {}
    for name, loc in _external_locations(model):
        external_data_path(staged.parent, loc, name)
        new = content_name(staged.parent / loc, target.name)
        os.replace(staged.parent / loc, staged.parent / new)
        renamed[loc] = new
        files[target.parent / new] = staged.parent / new
    if renamed:
        for tensor in _onnx_tensors(model):
            for entry in tensor.external_data:
                if entry.key == "location" and entry.value in renamed:
                    entry.value = renamed[entry.value]
        onnx.save_model(model, str(staged))
    stale = [target.with_name(target.name + ".data"), *target.parent.glob(glob.escape(target.name) + ".*.data")]
    if target.is_file() and target.stat().st_size < 1 << 26:  # a bigger graph file holds its weights inline
        # an unreadable old file has no references to remove; one naming files outside its folder
        # (VitDeployError) gets none of them removed
        with contextlib.suppress(Exception):
            stale += onnx_external_files(target)
    files[target] = staged
    publish_file_set(files, last=target, stale=stale, durable=durable)
    remove_dead_staging(target)
    return [t for t in files if t != target]


MAX_JSON_BYTES = 16 << 20  # sidecars, tune plans: a few KB; anything near this is not ours


def read_json_file(path: str | Path, what: str, fix: str, max_bytes: int = MAX_JSON_BYTES,
                   word: str = "corrupt") -> Any:
    """Parse a small JSON file we wrote (a sidecar, a tune plan); one-line VitDeployError (``what`` is
    ``word`` (the reason): ``fix``) for a file that is unreadable, too big, not UTF-8, not JSON or
    nested too deep."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise VitDeployError(f"{what} is {word} ({size} bytes, more than any we write): {fix}")
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise VitDeployError(f"{what} is unreadable ({e.strerror or type(e).__name__}): {fix}") from None
    except RecursionError:
        raise VitDeployError(f"{what} is {word} (nested too deep): {fix}") from None
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise VitDeployError(f"{what} is {word} ({type(e).__name__}): {fix}") from None
