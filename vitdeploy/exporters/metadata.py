"""Moved: the ONNX metadata's typed home is :mod:`vitdeploy.artifacts.metadata` (below both exporters and
engines). This name stays an alias of that module for one release."""

import sys

from vitdeploy.artifacts import metadata as _metadata

sys.modules[__name__] = _metadata
