"""ONNX -> TensorRT engine, for full TensorRT (``tensorrt``) and TensorRT-RTX (``tensorrt_rtx``).

Both share one API; the few names only one has are guarded. Networks are strongly typed, so the
engine's precision is the ONNX's (FP32, FP16, INT8/FP8 Q/DQ): there are no precision flags here.
TensorRT-RTX builds ahead of time without a GPU for named compute capabilities; full TensorRT
builds for the GPU it runs on.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vitdeploy import __version__, sysinfo
from vitdeploy.deprecation import moved
from vitdeploy.dtypes import enum_name
from vitdeploy.engines.tensorrt.sidecar import (
    TENSORRT,
    TENSORRT_RTX,
    EngineSidecar,
    TensorIO,
    flavour_name,
    sidecar_path,
    write_engine,
)
from vitdeploy.errors import VitDeployError
from vitdeploy.io import atomic_write_bytes, check_onnx_external_data, check_output_dir, sha256_file
from vitdeploy.sysinfo import RTX_COMPUTE_CAPABILITIES, trt_flavours_for

__all__ = [
    "BuildCancelled",
    "BuildError",
    "BuildOptions",
    "BuildReport",
    "build_engine",
    "choose_flavour",
    "current_gpu",
    "import_tensorrt",
    "parse_compute_capability",
    "sidecar_path",
]


class BuildError(VitDeployError):
    """A build that TensorRT refused, or options that cannot work; nothing was written."""


class BuildCancelled(BuildError):
    """The build was cancelled (Ctrl-C or a callback); nothing was written."""


_INSTALL = {
    TENSORRT: "install full TensorRT: pip install --extra-index-url https://pypi.nvidia.com 'vitdeploy[tensorrt]'",
    TENSORRT_RTX: "install TensorRT-RTX: pip install 'vitdeploy[tensorrt-rtx]'",
}


def import_tensorrt(flavour: str = "auto") -> tuple[Any, str]:
    """(module, 'tensorrt' | 'tensorrt_rtx'); auto prefers full TensorRT."""
    import importlib

    if flavour == "auto":
        wanted: tuple[str, ...] = (TENSORRT, TENSORRT_RTX)
    else:
        try:
            wanted = (flavour_name(flavour),)
        except VitDeployError:
            raise BuildError(f"--trt {flavour!r}: choose auto, tensorrt or rtx") from None
    for name in wanted:
        try:
            return importlib.import_module(name), name
        except ImportError:
            continue
        except OSError as e:  # the bindings are there but their libraries are not
            raise BuildError(f"{name} is installed but cannot load its libraries: {e}") from None
    raise BuildError(f"no TensorRT found: {'; or '.join(_INSTALL[w] for w in wanted)}")


def _installed(flavour: str) -> bool:
    import sys

    if flavour in sys.modules:
        return sys.modules[flavour] is not None
    return importlib.util.find_spec(flavour) is not None


def choose_flavour(requested: str, compute_capabilities: list[str], gpu: tuple[str, str] | None,
                   installed: Callable[[str], bool] = _installed) -> tuple[str, list[str]]:
    """(flavour, targets) for a build, or BuildError before any work is done.

    TensorRT-RTX builds ahead of time for named RTX-class targets (or the GPU present, when it is
    one); full TensorRT builds on, and for, the GPU present. ``auto`` picks a flavour whose engines
    can run on that GPU (full TensorRT first), or TensorRT-RTX when targets are named.
    """
    try:
        want = "auto" if requested == "auto" else flavour_name(requested)
    except VitDeployError:
        raise BuildError(f"--trt {requested!r}: choose auto, tensorrt or rtx") from None
    targets = [parse_compute_capability(t) for t in compute_capabilities]
    if want == TENSORRT:
        if gpu is None:
            raise BuildError("full TensorRT builds on the GPU it targets and none is visible here; "
                             "on a CPU machine use TensorRT-RTX (--trt rtx --compute-capability sm89)")
        if targets:
            raise BuildError("--compute-capability is a TensorRT-RTX option; full TensorRT builds for this GPU "
                             "(use --hardware-compat ampere+ for portability)")
        return TENSORRT, [gpu[1]]
    if want == TENSORRT_RTX or targets:
        if targets:
            bad = [t for t in targets if t not in RTX_COMPUTE_CAPABILITIES]
            if bad:
                raise BuildError(f"TensorRT-RTX cannot run on {', '.join(bad)} (it runs "
                                 f"{', '.join(RTX_COMPUTE_CAPABILITIES)}): for {', '.join(bad)} build with full "
                                 "TensorRT (--trt tensorrt) on such a GPU")
            return TENSORRT_RTX, targets
        if gpu is None:
            raise BuildError("no GPU here to build for: name the targets, e.g. --compute-capability sm89,sm120 "
                             f"(TensorRT-RTX supports {', '.join(RTX_COMPUTE_CAPABILITIES)})")
        if TENSORRT_RTX not in trt_flavours_for(gpu[1]):
            raise BuildError(f"TensorRT-RTX cannot run on {gpu[1]} ({gpu[0]}): build with full TensorRT "
                             "(--trt tensorrt), or name RTX-class targets with --compute-capability")
        return TENSORRT_RTX, [gpu[1]]
    # auto, no named targets
    if gpu is None:
        if installed(TENSORRT_RTX):
            raise BuildError("no GPU here to build for: name the targets, e.g. --compute-capability sm89,sm120 "
                             f"(TensorRT-RTX supports {', '.join(RTX_COMPUTE_CAPABILITIES)})")
        if installed(TENSORRT):
            raise BuildError("full TensorRT builds on the GPU it targets and none is visible here; "
                             "on a CPU machine use TensorRT-RTX (--trt rtx --compute-capability sm89)")
        raise BuildError(f"no TensorRT found: {_INSTALL[TENSORRT]}; or {_INSTALL[TENSORRT_RTX]}")
    runnable = trt_flavours_for(gpu[1])
    for flavour in runnable:
        if installed(flavour):
            return flavour, [gpu[1]]
    if TENSORRT_RTX not in runnable and installed(TENSORRT_RTX):
        raise BuildError(f"TensorRT-RTX cannot run on {gpu[1]} ({gpu[0]}): build with full TensorRT; "
                         f"{_INSTALL[TENSORRT]}")
    raise BuildError(f"no TensorRT found: {'; or '.join(_INSTALL[f] for f in runnable)}")


@dataclass
class BuildOptions:
    flavour: str = "auto"  # auto | tensorrt | rtx
    batch: int | None = None  # static profile (min = opt = max)
    min_batch: int | None = None
    opt_batch: int | None = None
    max_batch: int | None = None
    compute_capabilities: list[str] = field(default_factory=list)  # TensorRT-RTX targets: sm89, ...
    workspace_mib: int | None = None
    opt_level: int = 3
    timing_cache: Path | None = None
    tf32: bool = True
    hardware_compat: str | None = None  # ampere+ | same-cc
    version_compatible: bool = False  # full TensorRT only: TensorRT-RTX engines are tied to their release
    # what the engine keeps for the inspector: DETAILED slows enqueueV3, so it is opt-in
    profiling_verbosity: str = "layer_names_only"  # layer_names_only | detailed | none
    # execution contexts the runtime will run at once: a dynamic-batch engine gets one identical
    # optimization profile each (TensorRT: contexts in concurrent use need separate profiles)
    instances: int = 1


@dataclass
class BuildReport:
    engine: Path
    sidecar: Path
    flavour: str
    trt_version: str
    precision: str
    targets: list[str]
    profile: dict[str, list[int]]
    seconds: float
    engine_bytes: int
    phases: list[str]
    profiles: int = 1  # identical optimization profiles: instances the engine runs at once

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["engine"], d["sidecar"] = str(self.engine), str(self.sidecar)
        return d

    def render(self) -> str:
        return (f"built {self.engine} ({self.engine_bytes / 1e6:.1f} MB, {self.precision}) with {self.flavour} "
                f"{self.trt_version} for {', '.join(self.targets)} in {self.seconds:.1f} s; "
                f"batch profile min/opt/max {self.profile['min'][0]}/{self.profile['opt'][0]}/{self.profile['max'][0]}"
                f"{f' x{self.profiles} (one per instance)' if self.profiles > 1 else ''}; sidecar {self.sidecar.name}")


def parse_compute_capability(text: str) -> str:
    m = re.fullmatch(r"(?:sm_?)?(\d{2,3})|(\d+)\.(\d)", text.strip().lower())
    if not m:
        raise BuildError(f"compute capability {text!r} is not like sm89 or 8.9")
    value = m.group(1) or f"{m.group(2)}{m.group(3)}"
    return f"sm{value}"


def current_gpu() -> tuple[str, str] | None:
    """(name, smXY) of CUDA device 0 (cuda-python in either layout, else torch); None without a GPU."""
    devices = sysinfo.cuda_devices()
    return (devices[0].name, devices[0].compute_capability) if devices else None


PROFILING_VERBOSITY = ("layer_names_only", "detailed", "none")


def check_options(flavour: str, options: BuildOptions) -> None:
    """BuildError for options that ``flavour`` cannot honour, before any work is done."""
    if int(options.instances) < 1:
        raise BuildError(f"--instances {options.instances}: an engine runs at least one execution context")
    if options.profiling_verbosity not in PROFILING_VERBOSITY:
        raise BuildError(f"--profiling-verbosity {options.profiling_verbosity!r}: choose "
                         f"{', '.join(PROFILING_VERBOSITY)}")
    if options.version_compatible and flavour == TENSORRT_RTX:
        raise BuildError("--version-compatible: TensorRT-RTX engines are not compatible across TensorRT-RTX "
                         "releases (only full TensorRT has version-compatible engines); drop the flag and "
                         "rebuild the engine whenever TensorRT-RTX is upgraded")


def check_build_targets(options: BuildOptions) -> tuple[str, list[str]]:
    """:func:`choose_flavour` for this host, and that flavour installed: call it before exporting for a build."""
    flavour, targets = choose_flavour(options.flavour, options.compute_capabilities, current_gpu())
    check_options(flavour, options)
    if not _installed(flavour):
        raise BuildError(f"no TensorRT found: {_INSTALL[flavour]}")
    return flavour, targets


def _make_monitor(trt: Any, phases: list[str], cancel: threading.Event, show: bool) -> Any:
    """An IProgressMonitor (thread-safe, as TensorRT requires) that records phases and can cancel."""
    lock = threading.Lock()

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.bars: dict[str, Any] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with lock:
                phases.append(phase_name)
                if show and parent_phase is None:
                    from tqdm import tqdm

                    self.bars[phase_name] = tqdm(total=num_steps, desc=phase_name, leave=False, unit="step")

        def step_complete(self, phase_name: str, step: int) -> bool:
            with lock:
                bar = self.bars.get(phase_name)
                if bar is not None:
                    bar.update(step + 1 - bar.n)
            return not cancel.is_set()

        def phase_finish(self, phase_name: str) -> None:
            with lock:
                bar = self.bars.pop(phase_name, None)
                if bar is not None:
                    bar.close()

    return Monitor()


class Logger:
    """A trt.ILogger that keeps errors so a failed build can say why."""

    def __init__(self, trt: Any) -> None:
        outer = self
        self.errors: list[str] = []

        class L(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                    outer.errors.append(msg)
                elif os.environ.get("VITDEPLOY_TRT_VERBOSE") and severity == trt.ILogger.Severity.WARNING:
                    print(f"[TensorRT] {msg}")

        self.logger = L()


def _first_reason(errors: list[str]) -> str:
    """TensorRT's most telling error line (the one naming the cause), on one line."""
    for keyword in ("Cannot compile", "because", "not supported", "Unsupported", "must have"):
        for e in errors:
            if keyword in e:
                return " ".join(e.split())
    return " ".join(errors[-1].split()) if errors else "no reason logged"


