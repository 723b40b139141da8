"""Kind ``mil``: a gated-attention MIL slide model (``models.mil.GatedAttentionMIL``): safetensors plus the
sidecar with ``"slide_model": true`` and the network's ``config()`` under ``"model"``. It is not loaded by
``load_artifact``: its bags are a tile classifier's embeddings, so only the comparison runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from patholite.artifacts.sidecar import SIDECAR, read_sidecar, write_sidecar
from patholite.errors import CheckpointError
from patholite.io import atomic_path
from patholite.models.mil import GatedAttentionMIL

KIND = "mil"
WEIGHTS = "model.safetensors"


def save_mil(model: GatedAttentionMIL, directory: str | Path, meta: dict[str, Any]) -> list[str]:
    """Write the weights (safetensors) and the sidecar (``meta`` plus the kind and ``config()``: give it the
    class names and what made the bags, e.g. the tile classifier's artifact and tile geometry); returns the
    file names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    write_sidecar(directory, KIND, WEIGHTS, {**meta, "slide_model": True, "model": model.config()})
    return [WEIGHTS, SIDECAR]


def load_mil(directory: str | Path) -> tuple[GatedAttentionMIL, dict[str, Any]]:
    """A saved ``GatedAttentionMIL`` (eval mode) and its sidecar; a tile classifier's artifact is refused."""
    meta = read_sidecar(directory)
    if meta.get("kind") != KIND:
        raise CheckpointError(
            f"artifact {directory} is a {meta.get('kind')!r} artifact, not a MIL slide model (kind {KIND!r})"
        )
    model = GatedAttentionMIL.from_config(meta["model"])
    try:
        model.load_state_dict(load_file(str(Path(directory) / meta["weights"])), strict=True)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own type for an unreadable file
        raise CheckpointError(f"artifact {directory} does not match its own sidecar: {err}") from err
    return model.eval(), meta
