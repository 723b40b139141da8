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


def build_callbacks(ctx: RunContext, checkpoint_dir: Path) -> list[L.Callback]:
    cb = ctx.cfg.callbacks
    callbacks: list[L.Callback] = [
        ModelCheckpoint(
            dirpath=checkpoint_dir,
            filename="best-{epoch:03d}",
            monitor=cb.monitor,
            mode=cb.monitor_mode,
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
            EarlyStopping(monitor=cb.monitor, mode=cb.monitor_mode, patience=cb.early_stopping_patience)
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
) -> L.Trainer:
    """``manual_optimization``: the module steps its own optimisers (SMT) and clips itself; Lightning
    refuses its gradient clipping and accumulation then."""
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
        callbacks=build_callbacks(ctx, checkpoint_dir or ctx.checkpoint_dir) + list(extra_callbacks or []),
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