def _onnx_metadata(onnx_path: Path) -> dict[str, Any]:
    from vitdeploy.artifacts.metadata import NoMetadataError, read_onnx_metadata

    try:
        return read_onnx_metadata(onnx_path).to_dict()
    except NoMetadataError:
        return {}  # a foreign ONNX builds; predict/serve then need labels some other way
    # vitdeploy metadata that is malformed is an error: the engine would lose its golden set without a word


def _graph_precision(onnx_path: Path) -> str:
    """The precision the engine computes in: its ONNX's, read from the graph (a strongly typed build keeps
    the graph's types), never the metadata's claim; the golden check's tolerance is based on it."""
    from vitdeploy.artifacts.precision import graph_precision
    from vitdeploy.io import load_onnx_graph

    return graph_precision(load_onnx_graph(onnx_path))


def build_engine(onnx_path: str | Path, output: str | Path, options: BuildOptions | None = None,
                 progress: bool = False, cancel: threading.Event | None = None,
                 on_phase: Callable[[str], None] | None = None) -> BuildReport:
    """Parse ``onnx_path``, build a strongly typed engine, publish it and its sidecar as one set.

    Stages: check the request -> parse -> configure -> batch profile -> build -> publish.
    ``cancel`` (set it from any thread) or Ctrl-C stops the build at the next step; nothing is written.
    """
    opts = options or BuildOptions()
    onnx_path, output = Path(onnx_path), Path(output)
    if not onnx_path.is_file():
        raise BuildError(f"ONNX file {onnx_path} does not exist")
    check_onnx_external_data(onnx_path)  # TensorRT's parser follows a symlinked data file out of the folder
    check_output_dir(output)
    meta = _onnx_metadata(onnx_path)  # malformed metadata refused before any work
    gpu = current_gpu()
    flavour, targets = choose_flavour(opts.flavour, opts.compute_capabilities, gpu)  # refuse before any work
    check_options(flavour, opts)
    trt, flavour = import_tensorrt(flavour)
    log = Logger(trt)
    builder = trt.Builder(log.logger)
    network, _parser = _parse(trt, builder, log, onnx_path)  # the network uses the parser's weights: keep it
    config = _configure(trt, builder, opts, flavour, targets)
    timing_cache = _use_timing_cache(config, opts, flavour)
    profile = _batch_profile(network.get_input(0), opts, onnx_path.name)
    _add_profiles(builder, config, network.get_input(0).name, profile, opts.instances)
    cancel = cancel or threading.Event()
    serialized, phases, seconds = _build(trt, builder, network, config, cancel, progress)
    if on_phase:
        for p in phases:
            on_phase(p)
    if cancel.is_set():
        raise BuildCancelled("build cancelled; nothing written")
    if serialized is None:
        raise BuildError(f"TensorRT could not build {onnx_path.name} for {', '.join(targets)}: "
                         f"{_first_reason(log.errors)}")
    side = EngineSidecar(
        flavour=flavour, trt_version=trt.__version__, targets=targets,
        gpu=gpu[0] if gpu and flavour != TENSORRT_RTX else None,
        precision=_graph_precision(onnx_path), io=_io_tensors(network), profile=profile,
        onnx_path=str(onnx_path), onnx_sha256=sha256_file(onnx_path),
        options={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        build_seconds=round(seconds, 3), built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        vitdeploy_version=__version__, model=meta,
    )
    side = write_engine(output, serialized, side)
    if timing_cache is not None and opts.timing_cache is not None:
        atomic_write_bytes(opts.timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return BuildReport(output, sidecar_path(output), flavour, trt.__version__, side.precision, targets,
                       side.profile, seconds, side.engine_bytes or output.stat().st_size, phases,
                       profile_count(side.profile, opts.instances))


def _parse(trt: Any, builder: Any, log: Logger, onnx_path: Path) -> tuple[Any, Any]:
    """A strongly typed network parsed from the ONNX (its external data read from beside it), and the
    parser, which must outlive the build (the network refers to weights it holds)."""
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, log.logger)
    if not parser.parse_from_file(str(onnx_path.resolve())):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or log.errors
        joined = "; ".join(" ".join(e.split()) for e in errors) or "no error reported"
        raise BuildError(f"TensorRT's ONNX parser rejected {onnx_path} ({len(errors)} errors): {joined}")
    return network, parser


def _configure(trt: Any, builder: Any, opts: BuildOptions, flavour: str, targets: list[str]) -> Any:
    """The builder config: workspace, optimization level, profiling verbosity, flags and targets."""
    config = builder.create_builder_config()
    if opts.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mib << 20)
    if not 0 <= opts.opt_level <= 5:
        raise BuildError(f"--opt-level {opts.opt_level}: use 0..5")
    config.builder_optimization_level = opts.opt_level
    config.profiling_verbosity = {"layer_names_only": trt.ProfilingVerbosity.LAYER_NAMES_ONLY,
                                  "detailed": trt.ProfilingVerbosity.DETAILED,
                                  "none": trt.ProfilingVerbosity.NONE}[opts.profiling_verbosity]
    if not opts.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if opts.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if opts.hardware_compat:
        levels = {"ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY", "none": "NONE"}
        if opts.hardware_compat not in levels:
            raise BuildError(f"--hardware-compat {opts.hardware_compat!r}: choose {', '.join(levels)}")
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, levels[opts.hardware_compat])
    if flavour == TENSORRT_RTX:
        unknown = [t for t in targets if not hasattr(trt.ComputeCapability, t.upper())]
        if unknown:
            raise BuildError(f"compute capability {', '.join(unknown)} is not one TensorRT-RTX {trt.__version__} "
                             f"builds for ({', '.join(RTX_COMPUTE_CAPABILITIES)}): upgrade tensorrt-rtx or drop "
                             "the target")
        config.num_compute_capabilities = len(targets)
        for i, t in enumerate(targets):
            config.set_compute_capability(getattr(trt.ComputeCapability, t.upper()), i)
    return config


