"""Names that moved in the restructuring keep working for one release, with a warning naming the new home."""

from __future__ import annotations

import importlib

import pytest

from vitdeploy import sysinfo

MOVED = [
    ("vitdeploy.engines.onnxruntime_backend", "default_threads", sysinfo.usable_cpus),
    ("vitdeploy.engines.sidecar", "FLAVOUR_TITLES", sysinfo.TRT_FLAVOURS),
    ("vitdeploy.engines.sidecar", "RTX_TARGETS", sysinfo.RTX_COMPUTE_CAPABILITIES),
    ("vitdeploy.engines.sidecar", "flavours_for", sysinfo.trt_flavours_for),
    ("vitdeploy.engines.tensorrt_build", "RTX_TARGETS", sysinfo.RTX_COMPUTE_CAPABILITIES),
]


@pytest.mark.parametrize(("module", "name", "now"), MOVED)
def test_moved_names_warn_and_work(module, name, now):
    mod = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=rf"{module}\.{name} moved to vitdeploy\.sysinfo\."):
        assert getattr(mod, name) is now


def test_unknown_names_are_still_attribute_errors():
    from vitdeploy.engines import sidecar

    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        sidecar.nope  # noqa: B018
