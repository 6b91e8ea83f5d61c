"""Moved: :mod:`vitdeploy.engines.tensorrt.build` (the TensorRT code is one subpackage now). This name stays
an alias of that module for one release."""

import sys

from vitdeploy.engines.tensorrt import build as _moved

sys.modules[__name__] = _moved
