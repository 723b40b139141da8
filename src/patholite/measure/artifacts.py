"""Artifact files: a model saved so that it reloads without executing pickled code.

A float artifact is ``model.safetensors`` plus ``artifact.json`` (the architecture as the model config, class
names, input size and normalisation). Its size is the bytes of all its files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from patholite.errors import CheckpointError
from patholite.measure.io import atomic_path, write_json

SIDECAR = "artifact.json"
WEIGHTS = "model.safetensors"


def save_float_artifact(model: nn.Module, directory: str | Path, meta: dict[str, Any]) -> list[str]:
    """Write ``model``'s weights and sidecar into ``directory``; returns the file names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    write_json(directory / SIDECAR, {"kind": "torch_float", "weights": WEIGHTS, **meta})
    return [WEIGHTS, SIDECAR]


def read_sidecar(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / SIDECAR
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a patholite artifact: {SIDECAR} is missing")
    return json.loads(path.read_text())


def load_float_artifact(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network from the sidecar and load its safetensors weights (strict)."""
    from patholite.models.factory import create_network

    meta = read_sidecar(directory)
    net = create_network(meta["model"], len(meta["class_names"]), meta["image_size"])
    try:
        net.load_state_dict(load_file(str(Path(directory) / meta["weights"])), strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"artifact {directory} does not match its own sidecar: {err}") from err
    return net.eval(), meta
