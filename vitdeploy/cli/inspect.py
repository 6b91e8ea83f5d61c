"""`vitdeploy inspect`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from vitdeploy.cli.app import main
from vitdeploy.cli.common import json_option, write_json


@main.command()
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
def inspect(artifact: Path, json_out: str | None) -> None:
    """Show an ONNX's metadata, op histogram and Q/DQ coverage, or an engine's sidecar, I/O and layers."""
    from vitdeploy.inspection import inspect_artifact

    info = inspect_artifact(artifact)
    write_json(json_out, info)
    if json_out != "-":
        click.echo(_render_inspect(info))


def _render_inspect(info: dict[str, Any]) -> str:
    lines = [f"{info['path']} ({info['kind']}, {info['bytes'] / 1e6:.1f} MB)"]
    for key, value in info.items():
        if key in ("path", "kind", "bytes", "model"):
            continue
        if key == "attention":
            lines += ["  " + line for line in _render_attention(value)]
            continue
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        lines.append(f"  {key}: {value}")
    model = info.get("model") or {}
    if model:
        cfg = model.get("config", {})
        if model.get("task") == "embedding":
            task = (f"embedding: {model.get('output_name')} of {model.get('output_size')}"
                    f"{', L2-normalized' if model.get('normalized') else ''}")
        else:
            task = f"classifier: {model.get('output_name', 'logits')} of {len(model.get('labels', []))} labels"
        lines.append(f"  model: {cfg.get('hidden_size')}x{cfg.get('num_hidden_layers')} layers, "
                     f"{task}, precision {model.get('precision')}, "
                     f"from {model.get('source')} (vitdeploy {model.get('version')})")
    return "\n".join(lines)


def _render_attention(fusion: dict[str, Any]) -> list[str]:
    """The static fused-attention check: its summary, then one line per block that breaks a rule."""
    lines = [fusion["summary"]]
    for b in fusion["blocks"]:
        if b["broken"]:
            lines.append(f"  block {b['index']} ({b['qk']}, head size {b['head_size']}, {b['sequence']} tokens): "
                         f"{b['broken']} broken: {b['why']}")
    return lines
