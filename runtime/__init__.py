"""distiller's torch-free runtime: load an exported model, classify images.

Imports only numpy, Pillow and onnxruntime / openvino (lazily).
"""
from .classifier import Classifier, backends, physical_cores, register_backend, resolve_model_path, softmax
from .errors import UserError
from .metadata import METADATA_KEY, SCHEMA_VERSION, ModelMetadata, Preprocess
from .preprocess import load_image, preprocess

__all__ = [
    "Classifier", "ModelMetadata", "Preprocess", "UserError", "METADATA_KEY", "SCHEMA_VERSION",
    "backends", "load_image", "physical_cores", "preprocess", "register_backend", "resolve_model_path", "softmax",
]
