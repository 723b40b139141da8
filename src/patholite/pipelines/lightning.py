"""The Lightning Trainer of a training stage: accelerator, checkpoints (best, last, interrupted), loggers."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import (
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    OnExceptionCheckpoint,
    RichProgressBar,
    TQDMProgressBar,
)

from patholite.pipelines.context import RunContext

INTERRUPTED_CKPT = "interrupted"
LAST_CKPT = "last"

# With OnExceptionCheckpoint present, Lightning reads fit(ckpt_path=None) as "resume from last" and warns
# that there is none; patholite passes the checkpoint to resume explicitly (resume=<run dir>).
warnings.filterwarnings("ignore", message=r".*ckpt_path=None\)` was called without a model")
warnings.filterwarnings("ignore", message=r".*there is no last checkpoint available")


class BestFromEpoch(ModelCheckpoint):
    """The best checkpoint among epochs ``from_epoch`` on: a model whose parts join during training (SMT's
    layers 2 and 3) is only comparable once all of them trained; an earlier, shallower epoch could tie or win
    on a few validation slides and be restored with untrained layers."""

    def __init__(self, *args, from_epoch: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.from_epoch = int(from_epoch)

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        if trainer.current_epoch >= self.from_epoch:
            super()._save_topk_checkpoint(trainer, monitor_candidates)


class StopFromEpoch(EarlyStopping):
    """Early stopping that starts counting at ``from_epoch`` (see ``BestFromEpoch``)."""

    def __init__(self, *args, from_epoch: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.from_epoch = int(from_epoch)

    def _run_early_stopping_check(self, trainer: L.Trainer) -> None:
        if trainer.current_epoch >= self.from_epoch:
            super()._run_early_stopping_check(trainer)


def build_callbacks(
    ctx: RunContext,
    checkpoint_dir: Path,
    select_from_epoch: int = 0,
    monitor: tuple[str, str] | None = None,
) -> list[L.Callback]:
    """``monitor``: (metric, min|max) the best epoch is chosen by, when the module logs another metric than
    ``callbacks.monitor`` (an encoder's feature loss)."""
    cb = ctx.cfg.callbacks
    metric, mode = monitor or (cb.monitor, cb.monitor_mode)
    callbacks: list[L.Callback] = [
        BestFromEpoch(
            from_epoch=select_from_epoch,
            dirpath=checkpoint_dir,
            filename="best-{epoch:03d}",
            monitor=metric,
            mode=mode,
            save_top_k=1,
        ),
        # Lightning 2.6's save_last only writes when the monitored metric improved, so a resumed run could
        # restart from an older epoch; this one rewrites last.ckpt at the end of every epoch.
        ModelCheckpoint(
            dirpath=checkpoint_dir,
            filename=LAST_CKPT,
            monitor=None,
            save_top_k=1,
            enable_version_counter=False,
        ),
        # Ctrl-C or SIGTERM mid-epoch: Lightning calls on_exception, which leaves a resumable checkpoint.
        OnExceptionCheckpoint(dirpath=checkpoint_dir, filename=INTERRUPTED_CKPT),
    ]
    if ctx.loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cb.early_stopping_patience:
        callbacks.append(
            StopFromEpoch(
                monitor=metric,
                mode=mode,
                patience=cb.early_stopping_patience,
                from_epoch=select_from_epoch,
            )
        )
    if cb.progress_bar == "rich":
        callbacks.append(RichProgressBar(leave=True))
    elif cb.progress_bar == "tqdm":
        callbacks.append(TQDMProgressBar())
    callbacks += [instantiate(spec) for spec in cb.extra.values()]
    return callbacks


def build_trainer(
    ctx: RunContext,
    checkpoint_dir: Path | None = None,
    max_epochs: int | None = None,
    extra_callbacks: list[L.Callback] | None = None,
    manual_optimization: bool = False,
    select_from_epoch: int = 0,
    monitor: tuple[str, str] | None = None,
) -> L.Trainer:
    """``manual_optimization``: the module steps its own optimisers (SMT) and clips itself; Lightning
    refuses its gradient clipping and accumulation then. ``select_from_epoch``: the best checkpoint and early
    stopping consider epochs from this one on. ``monitor``: see ``build_callbacks``."""
    t = ctx.cfg.trainer
    return L.Trainer(
        **ctx.accelerator.trainer_kwargs(),
        max_epochs=t.max_epochs if max_epochs is None else max_epochs,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        limit_test_batches=t.limit_test_batches,
        gradient_clip_val=None if manual_optimization else t.gradient_clip_val,
        accumulate_grad_batches=1 if manual_optimization else t.accumulate_grad_batches,
        log_every_n_steps=t.log_every_n_steps,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        deterministic=t.deterministic,
        default_root_dir=str(ctx.run_dir),
        logger=ctx.loggers or False,
        callbacks=build_callbacks(ctx, checkpoint_dir or ctx.checkpoint_dir, select_from_epoch, monitor)
        + list(extra_callbacks or []),
        enable_progress_bar=ctx.cfg.callbacks.progress_bar != "none",
        enable_model_summary=False,
        # under DDP the datamodules shard with their own sampler (data.base.rank_loader)
        use_distributed_sampler=ctx.accelerator.world_size == 1,
    )


def latest_checkpoint(checkpoint_dir: Path, recursive: bool = False) -> Path | None:
    """The newest resumable checkpoint: the last epoch's, or the one written on interruption (``recursive``:
    in any stage's folder below ``checkpoint_dir``)."""
    names = (f"{LAST_CKPT}.ckpt", f"{INTERRUPTED_CKPT}.ckpt")
    if recursive:
        candidates = [p for name in names for p in checkpoint_dir.rglob(name)]
    else:
        candidates = [checkpoint_dir / name for name in names if (checkpoint_dir / name).is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None
