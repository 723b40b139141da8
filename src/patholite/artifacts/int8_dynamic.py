"""Kind ``torch_int8_dynamic``: torch.ao dynamic INT8 of Linear layers (R2's PTQ; ``layers`` for mixed
precision). The quantized state dict (``model_int8.pt``, read with ``weights_only=True``) plus the sidecar
with the engine; loading rebuilds the float twin, quantizes it the same way and loads the INT8 weights."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from patholite.artifacts.sidecar import SIDECAR, write_sidecar
from patholite.artifacts.torch_float import create_float_twin
from patholite.compress.quantize import quantize_dynamic_int8
from patholite.io import atomic_path

KIND = "torch_int8_dynamic"
INT8_WEIGHTS = "model_int8.pt"


def save_int8_dynamic_artifact(
    qnet: nn.Module,
    directory: str | Path,
    meta: dict[str, Any],
    engine: str,
    layers: list[str] | None = None,
) -> list[str]:
    """``layers``: the Linear layers that were quantized (None: all of them)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / INT8_WEIGHTS) as tmp:
        torch.save(qnet.state_dict(), tmp)
    write_sidecar(directory, KIND, INT8_WEIGHTS, {"engine": engine, "layers": layers, **meta})
    return [INT8_WEIGHTS, SIDECAR]


def load(directory: str | Path, meta: dict[str, Any]) -> nn.Module:
    qnet = quantize_dynamic_int8(create_float_twin(meta), meta["engine"], meta.get("layers"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized tensors still go through TypedStorage
        state = torch.load(Path(directory) / meta["weights"], map_location="cpu", weights_only=True)
    qnet.load_state_dict(state)
    return qnet.eval()
