"""Kind ``openvino``: an OpenVINO IR (``model.xml`` graph + ``model.bin`` weights) run by OpenVINO's CPU
plugin behind the ``nn.Module`` call the evaluators and timers use. Nothing is unpickled: the IR is XML
and raw tensors.

Precision. The sidecar's ``precision`` is the ``INFERENCE_PRECISION_HINT`` the model is compiled with,
always set explicitly: ``f32`` (FP32, and the float parts of an INT8 model) or ``bf16``. OpenVINO's own
default on a CPU with native bf16 is bf16, so an "FP32" model compiled with defaults is not FP32 there.
A ``bf16`` artifact is refused on a CPU without native bf16 (``avx512_bf16`` or AMX; never on ARM, where
OpenVINO has no bf16), where it would be emulated or silently run otherwise
(``accelerators.machine.bf16_unsupported_reason``).

Conversion is from the float ONNX file patholite exports (``ov.convert_model`` on it): the export is the one
ONNX Runtime uses too, so both runtimes (and OpenVINO's own tools) read the same graph, with its named
``image`` input and dynamic batch axis. (``ov.convert_model`` on the torch module also works for timm ViTs,
but traces a second path whose input is unnamed and of dynamic size.)"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from patholite.accelerators import machine
from patholite.accelerators.machine import cpu_flags  # noqa: F401  (re-exported for scripts)
from patholite.artifacts.sidecar import SIDECAR, write_sidecar
from patholite.compress.nncf_ptq import import_openvino
from patholite.errors import AcceleratorError, CheckpointError, ConfigError
from patholite.io import current_umask

KIND = "openvino"
XML_FILE = "model.xml"
BIN_FILE = "model.bin"
PRECISIONS = ("f32", "bf16")
# what a user may ask for: a precision, or ``auto``: OpenVINO's own default here (``resolve_precision``)
PRECISION_CHOICES = ("auto", *PRECISIONS)


# ------------------------------------------------------------------------------------------ precision
def bf16_unsupported_reason() -> str | None:
    """Why OpenVINO would not run bf16 natively on this CPU (None: it does): ``machine``'s one test."""
    return machine.bf16_unsupported_reason("openvino")


def resolve_precision(precision: str) -> str:
    """The precision hint ``precision`` means here: ``auto`` is bf16 where this CPU runs it natively (what
    OpenVINO itself picks there: the float parts of an INT8 model measured 12-19% faster than f32 on a
    Zen 4), else f32; ``f32`` and ``bf16`` are themselves."""
    if precision == "auto":
        return "bf16" if bf16_unsupported_reason() is None else "f32"
    return precision


def check_precision(precision: str, what: str) -> None:
    """Refuse an unknown precision, and bf16 on a CPU that would emulate it, naming ``what`` asked."""
    if precision not in PRECISIONS:
        raise ConfigError(f"{what}: OpenVINO precision {precision!r} is not one of {list(PRECISIONS)}")
    if precision == "bf16":
        reason = bf16_unsupported_reason()
        if reason:
            raise AcceleratorError(
                f"{what} runs in bf16, but {reason}; use an FP32 or INT8 variant with f32 float parts "
                "here (ov_fp32, compression.ptq.openvino_precision=f32)"
            )


# ------------------------------------------------------------------------------------------ saving
def onnx_to_openvino(onnx_file: str | Path) -> Any:
    """The ``openvino.Model`` of a float ONNX file (weights kept in FP32)."""
    ov = import_openvino()
    try:
        return ov.convert_model(str(onnx_file))
    except Exception as err:  # noqa: BLE001 - the converter raises its own types for unsupported graphs
        raise CheckpointError(f"OpenVINO cannot convert {onnx_file}: {err}") from err


