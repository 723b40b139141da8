"""Entry point: ``python -m patholite.train`` (or ``patholite-train``).

compose -> validate -> build -> run the compression option's pipeline -> record. Every job writes its run
record (``metrics.json``) whatever happens; a sweep lists failed jobs at the end and exits non-zero if any.

Beyond Hydra's syntax it takes ``resume=<run dir>`` (continue that run, in its directory, from its last
checkpoint) and ``rerun=<run dir> [overrides]`` (a new run from that run's saved overrides plus new ones).
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
from patholite import tracking
from patholite.config import options
from patholite.errors import CheckpointError, ConfigError, PatholiteError
from patholite.jobs import job_info, run_hydra, sigterm_as_exit, user_message
from patholite.measure.report import print_records
from patholite.overrides import check_launcher, expand_run_references
from patholite.pipelines.context import RunContext
from patholite.pipelines.lightning import latest_checkpoint
from patholite.pipelines.preflight import preflight
from patholite.pipelines.seed import seed_everything
from patholite.pipelines.stages import run_stages
from patholite.records import RunRecord, read_record

log = logging.getLogger("patholite.train")
CONF_DIR = str(options.CONF_DIR)


def wandb_group(directory: Path) -> str:
    """A sweep's (or a lone run's) W&B group: its directory with its parent, e.g. 2026-11-25_18-31-00."""
    return f"{directory.parent.name}_{directory.name}"


def _resume_point(cfg: DictConfig, run_dir: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to continue from and the W&B run to continue, when ``resume`` is set."""
    if not cfg.resume:
        return None, None

    try:
        previous = read_record(run_dir)
    except (OSError, ValueError):
        previous = {}
    if previous.get("status") == "ok":
        raise ConfigError(
            f"resume={cfg.resume}: that run finished ok; to train it further or differently, start a new run "
            f"from it with rerun={cfg.resume} trainer.max_epochs=<more>"
        )
    # The interrupted stage's newest checkpoint; or, between stages, the state of the finished ones.
    checkpoint = latest_checkpoint(run_dir / "checkpoints", recursive=True)
    state = run_dir / "stages" / "state.json"
    if checkpoint is None and not state.is_file():
        raise CheckpointError(
            f"resume={cfg.resume}: nothing to continue from: no last.ckpt or interrupted.ckpt under "
            f"{run_dir / 'checkpoints'} and no finished stage in {state}"
        )
    checkpoint = checkpoint or state
    return checkpoint, previous.get("wandb")


def run_job(cfg: DictConfig) -> str:
    """Run one job and write its record; returns the record's status."""
    threads = torch.get_num_threads()  # accelerator.threads applies to this job only, not the sweep's next
    try:
        with sigterm_as_exit():
            return _run_job(cfg)
    finally:
        torch.set_num_threads(threads)


def _run_job(cfg: DictConfig) -> str:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir).resolve()
    job = job_info(hc)
    record = RunRecord(run_dir=str(run_dir), config=OmegaConf.to_container(cfg, resolve=False), job=job)
    loggers: list = []
    try:
        record.config = OmegaConf.to_container(cfg, resolve=True)
        resume_from, record.wandb = _resume_point(cfg, run_dir)
        record.write()
        checked = preflight(cfg)
        record.config = OmegaConf.to_container(cfg, resolve=True)  # as preflight completed it
        record.device = checked.accelerator.describe()
        record.write()
        seed_everything(cfg.seed)
        group = wandb_group(Path(job["sweep_dir"]) if job["multirun"] else run_dir)
        if record.wandb:  # a resumed job continues its W&B run, in its group
            group = record.wandb.get("group") or group
        name = f"{cfg.model.name}-{cfg.compression.name}-{cfg.dataset.name}" + (
            f"-{job['num']}" if job["num"] is not None else ""
        )
        wandb_id = record.wandb.get("run_id") if record.wandb else None
        loggers = tracking.build_loggers(cfg, run_dir, group, name, wandb_id, resumed=resume_from is not None)
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
        tracking.log_record(loggers, record)
    except (KeyboardInterrupt, SystemExit) as err:
        # Lightning turns Ctrl-C and SIGTERM into SystemExit after writing checkpoints/interrupted.ckpt.
        record.finish("interrupted", err, traceback.format_exc())
        log.error("interrupted; continue with: python -m patholite.train resume=%s", run_dir)

        if isinstance(err, SIGTERMException) or not getattr(err, "code", 1):  # a killed job never exits 0
            raise SystemExit(128 + signal.SIGTERM) from err
        raise
    except Exception as err:
        record.finish("failed", err, traceback.format_exc())
        if not job["multirun"]:
            if isinstance(err, PatholiteError):  # a user mistake: its message says what to do, no stack
                print(
                    f"patholite: {type(err).__name__}: {user_message(err)}\nrecord: {record.path}",
                    file=sys.stderr,
                )
                raise SystemExit(1) from err
            raise
        log.error("job failed (%s: %s); the sweep goes on. Record: %s", type(err).__name__, err, record.path)
    finally:
        tracking.close_loggers(loggers, record.status)
    if record.status == "ok" and not job["multirun"]:
        print_records([read_record(record.path)], title=f"run {run_dir}")
        print(
            f"record: {record.path}\nlogs:   {run_dir / 'csv'}  {run_dir / 'train.log'}"
            + (f"  {record.wandb['dir']}" if record.wandb else "")
        )
    return record.status


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> str:
    return run_job(cfg)


def main(argv: list[str] | None = None) -> None:
    """Console entry: expand ``resume=``/``rerun=``, run Hydra, exit non-zero if any sweep job failed."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        check_launcher(argv)
        sys.argv = [sys.argv[0], *expand_run_references(argv)]
    except PatholiteError as err:
        print(f"patholite: error: {err}", file=sys.stderr)
        sys.exit(2)
    run_hydra(_hydra_main)


if __name__ == "__main__":
    main()
