"""What a ``compression`` option runs: its ``stages`` in order (``pipelines/stages.py``), each handing its
model to the next, every produced model saved, reloaded and recorded."""

from __future__ import annotations

from patholite.pipelines.context import RunContext
from patholite.pipelines.smt import run_smt
from patholite.pipelines.stages import run_stages
from patholite.records import ArtifactRecord


def run_pipeline(ctx: RunContext) -> list[ArtifactRecord]:
    if ctx.cfg.model.family == "smt":  # slide-level: its own training and per-slide records
        return run_smt(ctx)

    return run_stages(ctx)


__all__ = ["RunContext", "run_pipeline"]
