import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from vitdeploy import __version__
from vitdeploy.cli import main


def test_help_is_instant_and_imports_nothing_heavy():
    code = ("import sys, time; t = time.perf_counter(); from vitdeploy.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "mods = ('torch', 'onnx', 'onnxruntime', 'tensorrt_rtx', 'transformers')\n"
            "heavy = [m for m in mods if m in sys.modules]\n"
            "print(heavy, time.perf_counter() - t, file=sys.stderr)")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert time.perf_counter() - start < 3.0  # interpreter start included; the import itself is far less
    heavy, seconds = out.stderr.strip().rsplit(" ", 1)
    assert heavy == "[]" and float(seconds) < 1.0
    assert "export" in out.stdout and "info" in out.stdout


def test_version_and_info():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    r = CliRunner().invoke(main, ["info"])
    assert r.exit_code == 0, r.output
    assert "onnxruntime" in r.output and "torch" in r.output and "cuda devices" in r.output


def test_user_errors_are_one_line():
    r = CliRunner().invoke(main, ["export", "--model", "vit-nope-patch16-224", "--output", "x.onnx"])
    assert r.exit_code == 1
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: unknown model 'vit-nope-patch16-224'")


def test_a_bug_is_not_passed_off_as_a_user_error(monkeypatch):
    """A ValueError from a bug keeps its traceback; only VitDeployError (and missing files) are one line."""
    def broken(*args, **kwargs):
        raise ValueError("internal invariant broken")

    monkeypatch.setattr("vitdeploy.sysinfo.collect", broken)
    r = CliRunner().invoke(main, ["info"])
    assert isinstance(r.exception, ValueError) and "Error: internal invariant" not in r.output
    from vitdeploy.config import ViTConfig
    from vitdeploy.errors import ConfigError

    with pytest.raises(ConfigError, match="hidden_size"):  # still a ValueError for API callers
        ViTConfig(hidden_size=-1)
    assert issubclass(ConfigError, ValueError)


def _readme_block(name: str) -> str:
    """The fenced bash block after `<!-- ci:NAME -->` in README.md, as .ci/run extracts and runs it."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- ci:" + re.escape(name) + r" -->\s*```bash\n(.*?)```", text, re.S)
    assert m, f"README.md lost its `<!-- ci:{name} -->` block, which .ci/run runs"
    return m.group(1).replace("\\\n", " ")


def _extras_installed(block: str) -> list[str]:
    import re

    m = re.search(r"pip install -e '\.\[([^\]]+)\]'", block)
    assert m, f"no `pip install -e '.[...]'` in {block!r}"
    return m.group(1).split(",")


def test_readme_commands_install_what_they_run():
    """The README's two commands (what .ci/run runs): every extra exists, the test command installs
    pytest and ruff before running them, and every vitdeploy option the main command uses exists."""
    import shlex
    from pathlib import Path

    import pytest

    tomllib = pytest.importorskip("tomllib", reason="Python 3.10 has no tomllib; the 3.11+ runs check this")
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def installed(block: str) -> set[str]:
        names = set()
        for extra in _extras_installed(block):
            assert extra in extras, f"README installs extra {extra!r}, which pyproject does not define"
            names |= {r.split(">")[0].split("[")[0].split("=")[0].strip().lower() for r in extras[extra]}
        return names

    test = _readme_block("test")
    assert test.index("pip install") < test.index("python -m pytest")
    assert {"pytest", "ruff"} <= installed(test)

    run = _readme_block("install-and-run")
    assert "scikit-learn" in installed(run) and "tensorrt-rtx-cu13" in installed(run)  # datasets, build
    precisions = []
    for part in run.split("&&"):
        argv = shlex.split(part)
        if not argv or argv[0] != "vitdeploy":
            continue
        command = main.commands[argv[1]]
        known = {opt for param in command.params for opt in param.opts}
        unknown = [a for a in argv[2:] if a.startswith("--") and a not in known]
        assert not unknown, f"`vitdeploy {argv[1]}` has no {unknown}"
        if "--precision" in argv:
            precisions += argv[argv.index("--precision") + 1].split(",")
        if argv[1] == "deploy":  # engines asked for, so the bundle holds them even without a GPU here
            assert "--compute-capability" in argv
    assert {"fp16", "int8"} <= set(precisions)  # the mission's engines, not only FP32


def test_json_has_one_meaning(request, tmp_path):
    """`--json` alone prints JSON instead of the usual output; `--json PATH` writes it there as well."""
    import json

    pytest.importorskip("torch", reason="the ONNX to inspect is exported with torch (the main test stage runs this)")
    serving_onnx = request.getfixturevalue("serving_onnx")

    r = CliRunner().invoke(main, ["inspect", str(serving_onnx), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["kind"] == "onnx"
    out = tmp_path / "inspect.json"
    r = CliRunner().invoke(main, ["inspect", str(serving_onnx), "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["kind"] == "onnx" and r.stdout.startswith(str(serving_onnx))
    for command in ("bench", "tune", "predict", "compare", "verify", "eval", "inspect"):
        params = {p.name: p for p in main.commands[command].params}
        assert params["json_out"].opts == ["--json"] and params["json_out"].flag_value == "-", command