def _write_ir(model: Any, directory: Path) -> None:
    """``model.xml`` and ``model.bin`` written atomically: into a temporary folder beside them, then each
    renamed into place (the weights first: an ``.xml`` present means its ``.bin`` is complete)."""
    ov = import_openvino()
    tmp = Path(tempfile.mkdtemp(prefix=".openvino.", dir=directory))
    try:
        # compress_to_fp16 defaults to True: FP32 weights would be stored as FP16
        ov.save_model(model, str(tmp / XML_FILE), compress_to_fp16=False)
        for name in (BIN_FILE, XML_FILE):
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp / name, 0o666 & ~current_umask())
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_openvino_artifact(
    model: Any,
    directory: str | Path,
    meta: dict[str, Any],
    precision: str = "f32",
    quantization: dict[str, Any] | None = None,
) -> list[str]:
    """Save an ``openvino.Model`` (float, or INT8 by NNCF: ``quantization`` says how) as an artifact run
    with the inference precision ``precision`` (``auto``: resolved here, and the sidecar says it was);
    returns its file names."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision {precision!r} is not one of {PRECISION_CHOICES}")
    requested, precision = precision, resolve_precision(precision)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_ir(model, directory)
    ov = import_openvino()
    extra: dict[str, Any] = {"precision": precision, "openvino": ov.get_version().split("-")[0]}
    if requested != precision:  # which CPU decided, so a reader knows why this artifact is bf16 (or not)
        extra["precision_requested"] = requested
        extra["precision_reason"] = bf16_unsupported_reason() or "native bf16 on the CPU that saved it"
    if quantization:
        extra["quantization"] = quantization
    write_sidecar(directory, KIND, XML_FILE, {**meta, **extra})
    return [XML_FILE, BIN_FILE, SIDECAR]


def save_openvino_from_onnx(
    onnx_file: str | Path, directory: str | Path, meta: dict[str, Any], precision: str = "f32"
) -> list[str]:
    """The float ONNX file ``onnx_file`` converted to an OpenVINO artifact (FP32 weights) run in
    ``precision``."""
    return save_openvino_artifact(onnx_to_openvino(onnx_file), directory, meta, precision)


def read_openvino_model(directory: str | Path, meta: dict[str, Any]) -> Any:
    """The ``openvino.Model`` of an artifact (its IR), e.g. to quantize or convert it further."""
    path = Path(directory) / meta["weights"]
    try:
        return ov_core().read_model(str(path))
    except Exception as err:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
        raise CheckpointError(f"OpenVINO cannot read {path}: {err}") from err


# ------------------------------------------------------------------------------------------ running
@functools.cache
def ov_core() -> Any:
    """The process's one ``openvino.Core``, its CPU plugin loaded, kept for the process's life.

    OpenVINO unloads the CPU plugin's library when the last Core that loaded it goes; the library's fork
    handlers stay registered and point into unmapped code, so the process's next fork (any subprocess)
    crashed with a segmentation fault. One Core that lives as long as the process keeps it loaded."""
    core = import_openvino().Core()
    core.get_property("CPU", "FULL_DEVICE_NAME")  # loads the plugin now, under this Core
    return core


def compile_config(precision: str, threads: int | None = None) -> dict[str, Any]:
    """What the CPU plugin is compiled with: the precision always explicit, one stream, ``threads``
    threads (default: torch's, so a timing child's ``bench.threads`` applies to every runtime alike)."""
    return {
        "INFERENCE_PRECISION_HINT": precision,
        "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
        "PERFORMANCE_HINT": "LATENCY",
    }


class OvModule(nn.Module):
    """An OpenVINO model compiled for the CPU behind the nn.Module call the evaluators and timers use."""

    def __init__(self, path: Path, precision: str, threads: int | None = None) -> None:
        super().__init__()
        self.precision = precision
        try:
            self.compiled = ov_core().compile_model(str(path), "CPU", compile_config(precision, threads))
        except Exception as err:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
            raise CheckpointError(f"OpenVINO cannot load {path}: {err}") from err
        self.request = self.compiled.create_infer_request()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        out = self.request.infer({0: x})[self.compiled.output(0)]
        return torch.from_numpy(np.array(out, copy=True))  # the request reuses its output buffer


def load(directory: str | Path, meta: dict[str, Any]) -> nn.Module:
    precision = meta.get("precision", "f32")
    check_precision(precision, f"artifact {directory}")
    return OvModule(Path(directory) / meta["weights"], precision)
