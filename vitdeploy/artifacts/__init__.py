"""What travels inside an artifact besides the model: the golden set (:mod:`vitdeploy.artifacts.golden`).

This layer sits on config, io, preprocess and metrics, below exporters and engines, so every layer
that writes or reads an artifact can use it.
"""

from vitdeploy.artifacts.golden import GoldenRow, GoldenSet, GoldenVerdict

__all__ = ["GoldenRow", "GoldenSet", "GoldenVerdict"]
