"""``compression.lowrank``: Nystrom low-rank attention (the ``lowrank`` stage)."""

from __future__ import annotations

from dataclasses import dataclass, field

from patholite.config.compression.base import FinetuneConfig


@dataclass
class LowrankConfig:
    """Nystrom low-rank attention (R5: 24, 32, 64 landmarks)."""

    landmarks: int = 32
    blocks: list[int] | None = None  # None: every block
    pinv_iters: int = 6
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(epochs=0))


SCHEMA = LowrankConfig
