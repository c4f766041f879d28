"""torch student -> ONNX / OpenVINO IR, FP32 and INT8, each measured; the deployable pick."""
from .variants import VARIANTS, ExportContext, export_all, select

__all__ = ["VARIANTS", "ExportContext", "export_all", "select"]
