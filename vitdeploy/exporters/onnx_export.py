"""Checkpoint -> ONNX at a fixed image size, in the chosen precision, verified against torch.

Everything is written in a staging folder beside the output and published (``vitdeploy.io.publish_onnx``)
only once it has passed the graph checks and the ONNX Runtime comparison: a failed or killed export
leaves the previous file set as it was. The exporter never touches global logging, warning filters or
the process's stdout/stderr (the CLI decides what its own process shows).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy import __version__
from vitdeploy.artifacts.golden import GoldenSet, GoldenVerdict
from vitdeploy.errors import VitDeployError
from vitdeploy.exporters.attention import resolve_attention
from vitdeploy.exporters.metadata import ArtifactMetadata, set_metadata
from vitdeploy.exporters.precision import PRECISION_STEPS, PrecisionJob, PrecisionResult
from vitdeploy.io import check_output_dir, publish_onnx, staging_dir
from vitdeploy.metrics import TOLERANCES, Comparison, compare_logits

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"  # a classifier's output; an embedding model's is "embeddings" (see output_name)
# Ops left behind by tracing dynamic shapes or SDPA's masking; none may remain in our graph.
FORBIDDEN_OPS = ("Shape", "ConstantOfShape", "IsNaN", "Where", "Expand", "If", "Loop", "Range", "Size")
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's limit is 2 GB: ViT-H goes to external data
UINT8_NHWC = "uint8_nhwc"  # metadata "input" of a model with its preprocessing in the graph


class ExportError(VitDeployError):
    """An export that failed a check; nothing was written."""


@dataclass
class ExportOptions:
    batch: int = 1
    dynamic_batch: bool = False
    opset: int = 18
    precision: str = "fp32"  # fp32 | fp16 | int8 | fp8
    fp16_io: bool = False
    calib_dir: Path | None = None
    calib_samples: int = 512
    calib_method: str = "minmax"
    verify: bool = True
    verify_inputs: int = 8
    verify_images: Path | None = None
    seed: int | None = None
    uint8_input: bool = False  # preprocessing in the graph: uint8 NHWC pixels in, see uint8_input_module
    external_data_bytes: int = EXTERNAL_DATA_BYTES  # weights above this go to a .data file beside the ONNX
    golden_images: Path | None = None  # images for the golden set (default: calibration images, else synthetic)
    attention: str = "auto"  # auto | float | int8 | fp8: Q/DQ on attention (vitdeploy.exporters.attention)
    task: str | None = None  # classification | embedding; None: what the checkpoint is (vitdeploy.families)
    normalize: bool | None = None  # embeddings L2-normalized in the graph
    image_size: int | None = None  # another input size (DINOv2: its positions interpolated once, baked in)


@dataclass
class ExportReport:
    path: Path
    precision: str
    opset: int
    batch: str
    node_count: int
    op_histogram: dict[str, int]
    file_bytes: int
    export_seconds: float
    verification: Comparison | None = None
    tolerance: dict[str, float] | None = None
    qdq: dict[str, int] | None = None
    notes: list[str] = field(default_factory=list)
    golden: GoldenVerdict | None = None  # the exported file on ONNX Runtime against its own golden set
    golden_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "precision": self.precision, "opset": self.opset, "batch": self.batch,
            "node_count": self.node_count, "op_histogram": self.op_histogram, "file_bytes": self.file_bytes,
            "export_seconds": self.export_seconds,
            "verification": self.verification.to_dict() if self.verification else None,
            "tolerance": self.tolerance, "qdq": self.qdq, "notes": self.notes,
            "golden": self.golden.to_dict() if self.golden else None, "golden_bytes": self.golden_bytes,
        }

    def render(self) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.op_histogram.items(), key=lambda kv: -kv[1]))
        lines = [
            f"wrote {self.path} ({self.file_bytes / 1e6:.1f} MB, {self.precision}, opset {self.opset}, "
            f"batch {self.batch}) in {self.export_seconds:.1f} s",
            f"{self.node_count} nodes: {ops}",
        ]
        if self.qdq:
            lines.append(f"Q/DQ: {self.qdq['quantized']}/{self.qdq['quantizable']} MatMul/Gemm/Conv quantized")
        if self.verification:
            lines.append(f"verified with ONNX Runtime against torch: {self.verification.summary()}")
        if self.golden_bytes:
            lines.append(f"golden set ({self.golden_bytes / 1e3:.1f} kB in the metadata) on ONNX Runtime: "
                         + (self.golden.summary() if self.golden else "not checked (--no-verify)"))
        lines += self.notes
        return "\n".join(lines)


def output_name(config: Any) -> str:
    """The graph's output: ``logits`` for a classifier, ``embeddings`` for an embedding model."""
    from vitdeploy.artifacts.metadata import TASK_OUTPUTS

    return TASK_OUTPUTS[config.task]


