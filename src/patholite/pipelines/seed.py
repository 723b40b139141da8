"""The one way a run is seeded: Python, NumPy and torch from ``seed``, loader workers included."""

from __future__ import annotations

import lightning as L


def seed_everything(seed: int) -> None:
    """Called at the start of the run, of each stage, and of each training: a stage's result must not depend
    on whether its input came from the cache or was trained first in this process, and a training's random
    draws (data order, dropout) must not depend on how many draws building its network took."""
    L.seed_everything(int(seed), workers=True, verbose=False)
