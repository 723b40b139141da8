"""The sidecar every artifact carries: ``artifact.json`` beside its weights, naming its ``kind`` (how to load
it), its weights file, the architecture as the model config, class names, input size and normalisation, and
any structural surgery or quantization settings, and, for a model whose weights came from the hub, where
they came from (``weights_source``: hub id, commit, sha256, licence, mpp; absent in older sidecars). Nothing
is unpickled to read it."""

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


def weights_source_of(checkpoint: str | Path | None) -> dict[str, Any] | None:
    """The hub record of the artifact a weights file (or artifact folder) belongs to: a model fine-tuned,
    pruned or quantized from a hub model's artifact carries its record on (None: no such artifact)."""
    if not checkpoint:
        return None
    path = Path(checkpoint).expanduser()
    folder = path if path.is_dir() else path.parent
    if not (folder / SIDECAR).is_file():
        return None
    try:
        return read_sidecar(folder).get("weights_source")
    except ValueError:  # not JSON: a foreign file named like ours; it records nothing
        return None
