"""``rename``: the current float model, unchanged, recorded as ``renamed``."""

from __future__ import annotations

from omegaconf import DictConfig
from patholite.compress.rename import rename

from patholite.accelerators.resolve import ResolvedAccelerator
from patholite.config.checks import require
from patholite.pipelines.stages.base import Stage, StageRun
from patholite.pipelines.tasks import Task


def run(run: StageRun) -> None:
    src = run.current
    net = rename(src.net, run.c.rename.copies)
    run.current = run.record_float("renamed", net, surgery=src.surgery, source=src)


def check(cfg: DictConfig, task: Task, accelerator: ResolvedAccelerator) -> None:
    copies = cfg.compression.rename.copies
    require(copies >= 1, f"compression.rename.copies={copies} must be >= 1")


STAGE = Stage(
    name="rename",
    run=run,
    key="rename",
    check=check,
    artifacts={"renamed": "the float model under another name (the plug-in test's technique)"},
)
