"""Many slides through one loaded model into one cohort folder: a row per slide, failures as rows (with
``slides=``) or raised (with ``slide=``), and the model's threads set for the run and restored after.

Every slide's outputs go to ``<folder>/<name>/``, written atomically: the slide is processed into a hidden
``.<name>.partial-<host>-<pid>`` folder, its report.json is sealed with a ``cohort`` block (a fingerprint of
the artifact's files and of the settings that change the slide's outputs, and the manifest's mpp, label and
group), and only then is the folder renamed into place. So a slide folder is complete or absent, whatever
kills the job; a slide that fails leaves ``<name>/failed.json`` (its summary row), retried by the next run.
A slide whose report.json carries the current fingerprint (and whose files are all there) is complete and
skipped by a rerun; one of another artifact or other settings is refused, or redone with ``overwrite``.
``<folder>/cohort.json`` records the fingerprint of the whole folder, so a job refuses a folder of another
artifact or other settings before any work, even when none of its own slides is there yet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, read_write

from patholite.errors import CheckpointError, ConfigError, PatholiteError, SlideError
from patholite.io import write_json
from patholite.progress import Progress
from patholite.slides.manifest import SlideEntry
from patholite.slides.report import failed_row, write_summary

log = logging.getLogger(__name__)


def check_slide_artifact(directory: Path, meta: dict[str, Any]) -> None:
    """Refuse, from the sidecar alone, artifacts the slide CLI cannot run at all (MIL bags)."""
    if meta.get("kind") == "mil":
        raise CheckpointError(
            f"artifact {directory} is a gated-attention MIL slide model: its bags are built from a tile "
            "classifier's embeddings, so the slide CLI does not run it; run it with scripts/bench_smt.py, or "
            "give the slide CLI a tile classifier or an SMT artifact"
        )


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def model_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` within, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------- names, settings
COHORT_FILE = "cohort.json"  # the folder's fingerprint and settings
REPORT_FILE = "report.json"  # a complete slide's, written last
FAILED_FILE = "failed.json"  # a failed slide's summary row
PARTIAL = ".partial-"  # in the name of a slide folder being written: .<name>.partial-<host>-<pid>
# What changes a slide's outputs, per mode (the engine's batch size, workers and device do not)
MODE_SETTINGS = {
    "tiles": ("tile", "tissue", "reader", "report", "annotations", "annotation_classes"),
    "smt": ("smt", "tissue", "reader"),
    "features": ("tile", "tissue", "reader"),
}


def slide_names(paths: Sequence[str | Path]) -> list[str]:
    """Output folder names: slide stems; where stems repeat, each gets a hash of its absolute path, so a name
    depends on the slide and the cohort, never on the order or the shard the slide is listed in."""
    stems = [Path(p).stem for p in paths]
    counts = Counter(stems)
    return [
        s if counts[s] == 1 else f"{s}-{_short_hash(os.path.abspath(p))}"
        for p, s in zip(paths, stems, strict=True)
    ]


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def cohort_settings(cfg, mode: str, digest: str) -> dict[str, Any]:
    """The settings a slide's outputs depend on: the artifact (``digest``), the mode, and the config blocks
    ``mode`` reads (``MODE_SETTINGS``)."""
    settings: dict[str, Any] = {"artifact_sha256": digest, "mode": mode}
    for key in MODE_SETTINGS[mode]:
        value = cfg.get(key)
        container = isinstance(value, DictConfig | ListConfig)
        settings[key] = OmegaConf.to_container(value, resolve=True) if container else value
    return settings


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: recorded -> now`` for every (dotted) setting that differs."""
    a, b = _flat(recorded), _flat(now)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict) or not d:
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


# ------------------------------------------------------------------------------------------ the cohort
@dataclass
class SlideState:
    """What a slide's folder holds: ``complete`` (its report, current), ``failed`` (a marker), ``stale``
    (complete, but of another artifact or other settings: ``changed``), ``partial`` (a folder without a
    usable report) or ``absent``."""

    status: str
    report: dict[str, Any] | None = None
    changed: list[str] = field(default_factory=list)


