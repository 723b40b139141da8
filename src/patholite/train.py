"""Entry point: ``python -m patholite.train`` (or ``patholite-train``).

compose -> validate -> build -> run the compression option's pipeline -> record. Every job writes its run
record (``metrics.json``) whatever happens; a sweep lists failed jobs at the end and exits non-zero if any.

Beyond Hydra's syntax it takes ``resume=<run dir>`` (continue that run, in its directory, from its last
checkpoint) and ``rerun=<run dir> [overrides]`` (a new run from that run's saved overrides plus new ones).
Under SLURM a job warned before its time limit checkpoints and requeues itself, and the requeued attempt
continues as ``resume=`` would (``patholite.requeue``).

Under a launcher (srun, submitit's tasks, torchrun: ``accelerators.cluster``) every rank runs this entry
point: rank 0 runs the job, the others follow it through its fits (``pipelines.ranks``).
"""

from __future__ import annotations

import logging
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

import patholite.config  # noqa: F401  (registers the schemas in Hydra's ConfigStore)
from patholite import requeue, tracking
from patholite.accelerators.cluster import Launch, launched, multirun_refusal
from patholite.config import options
from patholite.errors import CheckpointError, ConfigError, PatholiteError
from patholite.jobs import job_info, run_hydra, sigterm_as_exit, user_message
from patholite.measure.report import print_records
from patholite.overrides import check_launcher, expand_run_references
from patholite.pipelines.context import RunContext
from patholite.pipelines.fit import follow
from patholite.pipelines.lightning import latest_checkpoint
from patholite.pipelines.preflight import preflight
from patholite.pipelines.ranks import RANKS
from patholite.pipelines.seed import seed_everything
from patholite.pipelines.stages import run_stages
from patholite.records import RunRecord, read_record

log = logging.getLogger("patholite.train")
CONF_DIR = str(options.CONF_DIR)


def _previous_record(run_dir: Path) -> dict[str, Any]:
    try:
        return read_record(run_dir)
    except (OSError, ValueError):
        return {}


def _resume_point(
    cfg: DictConfig, run_dir: Path, previous: dict[str, Any], requeued: bool = False
) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to continue from and the W&B run to continue, when ``resume`` is set or this is a
    requeued attempt of the SLURM job that left ``previous`` (its record) in ``run_dir``."""
    if not cfg.resume and not requeued:
        return None, None

    what = f"resume={cfg.resume}" if cfg.resume else f"requeued SLURM job in {run_dir}"
    if previous.get("status") == "ok":
        raise ConfigError(
            f"{what}: that run finished ok; to train it further or differently, start a new run "
            f"from it with rerun={run_dir} trainer.max_epochs=<more>"
        )
    # The interrupted stage's newest checkpoint; or, between stages, the state of the finished ones.
    checkpoint = latest_checkpoint(run_dir / "checkpoints", recursive=True)
    state = run_dir / "stages" / "state.json"
    if checkpoint is None and not state.is_file():
        if requeued:  # stopped before its first checkpoint: the attempt starts the run again, in its folder
            log.warning("%s: nothing saved yet (no checkpoint, no finished stage); starting over", what)
            return None, previous.get("wandb")
        raise CheckpointError(
            f"{what}: nothing to continue from: no last.ckpt or interrupted.ckpt under "
            f"{run_dir / 'checkpoints'} and no finished stage in {state}"
        )
    checkpoint = checkpoint or state
    return checkpoint, previous.get("wandb")


def follow_rank(launch: Launch) -> str:
    """A rank other than 0 of a launched job: train with rank 0 until it ends the job; its status. Exits as
    rank 0 does when the job stopped for a requeue."""
    if not logging.getLogger().handlers:  # no Hydra here: say which rank speaks
        form = f"[rank {launch.rank}] %(levelname)s %(name)s: %(message)s"
        logging.basicConfig(level=logging.INFO, format=form)
    RANKS.meet(launch)
    slurm = requeue.slurm_job()
    with requeue.requeue_on_signal(slurm, follower=True):
        end = follow()
    if end.status != "ok":
        ended = f"rank 0 ended the job: {end.status} {end.message}"
        print(f"patholite: rank {launch.rank}: {ended}", file=sys.stderr)
    if end.status == "requeued" and slurm is not None and slurm.signal is not None:
        raise SystemExit(128 + int(slurm.signal))
    return end.status


def run_job(cfg: DictConfig) -> str:
    """Run one job and write its record; returns the record's status."""
    launch = launched()
    if launch is not None:  # submitit's tasks of a multi-node job all run this
        if not launch.leads:
            return follow_rank(launch)
        RANKS.meet(launch)
    threads = torch.get_num_threads()  # accelerator.threads applies to this job only, not the sweep's next
    slurm = requeue.slurm_job()
    try:
        with sigterm_as_exit(), requeue.requeue_on_signal(slurm):
            return _run_job(cfg, slurm)
    finally:
        torch.set_num_threads(threads)


