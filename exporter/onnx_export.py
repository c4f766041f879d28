"""torch student -> ONNX FP32 with the distiller metadata embedded."""
from __future__ import annotations

import warnings
from pathlib import Path

from runtime.atomic import atomic_path, scratch_path
from runtime.metadata import METADATA_KEY, ModelMetadata

INPUT_NAME, OUTPUT_NAME = "images", "logits"


def set_onnx_metadata(model_proto, metadata: ModelMetadata) -> None:
    keep = [p for p in model_proto.metadata_props if p.key != METADATA_KEY]
    del model_proto.metadata_props[:]
    model_proto.metadata_props.extend(keep)
    entry = model_proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata.to_json()
    model_proto.producer_name = "distiller"


def save_onnx_atomic(model_proto, path: Path) -> None:
    import onnx
    with atomic_path(path) as tmp:
        onnx.save(model_proto, str(tmp))


def export_onnx(model, input_size: int, path: Path, metadata: ModelMetadata, opset: int = 17) -> Path:
    """Export with a dynamic batch axis. Uses torch's TorchScript exporter (seconds, no onnxscript
    needed at run time); falls back to the dynamo exporter where the former is gone."""
    import onnx
    import torch

    path = Path(path)
    model = model.eval().cpu()
    x = torch.zeros(1, 3, input_size, input_size)
    with warnings.catch_warnings(), scratch_path(path) as tmp:
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        except (TypeError, RuntimeError, AttributeError):
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(model, (x,), str(tmp), dynamo=True, opset_version=max(opset, 18), input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), external_data=False)
        proto = onnx.load(str(tmp))
    set_onnx_metadata(proto, metadata)
    save_onnx_atomic(proto, path)
    return path