@dataclass
class Cohort:
    """The slides of one cohort folder: their names (from the whole cohort, so stable across shard counts),
    manifest entries and the settings their outputs must match (None: not checked, never skipped)."""

    folder: Path
    entries: list[SlideEntry]
    settings: dict[str, Any] | None = None
    artifact: str | None = None
    overwrite: bool = False
    names: dict[str, str] = field(init=False)
    by_path: dict[str, SlideEntry] = field(init=False)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        keys = [str(e.path) for e in self.entries]
        self.names = dict(zip(keys, slide_names([e.path for e in self.entries]), strict=True))
        self.by_path = dict(zip(keys, self.entries, strict=True))

    @classmethod
    def of_paths(cls, paths: Sequence[Path], folder: Path) -> Cohort:
        return cls(folder, [SlideEntry(Path(p)) for p in paths])

    def entry(self, path: Path) -> SlideEntry:
        return self.by_path[str(path)]

    def name(self, path: Path) -> str:
        return self.names[str(path)]

    @property
    def fingerprint(self) -> str | None:
        return None if self.settings is None else fingerprint(self.settings)

    def slide_settings(self, entry: SlideEntry) -> dict[str, Any] | None:
        """The cohort's settings with this slide's manifest mpp in place of reader.mpp."""
        if self.settings is None:
            return None
        settings = json.loads(json.dumps(self.settings, default=str))
        if entry.mpp is not None and "reader" in settings:
            settings["reader"]["mpp"] = entry.mpp
        return settings

    def key(self) -> str:
        """The cohort's identity for shard markers: every slide, its name and mpp, and the settings."""
        listing = sorted((self.names[str(e.path)], os.path.abspath(e.path), e.mpp) for e in self.entries)
        return _short_hash(json.dumps([listing, self.fingerprint], default=str))

    # ---------------------------------------------------------------------------------------- checks
    def check_folder(self) -> None:
        """Refuse (before any work) a folder whose cohort.json names another artifact or other settings;
        with ``overwrite``, remove every slide of other settings from it instead. Then record ours."""
        if self.settings is None:
            return
        path = self.folder / COHORT_FILE
        recorded = read_json_object(path)
        if recorded is not None and recorded.get("fingerprint") != self.fingerprint and not self.overwrite:
            changed = differences(recorded.get("settings") or {}, self.settings)
            # the artifact by where it was, not by its digest
            changed = [
                f"artifact: {recorded.get('artifact')} -> {self.artifact} (other files)"
                if c.startswith("artifact_sha256:") else c
                for c in changed
            ]  # fmt: skip
            raise ConfigError(
                f"out={self.folder} holds the outputs of another artifact or other settings "
                f"({'; '.join(changed) or 'its cohort.json is unreadable'}); give another out=, or "
                "overwrite=true to redo its slides with these (they are never mixed)"
            )
        if self.overwrite:
            self._remove_other_settings()
        if recorded is None or recorded.get("fingerprint") != self.fingerprint:
            write_json(
                path, {"fingerprint": self.fingerprint, "artifact": self.artifact, "settings": self.settings}
            )

    def _remove_other_settings(self) -> None:
        """overwrite: every slide folder of other settings goes, including those of slides not listed now,
        so the cohort's summary never mixes two artifacts or settings."""
        for folder in slide_folders(self.folder):
            report = read_json_object(folder / REPORT_FILE) or read_json_object(folder / FAILED_FILE) or {}
            if (report.get("cohort") or {}).get("cohort_fingerprint") != self.fingerprint:
                log.info("overwrite: removing %s (other settings)", folder)
                shutil.rmtree(folder, ignore_errors=True)

    def state(self, entry: SlideEntry) -> SlideState:
        """What the folder holds for this slide, against its current settings."""
        folder = self.folder / self.name(entry.path)
        if not folder.is_dir():
            return SlideState("absent")
        report = read_json_object(folder / REPORT_FILE)
        if report is None:
            return SlideState("failed" if (folder / FAILED_FILE).is_file() else "partial")
        block = report.get("cohort") or {}
        settings = self.slide_settings(entry)
        if settings is None:
            return SlideState("partial")  # not checked: redone
        if block.get("fingerprint") != fingerprint(settings):
            changed = differences(block.get("settings") or {}, settings) or ["no cohort fingerprint"]
            return SlideState("stale", report, changed)
        if not all((folder / f).is_file() for f in (report.get("files") or {}).values()):
            return SlideState("partial")
        return SlideState("complete", report)

    def plan(self, entries: Sequence[SlideEntry]) -> tuple[list[SlideEntry], list[dict[str, Any]]]:
        """The slides still to do, and the rows of those already complete (read back, ``skipped``). A slide
        of another artifact or other settings is refused, naming it and what differs, unless ``overwrite``."""
        todo, done, stale = [], [], []
        for entry in entries:
            state = self.state(entry)
            if state.status == "complete":
                done.append(self.row(entry, state.report or {}, skipped=True))
            else:
                todo.append(entry)
                if state.status == "stale":
                    stale.append((entry, state))
        if stale and not self.overwrite:
            entry, state = stale[0]
            more = f" (and {len(stale) - 1} more slides)" if len(stale) > 1 else ""
            raise ConfigError(
                f"out={self.folder}: slide {self.name(entry.path)}{more} was made with another artifact or "
                f"other settings ({'; '.join(state.changed)}); give another out=, or overwrite=true to redo"
            )
        return todo, done

    # ------------------------------------------------------------------------------------- one slide
    def row(self, entry: SlideEntry, report: dict[str, Any], skipped: bool = False) -> dict[str, Any]:
        """A complete slide's summary row from its report."""
        row = {**report, "slide": str(report.get("slide") or entry.path), "status": "ok"}
        row["out"] = str(self.folder / self.name(entry.path))
        row.update(_label_group(entry))
        row["skipped"] = skipped
        return row

    def seal(self, entry: SlideEntry, work: Path) -> dict[str, Any]:
        """The report.json the slide's processing wrote into ``work``, with the cohort block and its final
        folder; written last."""
        report = read_json_object(work / REPORT_FILE)
        if report is None:
            raise SlideError(f"slide {entry.path}: its processing wrote no {REPORT_FILE}; this is a bug")
        report["out_dir"] = str(self.folder / self.name(entry.path))
        report.update(_label_group(entry))
        report["cohort"] = self._block(entry)
        write_json(work / REPORT_FILE, report)
        return report

    def _block(self, entry: SlideEntry) -> dict[str, Any]:
        settings = self.slide_settings(entry)
        return {
            "name": self.name(entry.path),
            "fingerprint": None if settings is None else fingerprint(settings),
            "cohort_fingerprint": self.fingerprint,
            "artifact": self.artifact,
            "settings": settings,
            "mpp": entry.mpp,
            **_label_group(entry),
        }

    def mark_failed(self, entry: SlideEntry, row: dict[str, Any]) -> None:
        """``<name>/failed.json``: the failed row, so a merge shows it; the next run retries the slide."""
        work = self.work_dir(entry)
        write_json(work / FAILED_FILE, {**row, "cohort": self._block(entry)})
        self.publish(entry, work)

    def work_dir(self, entry: SlideEntry) -> Path:
        """A fresh hidden folder to write the slide into; earlier ones of this slide (a killed job's) go."""
        name = self.name(entry.path)
        for old in self.folder.glob(f".{name}{PARTIAL}*"):
            shutil.rmtree(old, ignore_errors=True)
        return self.folder / f".{name}{PARTIAL}{socket.gethostname()}-{os.getpid()}"

    def publish(self, entry: SlideEntry, work: Path) -> Path:
        """Rename ``work`` into the slide's place (what was there goes: failed, partial or overwritten)."""
        final = self.folder / self.name(entry.path)
        if final.exists():
            old = work.with_name(work.name + "-old")
            final.rename(old)  # out of the way in one step, so the slide is never half old, half new
            shutil.rmtree(old, ignore_errors=True)
        work.rename(final)
        return final


