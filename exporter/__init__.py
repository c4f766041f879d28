"""torch student -> ONNX / OpenVINO IR, FP32 and INT8, each measured; the deployable pick."""
from .calibration import open_set_threshold, quantizer_split
from .variants import VARIANTS, ExportContext, FidelitySet, export_all, select

__all__ = ["VARIANTS", "ExportContext", "FidelitySet", "export_all", "open_set_threshold", "quantizer_split", "select"]
