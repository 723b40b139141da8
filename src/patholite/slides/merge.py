"""A cohort folder's summary, built from its slides' reports: ``python -m patholite.slide merge=<folder>``,
and by the last shard of a sweep to finish.

The summary reads every ``<slide>/report.json`` (and ``<slide>/failed.json``) of the folder, in slide-name
order, so it is the same whichever shard ran which slide and in which order they finished. A slide of
another artifact or other settings than the folder's cohort.json is refused, never mixed in.

Each shard, when done, leaves ``.cohort/shard-<i>-of-<n>.json`` with the cohort's key (its slides and
settings); the shard that finds every share of its cohort done merges. This needs no launcher callback, so
it works the same for a Hydra sweep (basic, submitit_local or SLURM launcher), a SLURM job array or shards
started by hand, and a rerun of one shard merges again.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

from patholite.errors import ConfigError
from patholite.io import write_json
from patholite.slides.cohort import (
    COHORT_FILE,
    FAILED_FILE,
    REPORT_FILE,
    read_json_object,
    slide_folders,
)
from patholite.slides.report import write_summary

log = logging.getLogger(__name__)

MARKS = ".cohort"  # the shards' done markers


def merge_rows(folder: str | Path) -> list[dict[str, Any]]:
    """One row per slide folder (complete: its report; failed: its marker), in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"merge={folder} does not exist; give a cohort folder (the out= of a slide run)")
    expected = (read_json_object(folder / COHORT_FILE) or {}).get("fingerprint")
    rows, other = [], []
    for sub in slide_folders(folder):
        report = read_json_object(sub / REPORT_FILE)
        data = report or read_json_object(sub / FAILED_FILE)
        if data is None:
            log.warning("%s: neither %s nor %s is readable; left out", sub, REPORT_FILE, FAILED_FILE)
            continue
        if expected is not None and (data.get("cohort") or {}).get("cohort_fingerprint") != expected:
            other.append(sub.name)
            continue
        if report is not None:
            rows.append({**report, "status": "ok", "out": str(sub)})
        else:
            rows.append({**data, "status": "failed"})
    if other:
        names = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
        raise ConfigError(
            f"cohort folder {folder}: slides {names} were made with another artifact or other settings than "
            f"its {COHORT_FILE} records; rerun the cohort with overwrite=true, or move them out"
        )
    if not rows:
        raise ConfigError(
            f"{folder} holds no slide outputs (<slide>/{REPORT_FILE}); merge= needs a cohort folder, the "
            "out= of a slide run"
        )
    return rows


def merge_cohort(folder: str | Path) -> tuple[list[dict[str, Any]], Path]:
    """The folder's summary.csv/.md from its slides' reports; returns the rows and the CSV's path."""
    rows = merge_rows(folder)
    return rows, write_summary(rows, folder)


def _mark(folder: Path, shard: int, shards: int) -> Path:
    return folder / MARKS / f"shard-{shard}-of-{shards}.json"


def clear_shard(folder: Path, shard: int, shards: int) -> None:
    """This shard is not done (any more): called as it starts."""
    _mark(folder, shard, shards).unlink(missing_ok=True)


def finish_shard(folder: Path, shard: int, shards: int, key: str, rows: list[dict[str, Any]]) -> bool:
    """Mark this shard of the cohort ``key`` done; True when every shard of it is (this one merges)."""
    failed = sum(r["status"] != "ok" for r in rows)
    skipped = sum(bool(r.get("skipped")) for r in rows)
    write_json(
        _mark(folder, shard, shards),
        {"key": key, "shard": shard, "shards": shards, "slides": len(rows), "failed": failed,
         "skipped": skipped, "finished_at": dt.datetime.now().isoformat(timespec="seconds")},
    )  # fmt: skip
    marks = [read_json_object(_mark(folder, i, shards)) for i in range(shards)]
    return all(m is not None and m.get("key") == key for m in marks)
