"""Any artifact by the kind its sidecar names: one loader per kind (a new kind: its module, a line here)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

import patholite.artifacts.int8_dynamic as int8_dynamic
import patholite.artifacts.mil as mil
import patholite.artifacts.onnx as onnx
import patholite.artifacts.openvino as openvino
import patholite.artifacts.qat as qat
import patholite.artifacts.torch_autocast as torch_autocast
import patholite.artifacts.torch_float as torch_float
from patholite.artifacts.sidecar import SIDECAR, read_sidecar
from patholite.errors import CheckpointError

LOADERS: dict[str, Callable[[str | Path, dict[str, Any]], nn.Module]] = {
    torch_float.KIND: torch_float.load,
    torch_autocast.KIND: torch_autocast.load,
    int8_dynamic.KIND: int8_dynamic.load,
    qat.KIND: qat.load,
    onnx.KIND: onnx.load,
    openvino.KIND: openvino.load,
}
# Kinds that are artifacts but not image classifiers load_artifact can run, with what to do instead.
NOT_LOADABLE = {mil.KIND: "a MIL slide model: load it with patholite.artifacts.mil.load_mil"}


def load_artifact(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Any patholite artifact, by the kind its sidecar names, in eval mode, with its sidecar."""
    meta = read_sidecar(directory)
    kind = meta.get("kind")
    if kind in NOT_LOADABLE:
        raise CheckpointError(f"artifact {directory} is {NOT_LOADABLE[kind]}")
    if kind not in LOADERS:
        raise CheckpointError(f"artifact {directory}: unknown kind {kind!r} in {SIDECAR}")
    return LOADERS[kind](directory, meta).eval(), meta