@cache
def ort_max_opset() -> int:
    """Highest default-domain opset the installed ONNX Runtime loads (probed with a one-node model)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    best = 0
    for opset in range(17, onnx.defs.onnx_opset_version() + 1):
        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])], "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            best = opset
        except Exception:
            break
    return best


def uint8_coefficients(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``scale``, ``shift`` with ``x * scale + shift == (x / 255 - mean) / std`` (float32, per channel)."""
    m, s = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    return (1.0 / (255.0 * s)).astype(np.float32), (-m / s).astype(np.float32)


def folded_projection(conv: Any, scale: np.ndarray, shift: np.ndarray) -> tuple[Any, Any]:
    """The patch projection ``conv`` (kernel = stride = patch) as one matrix and bias over NHWC patches
    [ph * pw * C] with ``x * scale + shift`` per channel folded in: ``patch @ weight + bias`` equals the
    conv of the normalized pixels (computed in float64, then float32)."""
    import torch

    w = conv.weight.detach().to(torch.float64)  # [hidden, C, ph, pw]
    s = torch.from_numpy(scale).to(torch.float64)[None, :, None, None]
    t = torch.from_numpy(shift).to(torch.float64)[None, :, None, None]
    bias = (w * t).sum((1, 2, 3)) + (0.0 if conv.bias is None else conv.bias.detach().to(torch.float64))
    weight = (w * s).permute(2, 3, 1, 0).reshape(-1, w.shape[0])  # rows in NHWC patch order: ph, pw, C
    return weight.to(torch.float32), bias.to(torch.float32)


def uint8_input_module(model: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    """``model`` behind its preprocessing, as a ``torch.nn.Module`` whose graph starts from uint8 NHWC
    pixels (already resized and cropped): Cast (first: TensorRT reshapes no uint8 tensor), the patches
    cut out of NHWC (Reshape, Transpose, Reshape) and one MatMul that is the patch projection with
    ``(x / 255 - mean) / std`` folded into its weights (``--uint8-input``). A Transpose to NCHW, a
    multiply-add per channel and the Conv did the same work in three more passes over the pixels: 23% of
    the tiny ViT's time in ONNX Runtime, 8% of ViT-B/16's."""
    import torch

    weight, bias = folded_projection(model.vit.embeddings.patch_embeddings.projection,
                                     *uint8_coefficients(mean, std))

    class _Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias)
            self.patch = model.config.patch_hw
            self.config = model.config

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            _, h, w, c = pixel_values.shape
            (ph, pw), rows, cols = self.patch, h // self.patch[0], w // self.patch[1]
            x = pixel_values.to(torch.float32).reshape(-1, rows, ph, cols, pw, c).permute(0, 1, 3, 2, 4, 5)
            patches = x.reshape(-1, rows * cols, ph * pw * c) @ self.weight + self.bias
            return self.model.logits_from_patches(patches)

    return _Wrapped().eval()


def _example_input(config: Any, n: int, uint8: bool) -> Any:
    import torch

    h, w = config.image_hw
    if uint8:
        return torch.randint(0, 256, (n, h, w, config.num_channels), dtype=torch.uint8)
    return torch.randn(n, config.num_channels, h, w)


