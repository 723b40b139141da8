"""One Lightning fit of a stage: its checkpoint folder, epochs and learning rate, EMA, resume, best restore.

Every training stage (plain training, distillation, fine-tunes after pruning or low-rank, QAT) goes through
``fit``. A stage's checkpoints live in ``checkpoints/<stage>/``, so a resumed run continues the stage that was
interrupted and never mixes one stage's weights into another's.

In a launched multi-node job ``fit`` on rank 0 first sends the fit to the other ranks, which ``follow``:
they build the same trainer and train with rank 0 (``pipelines.ranks``).
"""

from __future__ import annotations

import copy
import gc
import logging
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import nn

from patholite.accelerators.resolve import resolve_accelerator
from patholite.compress.ema import EMA_STATE_KEY, EmaCallback
from patholite.data.base import fitting
from patholite.errors import CheckpointError
from patholite.pipelines.context import RunContext
from patholite.pipelines.lightning import StopRequested, build_trainer, latest_checkpoint
from patholite.pipelines.ranks import RANKS, End, FitOrder
from patholite.pipelines.seed import seed_everything

log = logging.getLogger(__name__)


@dataclass
class Fitted:
    """A training's result: the raw weights of the best epoch (by the monitored validation metric) and, with
    EMA, the average; ``state``: what a later stage continues from besides the weights (SMT's focusing
    memory)."""

    net: nn.Module
    ema_net: nn.Module | None = None
    state: dict[str, Any] = field(default_factory=dict)


def ema_callback(ema: Any | None) -> EmaCallback | None:
    if ema is None or ema.decay is None:
        return None
    return EmaCallback(
        decay=float(ema.decay),
        start_step=int(ema.start_step),
        warmup=bool(ema.warmup),
        warmup_power=float(ema.warmup_power),
    )


def release_driver_gpu(module: nn.Module) -> None:
    """Before a spawned (DDP) fit, in the driver: ``module`` to the CPU and CUDA's cached memory freed.

    Rank 0 trains on GPU 0, where the driver evaluated the artifacts before (a teacher, the network to
    fine-tune): whatever it still holds there (the module and the allocator's cache) is memory rank 0 lacks.
    On the CPU the module also travels to the spawned ranks by pickling, not through CUDA IPC handles to
    the driver's GPU 0; each rank moves it to its own device.
    """
    module.cpu()  # a Distiller moves its hidden teacher too
    gc.collect()  # tensors kept alive only by reference cycles hold their blocks until collected
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _trainer(
    ctx: RunContext,
    module: L.LightningModule,
    stage: str,
    epochs: int | None = None,
    ema: Any | None = None,
    monitor: tuple[str, str] | None = None,
) -> tuple[L.Trainer, EmaCallback | None]:
    """The stage's trainer and EMA callback; every rank of a launched job builds the same."""
    seed_everything(ctx.cfg.seed)
    averaging = ema_callback(ema)
    trainer = build_trainer(
        ctx,
        checkpoint_dir=ctx.checkpoint_dir / stage,
        max_epochs=epochs,
        extra_callbacks=[averaging] if averaging else [],
        manual_optimization=not module.automatic_optimization,
        # a model whose parts join during training (SMT) names the first epoch where all of them trained
        select_from_epoch=int(getattr(module, "complete_from_epoch", 0)),
        monitor=monitor,
    )
    return trainer, averaging


def fit(
    ctx: RunContext,
    module: L.LightningModule,
    stage: str,
    epochs: int | None = None,
    ema: Any | None = None,
    datamodule: L.LightningDataModule | None = None,
    monitor: tuple[str, str] | None = None,
) -> Fitted:
    """Train ``module`` for ``epochs`` (default ``trainer.max_epochs``), resuming this stage's checkpoint when
    the run is resumed, and return its best weights. ``datamodule``: other data than the run's labelled
    tiles (unlabelled tiles with teacher targets); ``monitor``: (metric, min|max) choosing the best epoch
    when the module logs another than ``callbacks.monitor``."""
    checkpoint_dir = ctx.checkpoint_dir / stage
    trainer, averaging = _trainer(ctx, module, stage, epochs, ema, monitor)
    resume = latest_checkpoint(checkpoint_dir) if ctx.resuming else None
    if not ctx.resuming and (stale := latest_checkpoint(checkpoint_dir)) is not None:
        # Lightning reads fit(ckpt_path=None) as "resume from the newest last/interrupted checkpoint" when
        # OnExceptionCheckpoint is present: a new run in this directory would silently continue the old one
        raise CheckpointError(
            f"{stale} is an earlier run's checkpoint of stage {stage} in this run directory: continue that "
            f"run with resume={ctx.run_dir}, or start this one in a new directory (hydra.run.dir=<another>)"
        )
    if resume is not None:
        log.info("stage %s: resuming from %s", stage, resume)
    if ctx.accelerator.spawns:  # ddp_spawn: the ranks train, this process waits
        release_driver_gpu(module)
    data = datamodule or ctx.datamodule
    ckpt_path = str(resume) if resume else None
    if RANKS.leading:  # the other ranks of a launched job train it with this one
        # the data still points to the previous fit's trainer (Lightning attaches it): that one stays here
        data.trainer = None
        settings = {"epochs": epochs, "ema": ema, "monitor": monitor}
        RANKS.send(FitOrder(ctx.cfg, ctx.run_dir, stage, module, data, ctx.loggers, ckpt_path, settings))
    with fitting():
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    ema_state = None
    if best:
        log.info("stage %s: restoring the best checkpoint %s", stage, best)
        checkpoint = torch.load(best, map_location="cpu", weights_only=True)
        module.load_state_dict(checkpoint["state_dict"])
        ema_state = checkpoint.get(EMA_STATE_KEY)
    net = module.net.eval()
    if averaging is None:
        return Fitted(net)
    if ema_state is None and ctx.accelerator.spawns:
        # DDP ranks ran in spawned processes: the average lives in their checkpoints, not in this callback
        last = latest_checkpoint(checkpoint_dir)
        if last is not None:
            ema_state = torch.load(last, map_location="cpu", weights_only=True).get(EMA_STATE_KEY)
    # the driver's callback never trained under ddp_spawn; a copy of the network takes the saved average
    ema_net = copy.deepcopy(net if ema_state is not None else averaging.ema_net)
    if ema_state is not None:
        ema_net.load_state_dict(ema_state)
    return Fitted(net, ema_net.eval())


def follow() -> End:
    """A rank other than 0 of a launched job: train each fit rank 0 sends, with it, until it ends the job;
    returns how it ended. Writes nothing itself (Lightning's checkpoints and logs come from rank 0)."""
    if (aborted := RANKS.await_start()) is not None:
        return End("failed", aborted)
    while isinstance(order := RANKS.receive(), FitOrder):
        ctx = RunContext(
            cfg=order.cfg,
            run_dir=order.run_dir,
            datamodule=order.datamodule,
            accelerator=resolve_accelerator(order.cfg.accelerator),  # this rank's device
            loggers=order.loggers,
        )
        log.info("rank %d: stage %s", RANKS.launch.rank, order.stage)
        trainer, _ = _trainer(ctx, order.module, order.stage, **order.settings)
        try:
            with fitting():
                trainer.fit(order.module, datamodule=order.datamodule, ckpt_path=order.ckpt_path)
        except StopRequested:  # every rank stopped after the same step; rank 0 ends the job
            log.warning("rank %d: stopped for a requeue at the end of a step", RANKS.launch.rank)
    return order
