"""torch student -> ONNX / OpenVINO IR, FP32 and INT8, each measured; the deployable pick."""
from .calibration import quantizer_split, surrogate_rule
from .stamp import write_metadata
from .variants import VARIANTS, ExportContext, FidelitySet, export_all, select

__all__ = ["VARIANTS", "ExportContext", "FidelitySet", "export_all", "quantizer_split", "select", "surrogate_rule", "write_metadata"]
