"""``compression.prune``: structured pruning (the ``prune`` stage)."""

from __future__ import annotations

from dataclasses import dataclass, field

from patholite.config.compression.base import FinetuneConfig


@dataclass
class PruneConfig:
    """Structured pruning of attention heads and MLP channels (Torch-Pruning)."""

    ratio: float | None = 0.3  # fraction of heads and MLP channels removed; or set target_flops
    target_flops: float | None = None  # prune until FLOPs (attention counted) are at most this
    importance: str = "moving_average"  # magnitude | taylor | moving_average (R1)
    saliency: str = "taylor"  # moving_average's per-step score: taylor |w*g| | grad |g| (R1)
    beta: float = 0.9  # moving_average: S_t = beta*S_{t-1} + (1-beta)*s_t (R1 leaves beta open)
    scoring_batches: int = 16  # training batches that score importance (taylor, moving_average)
    round_to: int = 8  # MLP widths rounded to this multiple (hardware-friendly, R1)
    heads: bool = True
    mlp: bool = True
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


SCHEMA = PruneConfig
