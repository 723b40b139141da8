"""Experiment tracking: one W&B run per job (offline unless asked), a CSV log for trainings, closed in
``finally``.

Every job (``job_type``: train, bench, slide; a sweep's comparison: compare) is a W&B run in a group named by
its experiment (Hydra's ``experiment=`` choice, else the entry's ``task_name``) and its sweep or run folder,
so a lab's runs of one experiment compare side by side. A finished job logs its record's numbers (summary
and a table), its record file (``metrics.json``) and its plots (as files and images); a slide run a table
of its per-slide calls; model files go up as W&B artifacts only with ``logger.log_model=true``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from patholite.errors import ConfigError
from patholite.records import QUALITY_SCALARS, RunRecord

log = logging.getLogger(__name__)

JOB_TYPES = ("train", "bench", "slide", "compare")


def experiment_name(cfg: DictConfig, choices: dict[str, Any] | None = None) -> str:
    """What names the job's experiment: Hydra's ``experiment=`` choice (``choices``: the runtime's group
    choices), else the entry's ``task_name`` (train, bench, slide)."""
    return str((choices or {}).get("experiment") or cfg.get("task_name") or "patholite")


def group_name(experiment: str, directory: Path) -> str:
    """A sweep's (or a lone run's) W&B group: the experiment, then the folder with its parent, e.g.
    ``demo_2026-11-25_18-31-00``."""
    return f"{experiment}_{directory.parent.name}_{directory.name}"


def job_group(cfg: DictConfig, job: dict[str, Any], run_dir: Path, choices: dict[str, Any] | None) -> str:
    """The job's group: its sweep's in a multirun, else its own run folder's."""
    directory = Path(job["sweep_dir"]) if job.get("multirun") else run_dir
    return group_name(experiment_name(cfg, choices), directory)


def _csv_version(run_dir: Path, resumed: bool) -> str:
    """ "" for a new run; for a resumed one a fresh ``resume-N``, since Lightning deletes an existing log."""
    if not resumed:
        return ""
    n = 1
    while (run_dir / "csv" / f"resume-{n}").exists():
        n += 1
    return f"resume-{n}"


def build_loggers(
    cfg: DictConfig,
    run_dir: Path,
    group: str,
    job_name: str,
    resume_id: str | None,
    resumed: bool = False,
    job_type: str = "train",
    csv: bool | None = None,
) -> list[Logger]:
    """The job's loggers: CSV (``csv``: default ``logger.csv``; trainings only) and W&B unless disabled."""
    if job_type not in JOB_TYPES:
        raise ValueError(f"job_type={job_type!r} is not one of {JOB_TYPES}")
    loggers: list[Logger] = []
    if cfg.logger.csv if csv is None else csv:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv", version=_csv_version(run_dir, resumed)))
    w = cfg.logger.wandb
    if w is not None and w.mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"logger.wandb.mode={w.mode!r}: use offline (the default), online or disabled")
    if w is not None and w.mode != "disabled":
        # Offline needs no key and no network; `wandb sync <run_dir>/wandb/offline-run-*` uploads it later.
        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(
            WandbLogger(
                project=w.project,
                entity=w.entity,
                group=w.group or group,
                name=job_name,
                job_type=job_type,
                save_dir=str(run_dir),
                offline=w.mode == "offline",
                id=resume_id,
                resume="allow" if resume_id else None,
                tags=list(w.tags) + list(cfg.get("tags") or []),
                settings={"console": "off", "silent": True},
            )
        )
    if loggers:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        for logger in loggers:
            logger.log_hyperparams(resolved)
    return loggers


def wandb_info(loggers: Sequence[Logger], mode: str) -> dict[str, Any] | None:
    """The record's ``wandb`` block: the run's id, folder, mode, group and job type."""
    run = wandb_run(loggers)
    if run is None:
        return None
    return {
        "run_id": run.id,
        "dir": str(Path(run.dir).parent),
        "mode": mode,
        "group": run.group,
        "job_type": run.job_type,
    }


def wandb_run(loggers: Sequence[Logger]) -> Any | None:
    """The job's W&B run, or None when it has none."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            return logger.experiment
    return None


def flat_summary(record: RunRecord) -> dict[str, Any]:
    """The record's numbers as W&B summary keys ``<artifact>/<key>``: quality scalars, every number of
    its cost, latency p50 per batch size, the flip rate against its source."""
    summary: dict[str, Any] = {"status": record.status}
    for art in record.artifacts:
        for key in QUALITY_SCALARS:
            summary[f"{art.name}/{key}"] = art.quality.get(key)
        for key, value in art.cost.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                summary[f"{art.name}/{key}"] = value
        for batch, lat in art.cost.get("latency_ms", {}).items():
            summary[f"{art.name}/latency_p50_ms_b{batch}"] = lat["p50"]
        if art.parity:
            summary[f"{art.name}/flip_rate"] = art.parity["flip_rate"]
    if record.slides:
        summary.update({f"slides/{k}": v for k, v in record.slides.items() if isinstance(v, int)})
    return summary


ARTIFACT_COLUMNS = [
    "artifact",
    "model",
    "source",
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "auroc",
    "flip_rate",
    "params",
    "size_bytes",
    "latency_p50_ms_b1",
]


def log_record(
    loggers: Sequence[Logger],
    record: RunRecord,
    plots: Sequence[Path] = (),
    tables: dict[str, tuple[list[str], list[list[Any]]]] | None = None,
    log_model: bool = False,
) -> None:
    """Put a finished job in its W&B run: the record's numbers (summary, an ``artifacts`` table), the
    record file and ``plots`` (PNGs: saved as files and logged as images), ``tables`` (name -> columns,
    rows), and with ``log_model`` every artifact's folder as a W&B model artifact. Nothing without W&B.
    A W&B failure is logged, not raised: the job's work is done and its record on disk is complete."""
    try:
        _log_record(loggers, record, plots, tables, log_model)
    except Exception as err:  # noqa: BLE001  (W&B's errors have no common base)
        log.warning("W&B logging failed (%s: %s); the record %s is complete", type(err).__name__, err,
                    record.path)  # fmt: skip