def _root_cause(error: BaseException) -> str:
    """The innermost exception's first line (torch.onnx wraps torch.export's error in pages of advice),
    or the line after the exporter's "Exception summary" heading."""
    inner = error
    while inner.__cause__ is not None or (inner.__context__ is not None and not inner.__suppress_context__):
        inner = inner.__cause__ or inner.__context__  # type: ignore[assignment]
    lines = [ln.strip() for ln in str(inner).splitlines() if ln.strip()]
    if inner is error and "## Exception summary" in lines:
        lines = lines[lines.index("## Exception summary") + 1:]
    text = lines[0] if lines else ""
    return f"{type(inner).__name__}: {text}" if inner is not error else text or type(error).__name__


def _torch_export(model: Any, config: Any, batch: int, dynamic: bool, opset: int, uint8: bool = False) -> Any:
    """The dynamo exporter, then onnxscript's optimizer with folding limits raised so the
    constant (cls + position) table and transposed weights fold into initializers.

    Nothing is silenced here: what torch.onnx logs or warns goes where the caller's logging sends it,
    and a failure raises ExportError with the exporter's own message (the traceback chained to it)."""
    import onnxscript.optimizer
    import torch

    example = _example_input(config, batch if not dynamic else 2, uint8)
    kwargs: dict[str, Any] = {}
    if dynamic:
        kwargs["dynamic_shapes"] = {"pixel_values": {0: torch.export.Dim("batch", min=1, max=4096)}}
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                model, (example,), None, dynamo=True, input_names=[INPUT_NAME], output_names=[output_name(config)],
                opset_version=opset, optimize=True, verbose=False, **kwargs,
            )
    except Exception as e:
        raise ExportError(f"torch.onnx could not export this model ({type(e).__name__}): {_root_cause(e)}; "
                          "rerun with --debug for the exporter's full diagnostics") from e
    # stays an onnx-ir model (no 2 GB protobuf limit) until it is known to be small
    model_ir = onnxscript.optimizer.optimize(program.model, input_size_limit=1 << 34, output_size_limit=1 << 34)
    model_ir.producer_name, model_ir.producer_version = "vitdeploy", __version__
    return model_ir


def _weight_bytes(model_ir: Any) -> int:
    return sum(v.const_value.nbytes for v in model_ir.graph.initializers.values() if v.const_value is not None)


def check_graph(proto: Any, dynamic: bool) -> None:
    """Lean and fully shaped: no shape-computation chains, every non-batch dim static."""
    import onnx

    left = sorted({n.op_type for n in proto.graph.node if n.op_type in FORBIDDEN_OPS})
    if left:
        raise ExportError(f"exported graph still has {', '.join(left)} nodes; please report this model config")
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        rest = dims[1:] if dynamic else dims
        if any(not d.HasField("dim_value") for d in rest):
            raise ExportError(f"tensor {vi.name} has a symbolic non-batch dimension after shape inference")


def histogram(proto: Any) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in proto.graph.node).most_common())


