"""Kind ``torch_float``: the float network's weights as safetensors (``model.safetensors``) plus the sidecar.

Loading rebuilds the network from the sidecar's model config, replays its surgery (pruning, low-rank
attention) and loads the weights strictly. ``runtime: torch_compile`` (a benchmark variant) runs the same
weights through inductor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from patholite.artifacts.sidecar import SIDECAR, read_sidecar, write_sidecar
from patholite.compress.surgery import apply_surgery
from patholite.errors import CheckpointError
from patholite.io import atomic_path
from patholite.models.encoder import is_encoder_meta
from patholite.models.factory import create_network

KIND = "torch_float"
WEIGHTS = "model.safetensors"


def save_float_artifact(
    model: nn.Module, directory: str | Path, meta: dict[str, Any], kind: str = KIND
) -> list[str]:
    """Write ``model``'s weights and sidecar into ``directory``; returns the file names (``kind``: another
    kind that stores the same FP32 weights, ``torch_autocast``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    write_sidecar(directory, kind, WEIGHTS, meta)
    return [WEIGHTS, SIDECAR]


def create_float_twin(meta: dict[str, Any]) -> nn.Module:
    """The float network an artifact's sidecar describes, surgery replayed, with random weights (an
    encoder's headless: its forward returns embeddings)."""
    num_classes = 0 if is_encoder_meta(meta) else len(meta["class_names"])
    net = create_network(meta["model"], num_classes, meta["image_size"])
    return apply_surgery(net, meta.get("surgery")).eval()


def load_float_artifact(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network from the sidecar (replaying its surgery); load its safetensors weights strictly."""
    meta = read_sidecar(directory)
    net = create_float_twin(meta)
    try:
        net.load_state_dict(load_file(str(Path(directory) / meta["weights"])), strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"artifact {directory} does not match its own sidecar: {err}") from err
    return net.eval(), meta


def load(directory: str | Path, meta: dict[str, Any]) -> nn.Module:
    net, _ = load_float_artifact(directory)
    if meta.get("runtime") == "torch_compile":  # same weights, run through inductor (bench variant)
        net = torch.compile(net)
    return net
