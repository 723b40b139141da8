"""``start``: the trained plain model, from ``model.checkpoint`` or the trained-model cache (trained once
with the plain recipe when absent), as the float model later stages transform."""

from __future__ import annotations

from patholite.pipelines.stages.base import Stage, StageRun


def run(run: StageRun) -> None:
    net = run.task.plain_network(run.ctx, run.ctx.cfg.model, "starting point")
    run.current = run.record_float("fp32", net)


STAGE = Stage(
    name="start",
    run=run,
    first=True,
    artifacts={"fp32": "the trained float model the run starts from"},
)
