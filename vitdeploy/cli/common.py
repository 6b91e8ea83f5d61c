"""Option groups and helpers several commands share (model source, first-load check, lists, opening)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click


# ---------------------------------------------------------------------------------------------
def model_options(f: Any) -> Any:
    f = click.option("--seed", type=int, default=None, help="Random-init seed for a preset.")(f)
    f = click.option("--config", "config", default=None,
                     help="config.json (or preset name) for bare timm/HF weight files.")(f)
    f = click.option("--preset", default=None, help="Architecture preset for bare weight files.")(f)
    return f


def verify_options(f: Any) -> Any:
    f = click.option("--allow-drift", is_flag=True,
                     help="Run even when the artifact fails its golden set on this machine (for experts).")(f)
    f = click.option("--no-verify", is_flag=True,
                     help="Skip the first-load check of the artifact's golden set (run once per machine and "
                     "runtime, the verdict kept in <stem>.verified.json).")(f)
    return f


def require_verified_option(f: Any) -> Any:
    """--require-verified (serve, predict, bench): refuse an artifact that cannot be verified."""
    return click.option("--require-verified", is_flag=True,
                        help="Refuse an artifact that carries no golden set (so cannot be verified here), "
                        "instead of running it with a warning.")(f)


def quiet_exporter_logs() -> None:
    """The library leaves logging and warnings alone; this process (the CLI) hides torch.onnx's notices
    ("torchvision is not installed"), the FP16 converter's per-weight clamping warnings and ONNX Runtime's
    quantizer advice ("consider pre-processing", for other graphs) unless --debug."""
    import contextlib
    import logging
    import warnings

    if not os.environ.get("VITDEPLOY_DEBUG"):
        # torch sets its loggers' levels when imported: set ours after that (without torch, the export
        # itself says what to install)
        with contextlib.suppress(ImportError):
            import torch  # noqa: F401
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module="onnxconverter_common")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        logging.getLogger().addFilter(_not_quantizer_advice)


def _not_quantizer_advice(record: Any) -> bool:
    return "pre-processing before quantization" not in record.getMessage()


def config_arg(preset: str | None, config: str | None) -> str | None:
    if preset and config:
        raise click.UsageError("give --preset or --config, not both")
    return preset or config


def check_built(engine: Path) -> None:
    """The golden set on the engine just built, where it runs; the verdict goes into its sidecar."""
    from vitdeploy.verify import check_built_engine

    record = check_built_engine(engine)
    if record["verified"] and not record["passed"]:
        raise click.ClickException(f"{engine.name} drifts from its golden set on {record['gpu']}: {record['reason']}")
    click.echo(f"golden set: {record['summary'] if record['verified'] else record['reason']} (in the sidecar)")


def has_gpu() -> bool:
    from vitdeploy.engines.tensorrt.build import current_gpu

    return current_gpu() is not None


def split_list(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def open_artifact(artifact: str, backend: str, threads: int | None = None, dtype: str | None = None,
                  device: str = "auto", **options: Any) -> Any:
    """Open an artifact for a command: threads where the backend has them, and ``dtype`` as the backend's
    own compute-format option (the registry says which), behind the first-load golden check."""
    from vitdeploy.engines import artifact_kind, registry
    from vitdeploy.verify import open_verified

    kind = artifact_kind(artifact)
    if threads and backend in ("onnxruntime", "openvino", "torch", "auto") and kind != "engine":
        options["threads"] = threads
    resolved = "torch" if backend == "auto" and kind == "checkpoint" else backend
    options.update(registry.dtype_options(resolved, dtype))
    return open_verified(artifact, backend=backend, device=device, **options)


def int_list(value: str, what: str = "batch sizes") -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"{what} must be positive integers")
    return out


def json_option(f: Any) -> Any:
    """``--json [PATH]``, one meaning in every command: the results as JSON, written to PATH, or to stdout
    (instead of the human-readable output) when given alone. Alone, put it last or write ``--json=-``."""
    return click.option("--json", "json_out", is_flag=False, flag_value="-", default=None, metavar="[PATH]",
                        help="Results as JSON: to PATH, or alone to stdout instead of the usual output.")(f)


def write_json(json_out: str | None, payload: Any) -> None:
    """Write ``payload`` where ``--json`` says (nothing when it was not given)."""
    if not json_out:
        return
    text = json.dumps(payload, indent=2)
    if json_out == "-":
        click.echo(text)
        return
    from vitdeploy.io import atomic_write_bytes

    atomic_write_bytes(Path(json_out), text.encode())