def _run_job(cfg: DictConfig, slurm: requeue.SlurmJob | None = None) -> str:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir).resolve()
    job = job_info(hc)
    previous = _previous_record(run_dir)
    # an attempt of the SLURM job that left this folder's record continues it
    requeued = requeue.continues(slurm, previous)
    if requeued and previous.get("status") == "ok":
        log.info("SLURM job %s already finished this run in %s; nothing to do", slurm.job_id, run_dir)
        RANKS.finish("ok")
        return "ok"
    if slurm is not None:
        job["slurm"] = slurm.describe()
        job["requeues"], job["requeue_events"] = requeue.history(slurm, previous if requeued else None)
        requeue.remember(run_dir, job["sweep_dir"])
    record = RunRecord(run_dir=str(run_dir), config=OmegaConf.to_container(cfg, resolve=False), job=job)
    loggers: list = []
    stopped_for_requeue: int | None = None
    try:
        record.config = OmegaConf.to_container(cfg, resolve=True)
        resume_from, record.wandb = _resume_point(cfg, run_dir, previous, requeued)
        if requeued:
            log.info("requeued SLURM job %s: continuing from %s", slurm.job_id, resume_from or "the start")
        record.write()
        if RANKS.launch is not None and RANKS.control is None:
            RANKS.start(cfg.accelerator)  # the other ranks join; from here on they follow this one's fits
        checked = preflight(cfg)
        record.config = OmegaConf.to_container(cfg, resolve=True)  # as preflight completed it
        record.device = checked.accelerator.describe()
        record.write()
        seed_everything(cfg.seed)
        group = tracking.job_group(cfg, job, run_dir, hc.runtime.choices)
        if record.wandb:  # a resumed job continues its W&B run, in its group
            group = record.wandb.get("group") or group
        name = f"{cfg.model.name}-{cfg.compression.name}-{cfg.dataset.name}" + (
            f"-{job['num']}" if job["num"] is not None else ""
        )
        wandb_id = record.wandb.get("run_id") if record.wandb else None
        loggers = tracking.build_loggers(
            cfg, run_dir, group, name, wandb_id, resumed=resume_from is not None, job_type="train"
        )
        record.wandb = tracking.wandb_info(loggers, cfg.logger.wandb.mode if cfg.logger.wandb else "disabled")
        ctx = RunContext(
            cfg=cfg,
            run_dir=run_dir,
            datamodule=checked.datamodule,
            accelerator=checked.accelerator,
            teacher=checked.teacher,
            loggers=loggers,
            resume_from=resume_from,
        )
        record.artifacts = run_stages(ctx, checked.task)
        record.finish("ok")
        tracking.log_record(loggers, record, log_model=cfg.logger.log_model)
    except (KeyboardInterrupt, SystemExit) as err:
        # Lightning turns Ctrl-C and SIGTERM into SystemExit after writing checkpoints/interrupted.ckpt.
        stopped_for_requeue = requeue.requested(slurm)
        if stopped_for_requeue is not None:  # requeued below, once the loggers are closed
            record.finish("requeued", err, traceback.format_exc())
        else:
            record.finish("interrupted", err, traceback.format_exc())
            log.error("interrupted; continue with: python -m patholite.train resume=%s", run_dir)
            if isinstance(err, SIGTERMException) or not getattr(err, "code", 1):  # a killed job never exits 0
                raise SystemExit(128 + signal.SIGTERM) from err
            raise
    except Exception as err:
        # a spawned DDP fit's ranks stopped for the requeue signal: the driver sees their exit as an error
        stopped_for_requeue = requeue.requested(slurm)
        if stopped_for_requeue is not None:
            record.finish("requeued", err, traceback.format_exc())
        else:
            record.finish("failed", err, traceback.format_exc())
            if not job["multirun"]:
                if isinstance(err, PatholiteError):  # a user mistake: its message says what to do, no stack
                    print(
                        f"patholite: {type(err).__name__}: {user_message(err)}\nrecord: {record.path}",
                        file=sys.stderr,
                    )
                    raise SystemExit(1) from err
                raise
            log.error(
                "job failed (%s: %s); the sweep goes on. Record: %s", type(err).__name__, err, record.path
            )
    finally:
        tracking.close_loggers(loggers, record.status)
        RANKS.finish(record.status, f"record: {record.path}")
    if stopped_for_requeue is not None:
        _requeue(record, slurm, stopped_for_requeue)
    if record.status == "ok" and not job["multirun"]:
        print_records([read_record(record.path)], title=f"run {run_dir}")
        print(
            f"record: {record.path}\nlogs:   {run_dir / 'csv'}  {run_dir / 'train.log'}"
            + (f"  {record.wandb['dir']}" if record.wandb else "")
        )
    return record.status


