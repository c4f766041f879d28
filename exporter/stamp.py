"""Rewrite the distiller metadata of a model file already exported (``distiller eval --fit`` writes the fitted
open-set rule into every variant of a run). Each file is replaced atomically, as the exporter writes it."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from runtime.errors import UserError
from runtime.metadata import ModelMetadata

from .onnx_export import save_onnx_atomic, set_onnx_metadata
from .quantize import save_openvino


def _stamp_onnx(path: Path, metadata: ModelMetadata) -> None:
    import onnx
    proto = onnx.load(str(path))
    set_onnx_metadata(proto, metadata)
    save_onnx_atomic(proto, path)


def _stamp_openvino(path: Path, metadata: ModelMetadata) -> None:
    import openvino as ov
    save_openvino(ov.Core().read_model(str(path)), path, metadata)


STAMPERS: dict[str, Callable[[Path, ModelMetadata], None]] = {".onnx": _stamp_onnx, ".xml": _stamp_openvino}


def write_metadata(path: Path, metadata: ModelMetadata) -> None:
    """Replace ``path``'s metadata with ``metadata`` (the weights are untouched)."""
    stamp = STAMPERS.get(Path(path).suffix.lower())
    if stamp is None:
        raise UserError(f"{path}: cannot rewrite the metadata of a {Path(path).suffix} file: use .onnx or .xml")
    stamp(Path(path), metadata)