def _save(proto: Any, path: Path, large: bool) -> None:
    """Write a ModelProto; a large one keeps (or gets) its weights in ``<name>.data`` beside it."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    if large and not any(uses_external_data(t) for t in proto.graph.initializer):
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


def _verification_inputs(config: Any, opts: ExportOptions, batch: int | None) -> list[np.ndarray]:
    """Inputs in the artifact's form and batch sizes: random (fixed seed) for FP32/FP16; for INT8/FP8
    images from the calibration folder instead, since a quantized model is only accurate on the
    distribution it was calibrated on; then the ``--images`` given. With ``uint8_input`` these are
    uint8 NHWC pixels (random noise images, or the images resized), else normalized float32 NCHW.
    Fewer images than one static batch are repeated to fill it: verified on what there is."""
    from vitdeploy.preprocess import Preprocessing, find_images, load_images

    prep = Preprocessing.from_config(config)
    h, w = config.image_hw
    n = max(opts.verify_inputs, batch or 1)
    rng = np.random.default_rng(0)
    if PRECISION_STEPS[opts.precision].calibrated and opts.calib_dir is not None:
        files = find_images(opts.calib_dir)
        picks = rng.choice(len(files), size=min(len(files), 4 * n), replace=False)
        inputs = load_images([files[i] for i in sorted(picks)], prep, opts.uint8_input)
    elif opts.uint8_input:
        inputs = rng.integers(0, 256, (n, h, w, config.num_channels), dtype=np.uint8)
    else:
        inputs = rng.standard_normal((n, config.num_channels, h, w), dtype=np.float32)
    if opts.verify_images is not None:
        files = find_images(opts.verify_images)[:64]
        inputs = np.concatenate([inputs, load_images(files, prep, opts.uint8_input)])
    if batch is None:  # dynamic: mixed batch sizes prove the symbolic axis
        sizes, out, i = [1, 3, 4], [], 0
        while i < len(inputs):
            size = sizes[len(out) % len(sizes)]
            out.append(inputs[i:i + size])
            i += size
        return out
    if len(inputs) < batch:
        inputs = np.concatenate([inputs, np.repeat(inputs[-1:], batch - len(inputs), axis=0)])
    usable = len(inputs) - len(inputs) % batch
    return [inputs[i:i + batch] for i in range(0, usable, batch)]


def verification_session_options(precision: str) -> Any:
    """ONNX Runtime session options for verification. FP8: ORT's QDQ fusions are turned off
    (``session.disable_quant_qdq``): onnxruntime 1.30 fuses float8 DequantizeLinear -> MatMul ->
    QuantizeLinear into a QLinearMatMul that its CPU provider then refuses, so the file is checked
    as the Q/DQ graph it is (float math on dequantized values), which is what TensorRT implements."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if precision == "fp8":
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return so


def _verification_session(path: Path, precision: str) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), verification_session_options(precision),
                                    providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"ONNX Runtime cannot load the exported model: {str(e).splitlines()[0]}") from None


def verify_onnx(path: Path, model: Any, config: Any, opts: ExportOptions, batch: int | None,
                session: Any = None) -> Comparison:
    """Run the file with ONNX Runtime (CPU) and the float torch model on the same inputs (for a uint8
    input, torch gets the same pixels through :meth:`Preprocessing.normalize`, the float path)."""
    import torch

    from vitdeploy.preprocess import Preprocessing

    session = session or _verification_session(path, opts.precision)
    in_type = session.get_inputs()[0].type
    prep = Preprocessing.from_config(config)
    refs, outs = [], []
    for x in _verification_inputs(config, opts, batch):
        as_float = prep.normalize(x) if opts.uint8_input else x
        with torch.no_grad():
            refs.append(model(torch.from_numpy(as_float)).numpy())
        feed = x.astype(np.float16) if "float16" in in_type else x
        outs.append(session.run([output_name(config)], {INPUT_NAME: feed})[0].astype(np.float32))
    return compare_logits(np.concatenate(refs), np.concatenate(outs))