def _requeue(record: RunRecord, slurm: requeue.SlurmJob, signum: int) -> None:
    """Ask SLURM to requeue the job, last: SLURM ends the job once it accepts. Exits as the signal would."""
    error = requeue.resubmit(slurm)
    record.job["requeue_events"].append(requeue.event(slurm, signum, error))
    if error is None:
        record.job["requeues"] += 1
        log.warning(
            "%s: checkpoint saved, SLURM job %s requeued (%d so far); the next attempt continues in %s",
            signal.Signals(signum).name, slurm.job_id, record.job["requeues"], record.run_dir,
        )  # fmt: skip
    else:
        record.status = "interrupted"
        log.error(
            "%s: checkpoint saved, but the job could not be requeued (%s); continue with: "
            "python -m patholite.train resume=%s", signal.Signals(signum).name, error, record.run_dir,
        )  # fmt: skip
    record.write()
    raise SystemExit(128 + signum)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> str:
    return run_job(cfg)


def main(argv: list[str] | None = None) -> None:
    """Console entry: expand ``resume=``/``rerun=``, run Hydra, exit non-zero if any sweep job failed."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        launch = launched()
        if refusal := multirun_refusal(argv):
            raise ConfigError(refusal)
        check_launcher(argv)
        argv = requeue.with_run_dir(argv)  # a requeued SLURM job: its first attempt's folder
        sys.argv = [sys.argv[0], *expand_run_references(argv)]
    except PatholiteError as err:
        print(f"patholite: error: {err}", file=sys.stderr)
        sys.exit(2)
    if launch is not None:
        if not launch.leads:  # composes no config and writes nothing: rank 0 hands it every fit
            try:
                status = follow_rank(launch)
            except PatholiteError as err:  # rank 0 never started (its command failed), a bad launch
                print(f"patholite: rank {launch.rank}: {type(err).__name__}: {err}", file=sys.stderr)
                sys.exit(1)
            sys.exit(0 if status == "ok" else 1)
        RANKS.meet(launch)  # before Hydra: if composing fails, the others see rank 0 leave
    run_hydra(_hydra_main)


if __name__ == "__main__":
    main()
