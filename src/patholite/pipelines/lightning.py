"""The Lightning Trainer of a training stage: accelerator, checkpoints (best, last, interrupted), loggers,
and the stop a signal asks for (SLURM's pre-emption or time-limit warning: ``patholite.requeue``)."""

from __future__ import annotations

import datetime as dt
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
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


class StopRequest:
    """A stop that a signal asked for, carried out at the end of the current training step (inside a fit),
    so the interrupted checkpoint holds whole steps; outside a fit it is carried out at once.

    Signals reach the main thread only, and one process runs one job at a time, so one instance (``STOP``)
    serves the process; the job's signal handler (``patholite.requeue``) fills it and clears it. A spawned
    DDP fit's ranks are other processes, each with its own ``STOP`` (``StopAtStepEnd`` sets theirs)."""

    def __init__(self) -> None:
        self.clear()

    def ask(self, signum: int) -> bool:
        """Note a stop for ``signum``; True when the caller must stop now (the first ask, outside a fit). A
        second signal while stopping changes nothing: one signal, one checkpoint, one requeue."""
        if self.signum is not None:
            return False
        self.signum = int(signum)
        self.at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
        if self.trainers:  # a spawned fit's ranks stop at a step's end too (a signal twice is noted once)
            for trainer in self.trainers:
                launcher = getattr(trainer.strategy, "launcher", None)
                if getattr(launcher, "procs", None):
                    launcher.kill(self.signum)
        return not self.trainers

    def clear(self) -> None:
        self.signum: int | None = None
        self.at: str | None = None  # ISO time of the signal
        self.watch: int | None = None  # the signal the job listens to, for a spawned fit's ranks
        self.trainers: list[L.Trainer] = []  # fits in progress in this process


STOP = StopRequest()


class StopRequested(SystemExit):
    """The stop a signal asked for; exits as a process killed by that signal would (128 + its number)."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}"


class StoppableTrainer(L.Trainer):
    """A Trainer whose fit a signal stops at a step's end rather than at once (``STOP``)."""

    def fit(self, *args: Any, **kwargs: Any) -> None:
        STOP.trainers.append(self)
        try:
            super().fit(*args, **kwargs)
        finally:
            STOP.trainers.remove(self)


def launched_ranks(trainer: L.Trainer) -> bool:
    """A launcher's ranks (srun, torchrun): every rank is a job process with its own Trainer, all of them
    running ``fit`` (``pipelines.ranks``), unlike a spawned fit's driver and ranks."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    return trainer.world_size > 1 and bool(getattr(environment, "creates_processes_externally", False))


class StopAtStepEnd(L.Callback):
    """Carries out ``STOP`` at the end of a training step. In one process Lightning then calls
    ``on_exception`` and ``InterruptedCheckpoint`` writes ``interrupted.ckpt``. With several ranks, rank 0's
    word is broadcast so that all of them stop after the same step: a launcher's ranks then write the
    checkpoint together through ``InterruptedCheckpoint``; a spawned fit's ranks, each listening to the
    job's signal itself (``signum``), write it here, as Lightning calls no ``on_exception`` in them."""

    def __init__(self, checkpoint_path: Path, signum: int | None = None) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.signum = signum

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        spawned_rank = trainer.world_size > 1 and not STOP.trainers and not launched_ranks(trainer)
        if spawned_rank and self.signum is not None:
            signal.signal(self.signum, lambda signum, frame: STOP.ask(signum))

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        stop = STOP.signum is not None
        if trainer.world_size > 1 and self.signum is not None:
            if launched_ranks(trainer):
                if trainer.strategy.broadcast(stop, src=0):
                    raise StopRequested(STOP.signum or self.signum)
                return
            if not STOP.trainers:  # a spawned rank
                if trainer.strategy.broadcast(stop, src=0):
                    trainer.save_checkpoint(self.checkpoint_path)
                    raise StopRequested(STOP.signum or signal.SIGTERM)
                return
        if stop:
            raise StopRequested(STOP.signum)

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        # a long validation need not outlast SLURM's grace; ranks (a collective per batch) wait for training
        if trainer.world_size == 1 and STOP.signum is not None:
            raise StopRequested(STOP.signum)


class InterruptedCheckpoint(OnExceptionCheckpoint):
    """``interrupted.ckpt`` on Ctrl-C, SIGTERM or a signal's stop. Not by the driver of a spawned DDP fit,
    whose own trainer never trained (its weights are where the fit started), so it cannot overwrite what
    the ranks wrote. A launcher's ranks write it only for the stop they agreed on (``StopAtStepEnd``):
    writing is collective, and after one rank's own error the others would wait for it in vain."""

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if getattr(getattr(trainer.strategy, "launcher", None), "procs", None):
            return
        if launched_ranks(trainer) and not isinstance(exception, StopRequested):
            return
        super().on_exception(trainer, pl_module, exception)


def without_slurm_requeue(kwargs: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """``kwargs`` for ``L.Trainer`` with Lightning's own SLURM auto-requeue turned off.

    Under ``srun`` Lightning picks ``SLURMEnvironment(auto_requeue=True)`` by itself and installs a SIGUSR1
    handler that writes ``hpc_ckpt_*.ckpt`` in the middle of a step and runs ``scontrol requeue``, beside
    patholite's handler (``patholite.requeue``): a signal would be handled twice. Patholite keeps its own (a
    whole step, the stage's checkpoint, the record, also between fits) and hands Lightning the same
    environment with ``auto_requeue=False``. A strategy that brings its environment (DDP's
    ``LightningEnvironment``) installs no requeue handler and is left as it is."""
    env = os.environ if env is None else env
    if "SLURM_NTASKS" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return kwargs  # what Lightning's SLURMEnvironment.detect() reads: not a SLURM task
    if getattr(kwargs.get("strategy"), "cluster_environment", None) is not None:
        return kwargs
    plugins = kwargs.get("plugins")
    plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins] if plugins is not None else []
    if any(isinstance(p, ClusterEnvironment) for p in plugins):
        return kwargs
    return {**kwargs, "plugins": [*plugins, SLURMEnvironment(auto_requeue=False)]}


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
        InterruptedCheckpoint(dirpath=checkpoint_dir, filename=INTERRUPTED_CKPT),
        # SLURM's warning signal: stop at the end of this step (then InterruptedCheckpoint writes)
        StopAtStepEnd(checkpoint_dir / f"{INTERRUPTED_CKPT}.ckpt", STOP.watch),
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
    return StoppableTrainer(
        **without_slurm_requeue(ctx.accelerator.trainer_kwargs()),
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