def make_golden(model: Any, config: Any, opts: ExportOptions) -> GoldenSet:
    """The golden set for this export: ``--golden-images`` (up to 8), else calibration images (4), else
    4 synthetic images (seed 0), with torch FP32's logits through decode -> preprocessing -> model."""
    import torch

    from vitdeploy.artifacts.golden import make_golden_set, pick_files, synthetic_images
    from vitdeploy.preprocess import Preprocessing, find_images, open_image

    prep = Preprocessing.from_config(config)
    folder = Path(opts.golden_images) if opts.golden_images is not None else opts.calib_dir
    if folder is not None:
        folder = Path(folder)
        files = pick_files(find_images(folder), 8 if opts.golden_images is not None else 4)
        images = [(f.relative_to(folder).as_posix(), open_image(f)) for f in files]
        source = f"{'images' if opts.golden_images is not None else 'calibration images'} from {Path(folder).name}"
    else:
        h, w = config.image_hw
        images, source = synthetic_images(4, (h * 5 // 4, w * 5 // 4), seed=0), "synthetic (seed 0)"

    def reference(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    return make_golden_set(images, prep, reference, opts.precision, source, task=config.task)


def check_golden(session: Any, golden: GoldenSet, config: Any, opts: ExportOptions,
                 batch: int | None) -> GoldenVerdict:
    """The exported file, on ONNX Runtime, against its own golden set (the whole decode path)."""
    from vitdeploy.preprocess import Preprocessing

    prep = Preprocessing.from_config(config)
    pixels = np.stack([prep.pixels(im) for im in golden.decoded()])
    x = pixels if opts.uint8_input else prep.normalize(pixels)
    if "float16" in session.get_inputs()[0].type:
        x = x.astype(np.float16)
    step = batch or len(x)
    outs = []
    for i in range(0, len(x), step):
        chunk = x[i:i + step]
        k = len(chunk)
        if k < step:  # a static batch: pad with the last image
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - k, axis=0)])
        outs.append(session.run([output_name(config)], {INPUT_NAME: chunk})[0][:k].astype(np.float32))
    return golden.check(np.concatenate(outs))


def _check_options(opts: ExportOptions) -> tuple[int, list[str], list[Path]]:
    """Refuse options that cannot work before any work is done; -> (opset, notes, calibration files)."""
    from vitdeploy.preprocess import find_images

    step = PRECISION_STEPS.get(opts.precision)
    if step is None or opts.precision not in TOLERANCES:
        *others, last = PRECISION_STEPS
        raise ExportError(f"unknown precision {opts.precision!r}: choose {', '.join(others)} or {last}")
    notes: list[str] = []
    opset = opts.opset
    if opset < step.min_opset:
        opset = step.min_opset
        notes.append(f"{opts.precision} needs {step.opset_reason} (opset {opset}): exported at opset {opset}")
    max_opset = ort_max_opset()
    if opset > max_opset:
        import onnxruntime

        raise ExportError(f"ONNX Runtime {onnxruntime.__version__} runs opsets up to {max_opset}, "
                          f"not {opset}: export with --opset {max_opset} or upgrade onnxruntime")
    if opts.fp16_io and opts.precision != "fp16":
        raise ExportError("--fp16-io applies to --precision fp16 only")
    if opts.fp16_io and opts.uint8_input:
        raise ExportError("give --fp16-io or --uint8-input, not both: a uint8-input model takes uint8 pixels")
    calib_files: list[Path] = []
    if step.calibrated:
        if opts.calib_dir is None:
            raise ExportError(f"--precision {opts.precision} needs --calib-dir DIR with calibration images")
        calib_files = find_images(opts.calib_dir)[: opts.calib_samples]
    if opts.dynamic_batch and opts.batch != 1:
        raise ExportError("give --batch N (static) or --dynamic-batch, not both")
    if opts.golden_images is not None:
        find_images(opts.golden_images)  # a wrong folder is refused before the export's work
    resolve_attention(opts.precision, opts.attention, opts.verify)  # a wrong --attention is refused here
    return opset, notes, calib_files


def _verify_staged(tmp: Path, model: Any, cfg: Any, opts: ExportOptions, batch: int | None,
                   golden: GoldenSet) -> tuple[Comparison, GoldenVerdict]:
    """The staged file against torch (:func:`verify_onnx`) and against its own golden set, on one ONNX
    Runtime session; ExportError (nothing written) past the precision's tolerance."""
    tolerance = TOLERANCES[opts.precision]
    session = _verification_session(tmp, opts.precision)
    comparison = verify_onnx(tmp, model, cfg, opts, batch, session=session)
    if not comparison.within(**tolerance):
        raise ExportError(
            f"{opts.precision} ONNX disagrees with torch beyond tolerance "
            f"(max abs <= {tolerance['max_abs_rel']:g} x scale, cosine >= {tolerance['min_cosine']}): "
            f"{comparison.summary()}; nothing written"
        )
    verdict = check_golden(session, golden, cfg, opts, batch)
    if not verdict.passed:
        raise ExportError(f"the {opts.precision} ONNX fails its own golden set on ONNX Runtime: "
                          f"{verdict.reason()}; nothing written")
    return comparison, verdict


