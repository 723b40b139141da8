"""The sidecar every artifact carries: ``artifact.json`` beside its weights, naming its ``kind`` (how to load
it), its weights file, the architecture as the model config, class names, input size and normalisation, and
any structural surgery or quantization settings. Nothing is unpickled to read it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from patholite.errors import CheckpointError
from patholite.io import write_json

SIDECAR = "artifact.json"


def read_sidecar(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / SIDECAR
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a patholite artifact: {SIDECAR} is missing")
    return json.loads(path.read_text())


def write_sidecar(directory: str | Path, kind: str, weights: str, meta: dict[str, Any]) -> None:
    """``artifact.json`` of kind ``kind`` with ``weights`` (its weights file) and ``meta``; kind and weights
    always win over keys of the same name in ``meta``."""
    rest = {k: v for k, v in meta.items() if k not in ("kind", "weights")}
    write_json(Path(directory) / SIDECAR, {"kind": kind, "weights": weights, **rest})


def is_smt_artifact(meta: dict[str, Any]) -> bool:
    """Whether a sidecar describes an SMT slide model (a ``model=smt`` run's artifact)."""
    return (meta.get("model") or {}).get("family") == "smt"