def _log_record(
    loggers: Sequence[Logger],
    record: RunRecord,
    plots: Sequence[Path],
    tables: dict[str, tuple[list[str], list[list[Any]]]] | None,
    log_model: bool,
) -> None:
    run = wandb_run(loggers)
    if run is None:
        return
    import wandb

    run.summary.update(flat_summary(record))
    rows = [
        [
            a.name,
            a.model,
            a.source,
            *(a.quality.get(k) for k in ARTIFACT_COLUMNS[3:7]),
            (a.parity or {}).get("flip_rate"),
            a.cost.get("params"),
            a.cost.get("size_bytes"),
            (a.cost.get("latency_ms") or {}).get("1", {}).get("p50"),
        ]
        for a in record.artifacts
    ]
    logged: dict[str, Any] = {"artifacts": wandb.Table(columns=ARTIFACT_COLUMNS, data=rows)}
    for name, (columns, data) in (tables or {}).items():
        logged[name] = wandb.Table(columns=columns, data=data)
    run_dir = Path(record.run_dir)
    for plot in plots:
        logged[f"plots/{_key(plot, run_dir)}"] = wandb.Image(str(plot))
    run.log(logged)
    save_files(run, [record.path, *plots], run_dir)
    if log_model:
        upload_models(run, record)


def _key(path: Path, base: Path) -> str:
    """A plot's W&B key: its path under the run folder without the suffix (``slide_1/report``)."""
    try:
        relative = path.relative_to(base)
    except ValueError:
        relative = Path(path.name)
    return relative.with_suffix("").as_posix()


def save_files(run: Any, paths: Sequence[Path], base: Path) -> None:
    """Copy ``paths`` into the W&B run's files (kept under their path relative to ``base``), now: the record
    and plots as they are at the end of the job."""
    for path in paths:
        path = Path(path)
        if path.is_file():
            base_path = base if path.is_relative_to(base) else path.parent
            run.save(str(path), base_path=str(base_path), policy="now")


def model_artifact_name(run_id: str, artifact: str) -> str:
    """A W&B artifact name (letters, digits, ``-_.``) for a record's artifact: per run, so runs never
    version each other's models."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{run_id}-{artifact}")


def upload_models(run: Any, record: RunRecord) -> None:
    """Every artifact folder of the record as a W&B artifact of type ``model``, its record row as
    metadata."""
    import wandb

    for art in record.artifacts:
        folder = Path(art.path)
        if not folder.is_dir():
            log.warning("artifact %s: no folder at %s to upload to W&B", art.name, folder)
            continue
        model = wandb.Artifact(
            model_artifact_name(run.id, art.name),
            type="model",
            metadata={"name": art.name, "model": art.model, "source": art.source, "quality": art.quality,
                      "cost": art.cost},
        )  # fmt: skip
        for name in art.files or sorted(p.name for p in folder.iterdir() if p.is_file()):
            model.add_file(str(folder / name), name=name)
        run.log_artifact(model, aliases=["latest", art.name])


def log_comparison(
    cfg: DictConfig,
    sweep_dir: Path,
    choices: dict[str, Any] | None,
    table: tuple[list[str], list[list[Any]]],
    files: Sequence[Path],
    plots: Sequence[Path],
) -> str | None:
    """A sweep's comparison as its own W&B run (``job_type=compare``) in the sweep's group: the comparison
    ``table`` (columns, rows), its ``files`` and the Pareto ``plots`` as images and files. Returns the run's
    folder (None without W&B)."""
    logger_cfg = cfg.get("logger")
    w = logger_cfg.get("wandb") if logger_cfg is not None else None
    if w is None or w.mode == "disabled":
        return None
    import wandb

    group = w.group or group_name(experiment_name(cfg, choices), sweep_dir)
    out = sweep_dir / "compare"
    run = wandb.init(
        project=w.project, entity=w.entity, group=group, job_type="compare", name=f"{group}-compare",
        dir=str(out), mode=w.mode, tags=list(w.tags) + list(cfg.get("tags") or []),
        settings={"console": "off", "silent": True},
    )  # fmt: skip
    try:
        columns, rows = table
        logged: dict[str, Any] = {"comparison": wandb.Table(columns=list(columns), data=rows)}
        for plot in plots:
            logged[f"plots/{plot.stem}"] = wandb.Image(str(plot))
        run.log(logged)
        save_files(run, [*files, *plots], out)
        return str(Path(run.dir).parent)
    finally:
        run.finish()


def close_loggers(loggers: list[Logger], status: str) -> None:
    """Finalise every logger and finish the W&B run, even if one of them fails: a job never leaks a run."""
    for logger in loggers:
        try:
            logger.finalize("success" if status == "ok" else "failed")
        except Exception as err:  # noqa: BLE001 - closing must go on for the others
            log.warning("could not finalise %s: %s", type(logger).__name__, err)
    # the job's own run, without starting one (``experiment`` would); then W&B's global run, if another
    runs = [getattr(lg, "_experiment", None) for lg in loggers if isinstance(lg, WandbLogger)]
    runs = [r for r in runs if r is not None]
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None and all(wandb.run is not r for r in runs):
            runs.append(wandb.run)
    for run in runs:
        try:
            run.finish(exit_code=0 if status == "ok" else 1)
        except Exception as err:  # noqa: BLE001
            log.warning("could not finish the W&B run: %s", err)
