"""Artifacts: a model saved so that it reloads without executing pickled code, one module per kind.

Every artifact is a folder: its weights (``model.safetensors``, a quantized state dict read with
``weights_only=True``, or one ``.onnx`` file) and ``artifact.json`` (``sidecar``: the kind, the architecture
as the model config, class names, input size, normalisation, surgery, quantization settings). An artifact's
size is the bytes of all its files. ``load_artifact`` reloads any kind; ``resolve_artifact`` turns a run
folder into one of its artifacts.
"""

from patholite.artifacts.int8_dynamic import INT8_WEIGHTS, save_int8_dynamic_artifact
from patholite.artifacts.load import load_artifact
from patholite.artifacts.onnx import ONNX_FILE, OrtModule, save_onnx_artifact, write_onnx_sidecar
from patholite.artifacts.qat import load_qat_artifact, save_qat_artifact
from patholite.artifacts.resolve import resolve_artifact
from patholite.artifacts.sidecar import SIDECAR, is_smt_artifact, read_sidecar
from patholite.artifacts.torch_float import (
    WEIGHTS,
    create_float_twin,
    load_float_artifact,
    save_float_artifact,
)

__all__ = [
    "INT8_WEIGHTS",
    "ONNX_FILE",
    "SIDECAR",
    "WEIGHTS",
    "OrtModule",
    "create_float_twin",
    "is_smt_artifact",
    "load_artifact",
    "load_float_artifact",
    "load_qat_artifact",
    "read_sidecar",
    "resolve_artifact",
    "save_float_artifact",
    "save_int8_dynamic_artifact",
    "save_onnx_artifact",
    "save_qat_artifact",
    "write_onnx_sidecar",
]