def _trace(model: Any, opts: ExportOptions, opset: int) -> Any:
    """Stage "trace": the torch model (behind its preprocessing for ``uint8_input``) as an onnx-ir model."""
    from vitdeploy.preprocess import Preprocessing

    cfg = model.config
    prep = Preprocessing.from_config(cfg)
    exported = uint8_input_module(model, prep.mean, prep.std) if opts.uint8_input else model
    return _torch_export(exported, cfg, opts.batch, opts.dynamic_batch, opset, uint8=opts.uint8_input)


def _check_traced(model_ir: Any, opts: ExportOptions) -> tuple[Any, bool]:
    """Stage "check graph" -> (ModelProto, or None when the weights are over the external-data size; large)."""
    import onnx_ir as ir

    if _weight_bytes(model_ir) > opts.external_data_bytes:
        # ViT-H: the graph is checked on the IR; shape inference needs the 2 GB-limited proto
        left = sorted({n.op_type for n in model_ir.graph if n.op_type in FORBIDDEN_OPS})
        if left:
            raise ExportError(f"exported graph still has {', '.join(left)} nodes")
        return None, True
    proto = ir.serde.serialize_model(model_ir)
    check_graph(proto, opts.dynamic_batch)
    return proto, False


def _metadata(loaded: Any, opts: ExportOptions, opset: int, golden: GoldenSet, notes: list[str]) -> ArtifactMetadata:
    """Stage "metadata": what the artifact carries (config, preprocessing, labels, precision, golden set)."""
    from vitdeploy.preprocess import Preprocessing

    cfg = loaded.model.config
    extra = {"source_kind": loaded.kind, "opset": str(opset)}
    golden.attach(extra)
    if opts.uint8_input:
        extra["input"] = UINT8_NHWC
        h, w = cfg.image_hw
        notes.append(f"input: uint8 pixels [N, {h}, {w}, {cfg.num_channels}] (resized, not normalized); "
                     "the graph casts, cuts the patches out of NHWC and projects them (the model's mean/std "
                     "folded into the projection)")
    embedding = cfg.task == "embedding"
    return ArtifactMetadata(
        version=__version__, config=cfg.to_dict(), preprocessing=Preprocessing.from_config(cfg).to_dict(),
        labels=[] if embedding else cfg.labels, precision=opts.precision,
        batch="dynamic" if opts.dynamic_batch else str(opts.batch), source=str(loaded.source),
        source_sha256=loaded.sha256 or "", task=cfg.task, output_name=output_name(cfg), output_size=cfg.output_size,
        normalized=embedding and cfg.normalize, extra=extra,
    )


def _fp32_on_disk(model_ir: Any, large: bool, tmpdir: Path) -> Path:
    """The staging folder's layout (``out/`` for the artifact); -> where the precision step finds the FP32
    graph when it is large (written there now)."""
    import onnx_ir as ir

    (tmpdir / "out").mkdir()
    fp32_path = tmpdir / "fp32.onnx"
    if large:
        ir.save(model_ir, fp32_path, external_data=fp32_path.name + ".data")
    return fp32_path


