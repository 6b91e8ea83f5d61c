"""Names that moved in the restructuring keep working for one release, with a warning naming the new home."""

from __future__ import annotations

import importlib

import pytest

from vitdeploy import sysinfo

MOVED = [
    ("vitdeploy.engines.onnxruntime_backend", "default_threads", sysinfo.usable_cpus),
    ("vitdeploy.engines.tensorrt.sidecar", "FLAVOUR_TITLES", sysinfo.TRT_FLAVOURS),
    ("vitdeploy.engines.tensorrt.sidecar", "RTX_TARGETS", sysinfo.RTX_COMPUTE_CAPABILITIES),
    ("vitdeploy.engines.tensorrt.sidecar", "flavours_for", sysinfo.trt_flavours_for),
    ("vitdeploy.engines.tensorrt.build", "RTX_TARGETS", sysinfo.RTX_COMPUTE_CAPABILITIES),
]


@pytest.mark.parametrize(("module", "name", "now"), MOVED)
def test_moved_names_warn_and_work(module, name, now):
    mod = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=rf"{module}\.{name} moved to vitdeploy\.sysinfo\."):
        assert getattr(mod, name) is now


def test_unknown_names_are_still_attribute_errors():
    from vitdeploy.engines.tensorrt import sidecar

    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        sidecar.nope  # noqa: B018


@pytest.mark.parametrize(("old", "new"), [
    ("vitdeploy.exporters.metadata", "vitdeploy.artifacts.metadata"),
    ("vitdeploy.engines.tensorrt_build", "vitdeploy.engines.tensorrt.build"),
    ("vitdeploy.engines.tensorrt_runtime", "vitdeploy.engines.tensorrt.runtime"),
    ("vitdeploy.engines.sidecar", "vitdeploy.engines.tensorrt.sidecar"),
    ("vitdeploy.engines.cuda_memory", "vitdeploy.engines.tensorrt.cuda_memory"),
])
def test_moved_modules_are_the_new_ones(old, new):
    """A moved module's old name is the same module object, so its attributes and patches are shared."""
    assert importlib.import_module(old) is importlib.import_module(new)
