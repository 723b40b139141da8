"""Post-training INT8 of an OpenVINO model by NNCF, with the transformer preset: plain (``nncf.quantize``,
calibrated on images) and accuracy-aware (``nncf.quantize_with_accuracy_control``, which leaves the layers
that cost most accuracy in float until the validation drop is within a budget).

OpenVINO and NNCF are the optional ``openvino`` extra: ``import_openvino`` / ``import_nncf`` are the one
place they are imported with a clear error when absent. NNCF's QAT (``nncf.torch``) is not used: see
``QAT_NOTE``."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from patholite.errors import ConfigError

log = logging.getLogger(__name__)

EXTRA = "openvino"
INSTALL = f"pip install 'patholite[{EXTRA}]' (OpenVINO and NNCF)"
# NNCF's QAT on torch, checked with NNCF 3.4 and torch 2.14.1 (2026-12-07): ``nncf.quantize`` on a timm
# ViT returns the torch module with fake-quantizers, which trains a step and evaluates; its fake-quantize
# ops are a C++ extension that NNCF compiles on first use (ninja and a compiler needed: about 3 minutes on
# the 2-core machine, past NNCF's default 60 s load timeout the first time). Not built: the QAT stage
# would need that toolchain at run time, and its export path (OpenVINO) is what ``nncf`` PTQ gives already.
QAT_NOTE = "NNCF 3.4 QAT runs on torch 2.14 after compiling its C++ extension on first use (ninja + g++)"


def _import(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"{what} needs {module}, which is not installed: {INSTALL}") from err


def _no_telemetry(module: str) -> None:
    """OpenVINO's converter (``ov.convert_model``) and NNCF's ``quantize`` send usage events to Google
    Analytics unless the user has opted out (``openvino_telemetry``, which nncf installs, is called with
    ``enable_opt_in_dialog=False``: nobody is asked). patholite is offline by default, so the senders are
    replaced by the libraries' own stubs; best effort: a library that moved them keeps its behaviour."""
    try:
        if module == "openvino":
            stub = importlib.import_module("openvino.tools.ovc.telemetry_stub")
            for name in ("openvino.tools.ovc.convert_impl", "openvino.tools.ovc.telemetry_utils"):
                sender = importlib.import_module(name)
                if hasattr(sender, "tm"):
                    sender.tm = stub
        else:
            decorator = importlib.import_module("nncf.telemetry.decorator")
            decorator.telemetry = importlib.import_module("nncf.telemetry.wrapper").NNCFTelemetryStub()
    except (ImportError, AttributeError):
        log.debug("could not switch off %s telemetry", module)


def import_openvino(what: str = "an OpenVINO artifact"):
    """The ``openvino`` module, its converter's telemetry off; a ``ConfigError`` naming the extra when it
    is not installed."""
    ov = _import("openvino", what)
    _no_telemetry("openvino")
    return ov


def import_nncf(what: str = "NNCF quantization"):
    """The ``nncf`` module (OpenVINO too), telemetry off; a ``ConfigError`` naming the extra when either
    is absent."""
    import_openvino(what)
    nncf = _import("nncf", what)
    _no_telemetry("nncf")
    return nncf


def _images(batches: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Calibration items of one image each: NNCF's min/max statistics are reduced over an item's batch axis,
    and ``subset_size`` counts items, so single images make ``subset_size`` the number of images."""
    return [image[None].numpy().astype(np.float32) for batch in batches for image in batch.cpu()]


def quantize_nncf(model: Any, calibration: Sequence[torch.Tensor], fast_bias_correction: bool = True) -> Any:
    """``model`` (an ``openvino.Model``) quantized to INT8 by ``nncf.quantize`` with the transformer
    preset, calibrated on every image of ``calibration`` (batches)."""
    nncf = import_nncf()
    items = _images(calibration)
    if not items:
        raise ValueError("quantize_nncf: no calibration images")
    return nncf.quantize(
        model,
        nncf.Dataset(items),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(items),
        fast_bias_correction=fast_bias_correction,
    )


def accuracy_of(compiled: Any, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy of a compiled OpenVINO model on labelled ``batches``."""
    correct = total = 0
    for images, labels in batches:
        logits = compiled(images.cpu().numpy())[0]
        correct += int((np.asarray(logits).argmax(1) == labels.cpu().numpy()).sum())
        total += len(labels)
    return correct / max(total, 1)


def quantize_nncf_accuracy(
    model: Any,
    calibration: Sequence[torch.Tensor],
    validation: Sequence[tuple[torch.Tensor, torch.Tensor]],
    budget_pp: float,
    max_num_iterations: int = 100,
) -> tuple[Any, dict[str, Any]]:
    """``model`` quantized by ``nncf.quantize_with_accuracy_control``: INT8 with the transformer preset,
    then the layers that cost most top-1 accuracy on ``validation`` (labelled batches) reverted to float
    until the absolute drop is within ``budget_pp`` percentage points. Returns the model and what NNCF's
    validation measured (every accuracy it validated, in its order)."""
    nncf = import_nncf()
    items = _images(calibration)
    if not items:
        raise ValueError("quantize_nncf_accuracy: no calibration images")
    if not validation:
        raise ValueError("quantize_nncf_accuracy: no validation images")
    seen: list[float] = []  # NNCF validates the float model first, then each candidate; the last is kept

    def validate(compiled: Any, data: Any) -> float:
        seen.append(accuracy_of(compiled, list(data)))
        return seen[-1]

    quantized = nncf.quantize_with_accuracy_control(
        model,
        calibration_dataset=nncf.Dataset(items),
        validation_dataset=nncf.Dataset(list(validation)),
        validation_fn=validate,
        max_drop=budget_pp / 100.0,
        drop_type=nncf.DropType.ABSOLUTE,
        subset_size=len(items),
        model_type=nncf.ModelType.TRANSFORMER,
        advanced_accuracy_restorer_parameters=nncf.AdvancedAccuracyRestorerParameters(
            max_num_iterations=max_num_iterations
        ),
    )
    report = {
        "budget_pp": budget_pp,
        "validation_images": sum(len(y) for _, y in validation),
        "validations": len(seen),
        # in NNCF's order: the float and the INT8 model on all of ``validation``, then whatever it validates
        # further (subsets while ranking layers, restored candidates)
        "validated_accuracies": [round(a, 6) for a in seen],
    }
    return quantized, report