def _label_group(entry: SlideEntry) -> dict[str, Any]:
    return {k: v for k, v in (("label", entry.label), ("group", entry.group)) if v is not None}


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object file's content; None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def slide_folders(folder: Path) -> list[Path]:
    """The slide folders of a cohort folder (a report.json or failed.json inside), by name."""
    if not folder.is_dir():
        return []
    names = (REPORT_FILE, FAILED_FILE)
    return sorted(
        p for p in folder.iterdir()
        if p.is_dir() and not p.name.startswith(".") and any((p / n).is_file() for n in names)
    )  # fmt: skip


@contextmanager
def slide_overrides(cfg, entry: SlideEntry) -> Iterator[None]:
    """The manifest's mpp as ``reader.mpp`` while this slide is processed (the engines read it there)."""
    if entry.mpp is None:
        yield
        return
    previous = cfg.reader.mpp
    with read_write(cfg):
        cfg.reader.mpp = entry.mpp
    try:
        yield
    finally:
        with read_write(cfg):
            cfg.reader.mpp = previous


# ----------------------------------------------------------------------------------------- many slides
def each_slide(
    paths: list[Path],
    cfg,
    out_dir: Path,
    process: Callable[[Path, Path], dict[str, Any]],
    *,
    cohort: Cohort | None = None,
) -> list[dict[str, Any]]:
    """``process(path, <folder>)`` for every slide, each written atomically into ``out_dir/<name>`` (see the
    module's docstring). With ``slides=`` (many), a slide's failure of any kind is a failed row (and
    ``<name>/failed.json``) and the others go on; with ``slide=`` (one), it is raised.

    ``cohort`` (the entry point's; default: the paths alone into ``out_dir``) gives the names,
    manifest entries and settings; without an entry point's cohort, summary.csv/.md of these rows are
    written into ``out_dir`` here (the entry point merges its cohort folder itself)."""
    own = cohort is None  # library use: these rows are the whole summary
    cohort = cohort or Cohort.of_paths(paths, Path(out_dir))
    many = not cfg.slide
    cohort.folder.mkdir(parents=True, exist_ok=True)
    rows = []
    # slides done, tiles per second over them, time left (an SMT walk reads regions, not tiles: counts none)
    with Progress("slides", len(paths), "slides", rate_of="tiles") as progress:
        for path in paths:
            entry = cohort.entry(path)
            log.info("slide %s", path)
            start = time.perf_counter()
            work = cohort.work_dir(entry)
            try:
                with slide_overrides(cfg, entry):
                    process(path, work)
                report = cohort.seal(entry, work)
                cohort.publish(entry, work)
                row = cohort.row(entry, report)
            except Exception as err:
                if not many:
                    raise
                if isinstance(err, PatholiteError):
                    log.error("slide %s failed: %s", path, err)
                else:  # a bug or an environment failure: keep its traceback in the log
                    log.exception("slide %s failed", path)
                shutil.rmtree(work, ignore_errors=True)
                row = {**failed_row(path, err), **_label_group(entry), "skipped": False}
                row["seconds"] = time.perf_counter() - start
                _mark_failed(cohort, entry, row)
            finally:
                shutil.rmtree(work, ignore_errors=True)  # an interrupted slide leaves nothing half-written
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
            failed = int(row["status"] != "ok")
            progress.advance(1, tiles=int(row.get("n_tiles") or 0), failed=failed)
    if own:
        write_summary(rows, out_dir)
    return rows


def _mark_failed(cohort: Cohort, entry: SlideEntry, row: dict[str, Any]) -> None:
    try:
        cohort.mark_failed(entry, {k: v for k, v in row.items() if k != "skipped"})
    except OSError as err:  # the row is still in this job's summary; a merge will not see the slide
        log.error("could not write %s's failed marker: %s", entry.path, err)
