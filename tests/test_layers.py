"""The layer contracts of .importlinter hold, and they would catch an import pointing back up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("importlinter", reason="import-linter is in the dev extra: pip install -e '.[dev]'")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_layers_kept() -> None:
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "vitdeploy", tmp_path / "vitdeploy", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    model = tmp_path / "vitdeploy" / "model.py"
    # a function-local import counts as much as a module-level one
    model.write_text(model.read_text() + "\n\ndef _up():\n    from vitdeploy.serving import batcher  # noqa\n")
    out = lint_imports(tmp_path)
    assert out.returncode != 0
    assert "vitdeploy.model -> vitdeploy.serving" in out.stdout
