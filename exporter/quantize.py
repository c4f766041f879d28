"""INT8 quantization: ONNX Runtime static QDQ, and OpenVINO through NNCF. Calibrated on train-split images."""
from __future__ import annotations

import os
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np

from runtime.atomic import atomic_path, publish, scratch_path, write_text
from runtime.classifier import verbose
from runtime.metadata import METADATA_KEY, ModelMetadata

from .onnx_export import save_onnx_atomic, set_onnx_metadata

ORT_DEFAULTS = {"format": "QDQ", "activations": "U8", "weights": "S8", "per_channel": False, "skip_ends": False,
                "calibration": "MinMax"}


def end_nodes(model_proto) -> list[str]:
    """Names of the first and the last weighted node (Conv / Gemm / MatMul): the usual FP32 islands."""
    weighted = [n.name for n in model_proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    return [weighted[0], weighted[-1]] if len(weighted) > 1 else weighted


def head_nodes(model_proto) -> list[str]:
    """The last weighted node (the classifier) and every node after it (a pretrained head's logsumexp pooling of
    ImageNet rows): kept FP32 by every INT8 variant. Quantized, their ranges come from the calibration images,
    whose logits are smaller than a photo's: measured, NNCF's INT8 clipped the concepts' logits at 7.9 and ONNX
    Runtime's at 24.4 where FP32 gave 18-24 on photos, so a 3-class model answered "bird" on ties and the other
    output won on 92% of known photos. The head is a few thousand multiply-adds of millions."""
    nodes = list(model_proto.graph.node)
    weighted = [i for i, n in enumerate(nodes) if n.op_type in ("Conv", "Gemm", "MatMul")]
    return [n.name for n in nodes[weighted[-1]:]] if weighted else []


ORT_DEFAULT_SEVERITY = 2   # onnxruntime's own default: warnings and above


THIRD_PARTY_LOGGERS = ("", "nncf", "onnxruntime", "openvino", "torch", "torch.utils.cpp_extension", "torch.onnx")


@contextmanager
def quiet_tools():
    """The quantizers' own chatter (ORT graph warnings, "consider pre-processing", NNCF progress bars
    on stdout and its logger, Python warnings, torch's no-CUDA note) stays out of the user's terminal;
    errors still surface. ``--verbose`` (DISTILLER_VERBOSE=1) lets it all through. ONNX Runtime has no
    getter for its default log level: it goes back to ORT's default (warning)."""
    import logging
    import warnings

    if verbose():
        yield
        return
    loggers = [logging.getLogger(n) for n in THIRD_PARTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    if ort is not None:
        ort.set_default_logger_severity(3)
    try:
        with open(os.devnull, "w") as sink, redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if ort is not None:
            ort.set_default_logger_severity(ORT_DEFAULT_SEVERITY)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def quantize_onnx(fp32: Path, out: Path, calib_data: np.ndarray, metadata: ModelMetadata, **options) -> Path:
    """ONNX Runtime static quantization. ``options``: format QDQ|QOperator, activations U8|S8,
    weights S8|U8, per_channel, skip_ends (keep first and last layer FP32), calibration MinMax|Entropy|Percentile."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    opts = {**ORT_DEFAULTS, **options}
    types = {"U8": QuantType.QUInt8, "S8": QuantType.QInt8}

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"images": calib_data[i:i + 1]} for i in range(len(calib_data))])

        def get_next(self):
            return next(self.it, None)

    proto = onnx.load(str(fp32))
    exclude = (end_nodes(proto) if opts["skip_ends"] else []) + head_nodes(proto)
    with quiet_tools(), scratch_path(out) as tmp:
        quantize_static(str(fp32), str(tmp), Reader(), quant_format=QuantFormat[opts["format"]],
                        per_channel=opts["per_channel"], activation_type=types[opts["activations"]],
                        weight_type=types[opts["weights"]], calibrate_method=CalibrationMethod[opts["calibration"]],
                        nodes_to_exclude=exclude)
        proto = onnx.load(str(tmp))
    set_onnx_metadata(proto, metadata)
    save_onnx_atomic(proto, out)
    return out


def save_openvino(model, xml: Path, metadata: ModelMetadata) -> Path:
    """Save IR (xml + bin + sidecar json) under temporary names, then rename: bin, json, xml last."""
    import openvino as ov

    xml = Path(xml)
    model.set_rt_info(metadata.to_json(), [METADATA_KEY])
    with atomic_path(xml) as tmp:
        try:
            ov.save_model(model, str(tmp), compress_to_fp16=False)
            publish(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
        finally:
            tmp.with_suffix(".bin").unlink(missing_ok=True)
        write_text(xml.with_suffix(".json"), metadata.to_json() + "\n")
    return xml


def onnx_to_openvino(onnx_path: Path, xml: Path, metadata: ModelMetadata) -> Path:
    import openvino as ov
    return save_openvino(ov.convert_model(str(onnx_path)), xml, metadata)


def _ov_head_nodes(model) -> list[str]:
    """``head_nodes`` in an OpenVINO model: the last MatMul and every op after it (ordered topologically)."""
    ops = list(model.get_ordered_ops())
    last = max((i for i, op in enumerate(ops) if op.get_type_name() == "MatMul"), default=None)
    return [] if last is None else [op.get_friendly_name() for op in ops[last:]
                                    if op.get_type_name() not in ("Constant", "Result")]


def _ov_end_nodes(model) -> list[str]:
    ops = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in ("Convolution", "MatMul")]
    return [ops[0], ops[-1]] if len(ops) > 1 else ops


def quantize_openvino(fp32_xml: Path, out: Path, calibration: np.ndarray, metadata: ModelMetadata,
                      preset: str = "performance", skip_ends: bool = False, accuracy_control: bool = False,
                      validation: tuple[np.ndarray, np.ndarray] | None = None, max_drop: float = 0.01) -> Path:
    """NNCF post-training quantization; ``accuracy_control`` uses NNCF's own repair loop, which
    keeps layers in FP32 until top-1 agreement with FP32 on ``validation`` drops at most ``max_drop``."""
    import logging

    import nncf
    import openvino as ov

    nncf.set_log_level(logging.ERROR)
    model = ov.Core().read_model(str(fp32_xml))
    data = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))])
    kwargs = {"subset_size": len(calibration),
              "preset": nncf.QuantizationPreset.PERFORMANCE if preset == "performance" else nncf.QuantizationPreset.MIXED}
    ignored = (_ov_end_nodes(model) if skip_ends else []) + _ov_head_nodes(model)
    if ignored:
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=ignored, validate=False)
    if accuracy_control:
        val_x, ref_logits = validation
        ref = ref_logits.argmax(-1)
        val_data = nncf.Dataset([(val_x[i:i + 1], int(ref[i])) for i in range(len(val_x))], lambda item: item[0])

        def validate(compiled, items) -> float:
            out = compiled.outputs[0]
            hits = [int(np.argmax(compiled(x)[out]) == y) for x, y in items]
            return float(np.mean(hits))

        with quiet_tools():
            q = nncf.quantize_with_accuracy_control(model, data, val_data, validate, max_drop=max_drop,
                                                    drop_type=nncf.DropType.ABSOLUTE, **kwargs)
    else:
        with quiet_tools():
            q = nncf.quantize(model, data, **kwargs)
    return save_openvino(q, out, metadata)
