"""``train``: fit ``model=`` with the plain recipe (EMA with ``compression.ema.decay``); the plain result
is published to the trained-model cache, where ``start`` and teachers find it."""

from __future__ import annotations

from patholite.pipelines.cache import publish
from patholite.pipelines.stages.base import Stage, StageRun


def run(run: StageRun) -> None:
    ctx, ema = run.ctx, run.c.ema
    fitted = run.task.train(ctx, "train", ema=ema)
    if fitted.ema_net is None:
        run.current = run.record_float("fp32", fitted.net, state=fitted.state)
        if run.task.publishes and not ctx.cfg.model.checkpoint:
            publish(ctx, run.current.net)
        return
    raw = run.record_float("fp32", fitted.net) if ema.keep_raw else None
    run.current = run.record_float("fp32_ema", fitted.ema_net, source=raw, state=fitted.state)


STAGE = Stage(
    name="train",
    run=run,
    first=True,
    artifacts={
        "fp32": "the trained float model (teacher / plain training)",
        "fp32_ema": "the float model with EMA-averaged weights",
    },
)
