"""What a ``compression`` option runs: its ``stages`` in order (``pipelines/stages.py``), each handing its
model to the next, every produced model saved, reloaded and recorded."""

from __future__ import annotations

from patholite.measure.records import ArtifactRecord
from patholite.pipelines.context import RunContext


def run_pipeline(ctx: RunContext) -> list[ArtifactRecord]:
    if ctx.cfg.model.family == "smt":  # slide-level: its own training and per-slide records
        from patholite.pipelines.smt import run_smt

        return run_smt(ctx)
    from patholite.pipelines.stages import run_stages

    return run_stages(ctx)


__all__ = ["RunContext", "run_pipeline"]
