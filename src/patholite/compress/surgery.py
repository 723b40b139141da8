"""Structural changes recorded in an artifact's sidecar (``"surgery": [op, ...]``) and replayed on load.

A pruned or low-rank network is not what ``model=`` builds, so its safetensors alone cannot be loaded. The
sidecar lists the changes in order; ``apply_surgery`` replays them on a freshly built network, after which
the saved weights load strictly. No pickled code is involved.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from patholite.compress.lowrank import apply_nystrom
from patholite.compress.prune import apply_structure
from patholite.errors import CheckpointError


def apply_surgery(net: nn.Module, ops: list[dict[str, Any]] | None) -> nn.Module:
    for op in ops or []:
        kind = op.get("op")
        if kind == "prune":
            net = apply_structure(net, op["structure"])
        elif kind == "nystrom":
            net = apply_nystrom(net, op["landmarks"], op.get("blocks"), op.get("pinv_iters", 6))
        else:
            raise CheckpointError(
                f"unknown surgery op {kind!r} in an artifact sidecar (known: prune, nystrom)"
            )
    return net
