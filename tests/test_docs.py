"""Every command the README and docs/ show exists as written: the subcommand, and each option it uses.

The README's command blocks also run for real: `ci:install-and-run` and `ci:test` in .ci/run's main and
test stages, `ci:examples` in its examples stage.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from vitdeploy.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE = re.compile(r"```[a-z]*\n(.*?)```|`([^`\n]+)`", re.S)


def _commands(prefix: str) -> list[tuple[str, str]]:
    """(page, command) for every `prefix ...` in a code span or block, a block's lines joined at '\\'."""
    found = []
    for page in PAGES:
        for block, span in CODE.findall(page.read_text(encoding="utf-8")):
            text = (block or span).replace("\\\n", " ")
            for line in text.splitlines():
                for part in re.split(r"&&|;|\|\||(?<!\\)\|(?! )", line):
                    part = part.split("#", 1)[0].strip().rstrip("&").strip()
                    if part.startswith(prefix):
                        found.append((page.name, part))
    return found


def _options(command: str) -> tuple[list[str], list[str]]:
    """The words and the --options of a documented command, placeholders ([...], a|b) left out."""
    text = re.sub(r"\[[^\]]*\]", lambda m: " " + m.group(0)[1:-1] + " ", command)  # [--x N] -> --x N
    text = text.replace("\\|", "|")
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    opts = sorted({w.split("=", 1)[0] for w in words if re.fullmatch(r"--[a-z][a-z0-9-]*(=.*)?", w)})
    return words, opts


DOCUMENTED = _commands("vitdeploy ")


def test_the_docs_show_commands():
    assert len(DOCUMENTED) > 40
    assert {c.split()[1] for _, c in DOCUMENTED} >= {"export", "build", "bench", "deploy", "serve", "triton",
                                                      "verify", "tune", "predict", "eval", "inspect", "compare"}


@pytest.mark.parametrize(("page", "command"), DOCUMENTED, ids=[f"{p}:{c[:60]}" for p, c in DOCUMENTED])
def test_documented_command_exists(page, command):
    words, opts = _options(command)
    if words[1] in ("--version", "--help", "-h"):
        return
    sub = main.get_command(click.Context(main), words[1])
    assert sub is not None, f"{page}: `{command}`: vitdeploy has no command {words[1]!r}"
    known = {o for p in sub.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
    unknown = [o for o in opts if o not in known]
    assert not unknown, f"{page}: `{command}`: `vitdeploy {words[1]}` has no option {', '.join(unknown)}"


SCRIPTS = _commands("python benchmarks/")


@pytest.mark.parametrize(("page", "command"), SCRIPTS, ids=[f"{p}:{c[:60]}" for p, c in SCRIPTS])
def test_documented_benchmark_script_exists(page, command):
    words, opts = _options(command)
    script = ROOT / words[1]
    assert script.is_file(), f"{page}: `{command}`: no {words[1]}"
    source = script.read_text()
    missing = [o for o in opts if f'"{o}"' not in source]
    assert not missing, f"{page}: `{command}`: {words[1]} takes no {', '.join(missing)}"


def test_a_stale_option_is_caught():
    words, opts = _options("vitdeploy build m.onnx [--workspace-gb 4]")
    sub = main.get_command(click.Context(main), words[1])
    known = {o for p in sub.params for o in p.opts}
    assert "--workspace-gb" in opts and "--workspace-gb" not in known


BLOCK = re.compile(r"(?:<!-- (ci|docs:skip)[: ]?([^>]*?) -->\s*)?```bash\n(.*?)```", re.S)


def _bash_blocks() -> list[tuple[str, str, str, str]]:
    """(page, tag, reason, script) for every ```bash block of README.md and docs/*.md."""
    return [(page.name, tag, reason.strip(), script) for page in PAGES
            for tag, reason, script in BLOCK.findall(page.read_text(encoding="utf-8"))]


BASH = _bash_blocks()


def test_every_bash_block_is_run_or_skipped_with_a_reason():
    assert len(BASH) >= 6
    for page, tag, reason, script in BASH:
        assert tag in ("", "ci", "docs:skip"), (page, tag)
        if tag:
            assert reason, f"{page}: a bash block skipped without a reason: {script[:60]!r}"


@pytest.mark.parametrize(("page", "tag", "reason", "script"), BASH, ids=[f"{b[0]}:{b[3][:40]}" for b in BASH])
def test_bash_block(page, tag, reason, script, tmp_path):
    """Each block runs as written (bash -euo pipefail, in a scratch folder), or says why it cannot here."""
    import subprocess

    if tag == "ci":
        ci = (ROOT / ".ci" / "run").read_text()
        assert f"readme_command {reason}" in ci, f"{page}: ci:{reason} is not run by .ci/run"
        pytest.skip(f"run as written by .ci/run (readme_command {reason})")
    if tag == "docs:skip":
        pytest.skip(f"{page}: {reason}")
    import os
    import sys

    # the commands of this Python's environment, as a reader's shell with it activated finds them
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, f"{page}: block failed:\n{script}\n{out.stdout[-2000:]}{out.stderr[-2000:]}"
