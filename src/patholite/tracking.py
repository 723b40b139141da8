"""Experiment tracking: one W&B run per job (offline unless asked), a CSV log, both closed in ``finally``."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from patholite.records import QUALITY_SCALARS, RunRecord

log = logging.getLogger(__name__)


def _csv_version(run_dir: Path, resumed: bool) -> str:
    """ "" for a new run; for a resumed one a fresh ``resume-N``, since Lightning deletes an existing log."""
    if not resumed:
        return ""
    n = 1
    while (run_dir / "csv" / f"resume-{n}").exists():
        n += 1
    return f"resume-{n}"


def build_loggers(
    cfg: DictConfig, run_dir: Path, group: str, job_name: str, resume_id: str | None, resumed: bool = False
) -> list[Logger]:
    loggers: list[Logger] = []
    if cfg.logger.csv:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv", version=_csv_version(run_dir, resumed)))
    w = cfg.logger.wandb
    if w is not None and w.mode != "disabled":
        # Offline needs no key and no network; `wandb sync <run_dir>/wandb/offline-run-*` uploads it later.
        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(
            WandbLogger(
                project=w.project,
                entity=w.entity,
                group=w.group or group,
                name=job_name,
                save_dir=str(run_dir),
                offline=w.mode == "offline",
                id=resume_id,
                resume="allow" if resume_id else None,
                tags=list(w.tags) + list(cfg.tags),
                settings={"console": "off", "silent": True},
            )
        )
    if loggers:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        for logger in loggers:
            logger.log_hyperparams(resolved)
    return loggers


def wandb_info(loggers: list[Logger], mode: str) -> dict[str, Any] | None:
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            return {"run_id": run.id, "dir": str(Path(run.dir).parent), "mode": mode, "group": run.group}
    return None


def _flat_summary(record: RunRecord) -> dict[str, Any]:
    summary: dict[str, Any] = {"status": record.status}
    for art in record.artifacts:
        for key in QUALITY_SCALARS:
            summary[f"{art.name}/{key}"] = art.quality.get(key)
        for key in ("params", "flops", "size_bytes", "peak_rss_mb"):
            summary[f"{art.name}/{key}"] = art.cost.get(key)
        for batch, lat in art.cost.get("latency_ms", {}).items():
            summary[f"{art.name}/latency_p50_ms_b{batch}"] = lat["p50"]
        if art.parity:
            summary[f"{art.name}/flip_rate"] = art.parity["flip_rate"]
    return summary


def log_record(loggers: list[Logger], record: RunRecord) -> None:
    """Put the record's numbers in the W&B run: summary metrics and a per-artifact table."""
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        import wandb

        run = logger.experiment
        run.summary.update(_flat_summary(record))
        columns = [
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
        rows = [
            [
                a.name,
                a.model,
                a.source,
                *(a.quality.get(k) for k in columns[3:7]),
                (a.parity or {}).get("flip_rate"),
                a.cost.get("params"),
                a.cost.get("size_bytes"),
                (a.cost.get("latency_ms") or {}).get("1", {}).get("p50"),
            ]
            for a in record.artifacts
        ]
        run.log({"artifacts": wandb.Table(columns=columns, data=rows)})


def close_loggers(loggers: list[Logger], status: str) -> None:
    """Finalise every logger and finish the W&B run, even if one of them fails: a job never leaks a run."""
    for logger in loggers:
        try:
            logger.finalize("success" if status == "ok" else "failed")
        except Exception as err:  # noqa: BLE001 - closing must go on for the others
            log.warning("could not finalise %s: %s", type(logger).__name__, err)
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            try:
                wandb.finish(exit_code=0 if status == "ok" else 1)
            except Exception as err:  # noqa: BLE001
                log.warning("could not finish the W&B run: %s", err)
