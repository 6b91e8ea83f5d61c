"""torch -> ONNX, precision passes (FP16, INT8/FP8 Q/DQ), and the checks that prove them."""

from vitdeploy.artifacts.metadata import ArtifactMetadata, read_onnx_metadata
from vitdeploy.exporters.onnx_export import ExportOptions, ExportReport, export_onnx

__all__ = ["ArtifactMetadata", "ExportOptions", "ExportReport", "export_onnx", "read_onnx_metadata"]
