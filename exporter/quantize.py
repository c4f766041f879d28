"""INT8 quantization: ONNX Runtime static QDQ, and OpenVINO through NNCF. Calibrated on train-split images."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from runtime.metadata import ModelMetadata

from .onnx_export import save_onnx_atomic, set_onnx_metadata


def quantize_onnx(fp32: Path, out: Path, calibration: np.ndarray, metadata: ModelMetadata,
                  per_channel: bool = False, quant_format: str = "QDQ", method: str = "MinMax") -> Path:
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"images": calibration[i:i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self.it, None)

    tmp = out.with_name(f".{out.name}.raw.tmp")
    quantize_static(str(fp32), str(tmp), Reader(), quant_format=QuantFormat[quant_format],
                    per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod[method])
    proto = onnx.load(str(tmp))
    tmp.unlink()
    set_onnx_metadata(proto, metadata)
    save_onnx_atomic(proto, out)
    return out


def save_openvino(model, xml: Path, metadata: ModelMetadata) -> Path:
    """Save IR (xml + bin + sidecar json) under temporary names, then rename: bin, json, xml last."""
    import openvino as ov

    from runtime.metadata import METADATA_KEY
    xml = Path(xml)
    xml.parent.mkdir(parents=True, exist_ok=True)
    model.set_rt_info(metadata.to_json(), [METADATA_KEY])
    tmp = xml.with_name(f".{xml.stem}.tmp.xml")
    ov.save_model(model, str(tmp), compress_to_fp16=False)
    os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
    side = xml.with_suffix(".json")
    side_tmp = side.with_name(f".{side.name}.tmp")
    side_tmp.write_text(metadata.to_json() + "\n")
    os.replace(side_tmp, side)
    os.replace(tmp, xml)
    return xml


def onnx_to_openvino(onnx_path: Path, xml: Path, metadata: ModelMetadata) -> Path:
    import openvino as ov
    return save_openvino(ov.convert_model(str(onnx_path)), xml, metadata)


def quantize_openvino(fp32_xml: Path, out: Path, calibration: np.ndarray, metadata: ModelMetadata,
                      preset: str = "performance") -> Path:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32_xml))
    data = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))])
    q = nncf.quantize(model, data, subset_size=len(calibration),
                      preset=nncf.QuantizationPreset.PERFORMANCE if preset == "performance" else nncf.QuantizationPreset.MIXED)
    return save_openvino(q, out, metadata)
