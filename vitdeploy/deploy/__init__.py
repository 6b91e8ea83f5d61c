"""``vitdeploy deploy``: one checkpoint -> a verified deployment bundle (ONNX files, engines, their
verification, accuracy, a tuned and benchmarked CPU path per artifact, a Triton repository, report.json
and a self-contained report.html).

This layer sits above bench, tune, evaluate, verify and serving's Triton writer, below the CLI.
"""

from vitdeploy.deploy.bundle import DeployOptions, DeployResult, deploy
from vitdeploy.deploy.stages import STAGES

__all__ = ["STAGES", "DeployOptions", "DeployResult", "deploy"]
