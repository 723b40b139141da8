"""Structured pruning of timm Vision Transformers: whole attention heads and MLP hidden channels.

``search`` scores heads/channels and removes them with Torch-Pruning (``prune_vit``, by ratio or FLOPs
target); ``structure`` records the pruned shapes as JSON and replays them on a fresh network, which is all
that loading a pruned artifact needs: ``apply_structure(fresh_net, structure).load_state_dict(state)``.
"""

from __future__ import annotations

from patholite.compress.prune.search import (
    IMPORTANCES,
    SALIENCIES,
    MovingAverageImportance,
    flops_and_params,
    prune_vit,
)
from patholite.compress.prune.structure import (
    STRUCTURE_FORMAT,
    STRUCTURE_VERSION,
    apply_structure,
    describe_structure,
)

__all__ = [
    "IMPORTANCES",
    "SALIENCIES",
    "STRUCTURE_FORMAT",
    "STRUCTURE_VERSION",
    "MovingAverageImportance",
    "apply_structure",
    "describe_structure",
    "flops_and_params",
    "prune_vit",
]
