import subprocess
import sys
import time

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
