"""Recipes a ``compression`` option names: ordered stages that hand an artifact from one to the next.

``PIPELINES`` maps ``compression.pipeline`` to ``"module:function"``; the function takes a ``RunContext``
and returns the run's artifact records. The compression issue adds entries here, not to the entry point.
"""

from __future__ import annotations

import importlib

from patholite.measure.records import ArtifactRecord
from patholite.pipelines.context import RunContext

PIPELINES = {
    "teacher": "patholite.pipelines.teacher:run",
}


def run_pipeline(ctx: RunContext) -> list[ArtifactRecord]:
    module, function = PIPELINES[ctx.cfg.compression.pipeline].split(":")
    return getattr(importlib.import_module(module), function)(ctx)


__all__ = ["PIPELINES", "RunContext", "run_pipeline"]