def _use_timing_cache(config: Any, opts: BuildOptions, flavour: str) -> Any:
    """Full TensorRT's timing cache from ``--timing-cache`` (TensorRT-RTX has none: its runtime cache
    replaces it); None when not asked for."""
    if opts.timing_cache is None or flavour == TENSORRT_RTX:
        return None
    data = opts.timing_cache.read_bytes() if opts.timing_cache.is_file() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, False)
    return cache


def profile_count(profile: dict[str, list[int]], instances: int) -> int:
    """Optimization profiles an engine gets: one per instance with a dynamic batch, else one (a static
    engine has no shapes to choose, so its contexts may share it)."""
    return max(1, int(instances)) if profile["min"] != profile["max"] else 1


def _add_profiles(builder: Any, config: Any, name: str, profile: dict[str, list[int]], instances: int) -> None:
    """``profile_count`` identical optimization profiles (index i for the runtime's instance i)."""
    for _ in range(profile_count(profile, instances)):
        trt_profile = builder.create_optimization_profile()
        trt_profile.set_shape(name, profile["min"], profile["opt"], profile["max"])
        config.add_optimization_profile(trt_profile)


def _batch_profile(inp: Any, opts: BuildOptions, name: str) -> dict[str, list[int]]:
    """min/opt/max input shapes: the options' batch range for a dynamic batch, the file's for a static one."""
    shape = list(inp.shape)
    if any(d == -1 for d in shape[1:]):
        raise BuildError(f"input {inp.name} {shape} has dynamic non-batch dims: export with vitdeploy")
    if shape[0] == -1:
        lo = opts.min_batch or opts.batch or 1
        hi = opts.max_batch or opts.batch or max(lo, 32)
        mid = opts.opt_batch or opts.batch or min(max(lo, 8), hi)
        if not 1 <= lo <= mid <= hi:
            raise BuildError(f"batch profile needs 1 <= min <= opt <= max, got {lo}/{mid}/{hi}")
    else:
        static = shape[0]
        asked = {v for v in (opts.batch, opts.min_batch, opts.opt_batch, opts.max_batch) if v is not None}
        if asked - {static}:
            raise BuildError(f"{name} has a static batch of {static}; a profile of "
                             f"{sorted(asked)} cannot be satisfied: re-export with --dynamic-batch or --batch N")
        lo = mid = hi = static
    dims = shape[1:]
    return {"min": [lo, *dims], "opt": [mid, *dims], "max": [hi, *dims]}


def _build(trt: Any, builder: Any, network: Any, config: Any, cancel: threading.Event,
           progress: bool) -> tuple[Any, list[str], float]:
    """The serialized engine (None on failure), the phases TensorRT reported, and the seconds it took.
    Ctrl-C sets ``cancel``; the monitor's next step_complete returns False and TensorRT stops."""
    phases: list[str] = []
    config.progress_monitor = _make_monitor(trt, phases, cancel, progress)
    t0 = time.perf_counter()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return serialized, phases, time.perf_counter() - t0


def _io_tensors(network: Any) -> list[TensorIO]:
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    return ([TensorIO(t.name, "input", list(t.shape), enum_name(t.dtype)) for t in inputs]
            + [TensorIO(t.name, "output", list(t.shape), enum_name(t.dtype)) for t in outputs])

__getattr__ = moved(__name__, {
    "RTX_TARGETS": "vitdeploy.sysinfo:RTX_COMPUTE_CAPABILITIES",
    "flavours_for": "vitdeploy.sysinfo:trt_flavours_for",
})