def _to_precision(proto: Any, fp32_path: Path, tmp: Path, large: bool, cfg: Any, calib_files: list[Path],
                  opts: ExportOptions, batch: int | None, progress: bool, notes: list[str],
                  attention: str = "float") -> PrecisionResult:
    """Stage "precision": the FP32 graph (``proto``, or ``fp32_path`` when it is large) through
    ``opts.precision``'s step in PRECISION_STEPS; a calibrated one is fed ``calib_files``."""
    from vitdeploy.exporters.precision import calibration_batches
    from vitdeploy.preprocess import Preprocessing, open_image

    step = PRECISION_STEPS[opts.precision]
    calibration = None
    if step.calibrated:
        prep = Preprocessing.from_config(cfg)
        to_input = prep.pixels if opts.uint8_input else prep  # calibrate on what the graph takes
        calibration = calibration_batches(calib_files, lambda f: to_input(open_image(f)), batch, progress)
    job = PrecisionJob(opts.precision, proto, fp32_path, tmp, large, INPUT_NAME, opts.external_data_bytes,
                       fp16_io=opts.fp16_io, calib_method=opts.calib_method, calibration=calibration,
                       attention=attention)
    result = step.run(job)
    if step.calibrated:
        notes.append(f"calibrated on {len(calib_files)} images from {opts.calib_dir} ({opts.calib_method}"
                     f"{', distribution for fp8' if opts.precision == 'fp8' else ''})")
    return result


def _write_staged(result: PrecisionResult, meta: ArtifactMetadata, tmp: Path) -> None:
    """The graph with its metadata, written to ``tmp`` and checked by onnx's checker."""
    import onnx

    set_metadata(result.proto, meta)
    _save(result.proto, tmp, result.large)
    onnx.checker.check_model(str(tmp), full_check=not result.large)


def export_onnx(source: Any, output: str | Path, config: Any = None, options: ExportOptions | None = None,
                progress: bool = False) -> ExportReport:
    """Export ``source`` (anything :func:`vitdeploy.load_model` takes) to ``output``; see ExportOptions.

    Stages: check the options -> trace -> check the graph -> metadata (with the golden set) -> the
    precision's step (PRECISION_STEPS) -> write -> validate against torch and the golden set -> publish."""
    from vitdeploy.checkpoints import resolve

    opts = options or ExportOptions()
    output = Path(output)
    check_output_dir(output)
    opset, notes, calib_files = _check_options(opts)

    t0 = time.perf_counter()
    loaded = resolve(source, config, seed=opts.seed, task=opts.task, normalize=opts.normalize,
                     image_size=opts.image_size)
    model, cfg = loaded.model, loaded.model.config
    batch = None if opts.dynamic_batch else opts.batch
    model_ir = _trace(model, opts, opset)
    proto, large = _check_traced(model_ir, opts)
    golden = make_golden(model, cfg, opts)
    meta = _metadata(loaded, opts, opset, golden, notes)
    with staging_dir(output) as tmpdir:
        tmp = Path(tmpdir) / "out" / output.name
        fp32_path = _fp32_on_disk(model_ir, large, Path(tmpdir))
        del model_ir  # ViT-H: the IR's weights are on disk now
        modes, note = resolve_attention(opts.precision, opts.attention, opts.verify)
        for mode in modes:  # --attention auto: quantized, else float with the reason
            result = _to_precision(proto, fp32_path, tmp, large, cfg, calib_files, opts, batch, progress,
                                   notes if mode == modes[0] else [], mode)
            proto = None  # a second try reads the FP32 graph the first wrote to fp32_path
            _write_staged(result, meta, tmp)
            try:
                comparison, verdict = (_verify_staged(tmp, model, cfg, opts, batch, golden) if opts.verify
                                       else (None, None))
                break
            except ExportError as e:
                if mode == modes[-1]:
                    raise
                why = str(e).removesuffix("; nothing written")
                note = f"attention: float ({mode} attention failed the accuracy check: {why})"
        notes += [*result.notes, *([note] if note else [])]
        data_files = publish_onnx(tmp, output)
        if result.large:
            notes.append(f"weights in {', '.join(f.name for f in data_files)} (ONNX external data: the model "
                         "is over 2 GB; the name carries a content hash, so graph and weights always match)")
    return ExportReport(
        path=output, precision=opts.precision, opset=opset, batch=meta.batch,
        node_count=len(result.proto.graph.node), op_histogram=histogram(result.proto),
        file_bytes=output.stat().st_size, export_seconds=time.perf_counter() - t0, verification=comparison,
        tolerance=TOLERANCES[opts.precision], qdq=result.qdq, notes=notes, golden=verdict,
        golden_bytes=golden.nbytes,
    )
