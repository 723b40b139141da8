"""``lowrank``: Nystrom attention in place of softmax attention, reusing the trained weights, optionally
fine-tuned; the change goes into the sidecar so the artifact reloads without pickled code."""

from __future__ import annotations

import copy

from omegaconf import DictConfig

from patholite.accelerators.resolve import ResolvedAccelerator
from patholite.compress.lowrank import apply_nystrom
from patholite.config.checks import check_finetune, require
from patholite.pipelines.stages.base import Stage, StageRun
from patholite.pipelines.stages.distill import check_kd
from patholite.pipelines.stages.prune import check_vit
from patholite.pipelines.tasks import Task


def run(run: StageRun) -> None:
    src, lr = run.current, run.c.lowrank
    blocks = list(lr.blocks) if lr.blocks is not None else None
    op = {"op": "nystrom", "landmarks": int(lr.landmarks), "blocks": blocks, "pinv_iters": int(lr.pinv_iters)}
    net = apply_nystrom(copy.deepcopy(src.net), op["landmarks"], blocks, op["pinv_iters"])
    net = run.task.finetune(run.ctx, "lowrank", net, lr.finetune, src.net)
    run.current = run.record_float("lowrank", net, surgery=[*src.surgery, op], source=src)


def check(cfg: DictConfig, task: Task, accelerator: ResolvedAccelerator) -> None:
    lr = cfg.compression.lowrank
    require(lr.landmarks >= 1, f"compression.lowrank.landmarks={lr.landmarks} must be >= 1")
    check_finetune(lr.finetune, "compression.lowrank")
    if cfg.compression.lowrank.finetune.distill and task.name != "encoders":  # learns from the model before
        check_kd(cfg)
    check_vit(cfg, "lowrank")


STAGE = Stage(
    name="lowrank",
    run=run,
    key="lowrank",
    tasks=("tiles", "encoders"),
    after=("prune",),  # pruning reshapes softmax attention
    check=check,
    artifacts={"lowrank": "Nystrom low-rank attention"},
)
