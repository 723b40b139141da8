"""Entry point: ``python -m patholite.slide`` (or ``patholite-slide``): a tile classifier over whole slides,
an SMT slide model (``mode``: auto picks by the artifact; see ``slides.smt_inference``), or every tile's
embedding into one feature file per slide (``mode=features``, auto for an encoder; see ``slides.extract``).

``slide=<file>`` or ``slides=<folder, list file or CSV manifest>``, and ``artifact=<artifact or run folder>``
(float, torch INT8 or ONNX Runtime). Per slide: tissue detection, tiling at the resolution the model was
trained at, pipelined inference, per-tile predictions, heatmaps, a call and a report; one summary for all
slides, built from the slides' reports in the cohort folder (``out``, default the run folder).

Cohorts: ``shard=<i> shards=<n> out=<folder>`` runs share i of the cohort (balanced by file size,
``slides.shards``); a rerun skips the slides already complete in ``out`` (``slides.cohort``); the last shard
to finish, or ``merge=<folder>``, writes the folder's summary (``slides.merge``).
"""

from __future__ import annotations

import logging
import statistics
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import patholite.config  # noqa: F401  (registers the schemas)
from patholite import tracking
from patholite.accelerators.machine import describe_machine
from patholite.artifacts.digest import artifact_digest
from patholite.artifacts.resolve import resolve_artifact
from patholite.artifacts.sidecar import read_sidecar
from patholite.config.options import CONF_DIR
from patholite.errors import AcceleratorError, ConfigError, PatholiteError, SlideError
from patholite.jobs import job_info, run_hydra, sigterm_as_exit, user_message
from patholite.measure.cost import files_size
from patholite.records import ArtifactRecord, RunRecord
from patholite.slides.cohort import Cohort, cohort_settings
from patholite.slides.manifest import SlideEntry, read_cohort
from patholite.slides.merge import clear_shard, finish_shard, merge_cohort
from patholite.slides.report import summary_table
from patholite.slides.run import MODES, run_slides, slide_mode
from patholite.slides.shards import shard_of
from patholite.slides.supervise import check_limits
from patholite.wsi.reader import find_slides

log = logging.getLogger("patholite.slide")


def check_slide_config(cfg: DictConfig) -> None:
    """Impossible settings fail before any model or slide is loaded."""
    if cfg.merge:
        given = [k for k in ("slide", "slides", "shard", "shards", "out") if cfg.get(k) is not None]
        if given:
            raise ConfigError(
                f"merge={cfg.merge} builds a cohort folder's summary from its slides' reports and runs no "
                f"slide: give it alone, without {', '.join(f'{k}=' for k in given)}"
            )
        return
    if bool(cfg.slide) == bool(cfg.slides):
        raise ConfigError(
            "give slide=<file> for one slide or slides=<folder, list file or manifest> for many (one of "
            "them), or merge=<cohort folder> for a cohort's summary"
        )
    if not cfg.artifact:
        raise ConfigError("give artifact=<artifact folder or run folder>: the model to run over the slides")
    check_shards(cfg)
    e, t = cfg.engine, cfg.tile
    if e.batch_size < 1 or e.workers < 0 or e.prefetch < 1:
        raise ConfigError(
            f"engine.batch_size={e.batch_size}, engine.workers={e.workers}, engine.prefetch={e.prefetch}: "
            "batch size and prefetch must be at least 1, workers at least 0"
        )
    if not 0.0 <= t.theta <= 1.0:
        raise ConfigError(f"tile.theta={t.theta} is a tissue fraction: give a value in [0, 1]")
    if t.size is not None and t.size < 8:
        raise ConfigError(f"tile.size={t.size} px is too small for a tile; use 8 or more")
    if t.overlap < 0 or (t.size is not None and t.overlap >= t.size):
        raise ConfigError(f"tile.overlap={t.overlap} must be at least 0 and smaller than the tile size")
    if not 0.0 < cfg.report.min_share <= 1.0:
        raise ConfigError(f"report.min_share={cfg.report.min_share} is a share of the tissue: give (0, 1]")
    device = str(cfg.engine.device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AcceleratorError(
                f"engine.device={device}, but this machine has no CUDA GPU: use engine.device=cpu"
            )
    elif device != "cpu":
        raise ConfigError(f"engine.device={device!r}: use cpu or cuda (cuda:N for one GPU)")
    if str(cfg.get("mode", "auto")) not in MODES:
        raise ConfigError(f"mode={cfg.mode!r}: use auto (by the artifact), tiles, smt or features")
    if cfg.tissue.method not in ("otsu_saturation", "otsu_gray"):
        raise ConfigError(f"tissue.method={cfg.tissue.method!r}: choose otsu_saturation or otsu_gray")
    check_limits(cfg.limits)


def check_shards(cfg: DictConfig) -> None:
    """``shard``/``shards``/``out`` that cannot split a cohort fail before work."""
    shard, shards = cfg.shard, cfg.shards
    if shards is not None and shards < 1:
        raise ConfigError(f"shards={shards}: give the number of shares to split the cohort into, 1 or more")
    if shard is not None and shards is None:
        raise ConfigError(
            f"shard={shard} needs shards=<n>, the number of shares the cohort is split into "
            "(e.g. -m shard=0,1,2,3 shards=4 out=<cohort folder>)"
        )
    if shards is not None and shards > 1 and shard is None:
        raise ConfigError(
            f"shards={shards} needs shard=<i>, which share this job runs (0 to {shards - 1}); run them all "
            f"with -m shard={','.join(map(str, range(min(shards, 4))))}{',...' if shards > 4 else ''}"
        )
    if shard is not None and not 0 <= shard < shards:
        raise ConfigError(f"shard={shard} with shards={shards}: shards count from 0, give 0 to {shards - 1}")
    if (shards or 1) > 1 and not cfg.out:
        raise ConfigError(
            f"shards={shards} needs out=<cohort folder>: every shard writes its slides there (a job's run "
            "folder is its own), and a rerun into it skips what is complete"
        )


def slide_artifact_record(directory: Path, rows: list[dict[str, Any]], device: str) -> ArtifactRecord:
    """The artifact a slide run used, with what its slides cost (medians over the slides that ran)."""
    sidecar = read_sidecar(directory)
    ok = [r for r in rows if r["status"] == "ok"]

    def median(key: str, within: str | None = None) -> float | None:
        values = [(r.get(within) or {}).get(key) if within else r.get(key) for r in ok]
        values = [v for v in values if isinstance(v, int | float)]
        return float(statistics.median(values)) if values else None

    files = sorted(p.name for p in directory.iterdir() if p.is_file())
    cost = {
        "size_bytes": files_size(directory, files),
        "seconds_per_slide": median("seconds"),
        "tiles_per_slide": median("n_tiles"),
        "tiles_per_s": median("tiles_per_s", "timings"),
        "reads_per_slide": median("reads"),
        "pixels_read_per_slide": median("pixels_read"),
        "threads": torch.get_num_threads(),
        "device": device,
    }
    return ArtifactRecord(
        name=directory.name,
        path=str(directory),
        files=files,
        quality={},
        cost={k: v for k, v in cost.items() if v is not None},
        model=(sidecar.get("model") or {}).get("name"),
    )


# Each slide's pictures a lab looks at first, logged to W&B as images (tile runs: report and heatmap; SMT: its
# report and focus)
SLIDE_PLOTS = ("report.png", "heatmap.png", "focus.png")


def slide_plots(rows: list[dict[str, Any]]) -> list[Path]:
    """The PNGs of every slide that ran, in slide order."""
    return [
        Path(r["out"]) / n
        for r in rows
        if r["status"] == "ok"
        for n in SLIDE_PLOTS
        if (Path(r["out"]) / n).is_file()
    ]


def _tracking(
    cfg: DictConfig, out: Path, job: dict[str, Any], choices: dict[str, Any], directory: Path
) -> list:
    """The slide job's W&B run (``job_type=slide``), named by the artifact it runs."""
    # a run's artifact folder (<run>/artifacts/<name>) is named with its run
    run = f"{directory.parent.parent.name}-" if directory.parent.name == "artifacts" else ""
    name = f"slide-{run}{directory.name}"
    name += f"-{job['num']}" if job["num"] is not None else ""
    group = tracking.job_group(cfg, job, out, choices)
    return tracking.build_loggers(cfg, out, group, name, None, job_type="slide", csv=False)


@contextmanager
def _recorded(record: RunRecord) -> Iterator[None]:
    """The job's record finished as its end: a user mistake is one line and exit 1, a bug keeps its
    traceback, Ctrl-C and SIGTERM are ``interrupted``."""
    try:
        yield
    except PatholiteError as err:
        record.finish("failed", err, traceback.format_exc())
        print(f"patholite: {type(err).__name__}: {user_message(err)}", file=sys.stderr)
        raise SystemExit(1) from err
    except (KeyboardInterrupt, SystemExit) as err:
        record.finish("interrupted", err, traceback.format_exc())
        raise
    except Exception as err:
        record.finish("failed", err, traceback.format_exc())
        raise


def _cohort(cfg: DictConfig, run_dir: Path, directory: Path) -> tuple[Cohort, list[SlideEntry]]:
    """The whole cohort (names come from all of it) in its folder, and this shard's share of it."""
    entries = read_cohort(cfg.slides) if cfg.slides else [SlideEntry(p) for p in find_slides(cfg.slide)]
    mode = slide_mode(str(cfg.get("mode", "auto")), read_sidecar(directory), directory)
    folder = Path(cfg.out).expanduser().resolve() if cfg.out else run_dir
    settings = cohort_settings(cfg, mode, artifact_digest(directory))
    cohort = Cohort(folder, entries, settings, str(directory), bool(cfg.overwrite))
    return cohort, shard_of(entries, cfg.shard or 0, cfg.shards or 1, path=lambda e: e.path)


def run_slide(cfg: DictConfig) -> int:
    if cfg.merge:
        return run_merge(cfg)
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir).resolve()
    config = OmegaConf.to_container(cfg, resolve=True)
    job = job_info(hc)
    record = RunRecord(run_dir=str(out), config=config, job=job, entry="slide")
    record.device = {"engine_device": str(cfg.engine.device), **describe_machine()}
    record.write()
    loggers: list = []
    merged: list[dict[str, Any]] | None = None
    shard, shards = cfg.shard or 0, cfg.shards or 1
    try:
        with _recorded(record):
            check_slide_config(cfg)
            directory = resolve_artifact(cfg.artifact, cfg.artifact_name)
            cohort, mine = _cohort(cfg, out, directory)
            folder = cohort.folder
            folder.mkdir(parents=True, exist_ok=True)
            clear_shard(folder, shard, shards)  # this shard is not done until it ends
            cohort.check_folder()  # another artifact's or other settings' folder: refused before work
            todo, skipped = cohort.plan(mine)
            loggers = _tracking(cfg, out, job, hc.runtime.choices, directory)
            record.wandb = tracking.wandb_info(
                loggers, cfg.logger.wandb.mode if cfg.logger.wandb else "disabled"
            )
            if skipped:
                print(f"skipped {len(skipped)} slides already complete in {folder}")
            rows: list[dict[str, Any]] = []
            if todo:
                rows = run_slides([e.path for e in todo], cfg, folder, directory, cohort=cohort)
            rows = sorted(skipped + rows, key=lambda r: Path(r.get("out") or r["slide"]).name)
            if finish_shard(folder, shard, shards, cohort.key(), rows):
                merged, _ = merge_cohort(folder)
        failed = [r for r in rows if r["status"] != "ok"]
        ran = [r for r in rows if not r.get("skipped")]
        record.artifacts = [slide_artifact_record(directory, ran, str(cfg.engine.device))]
        record.slides = {"n": len(rows), "ok": len(rows) - len(failed), "failed": len(failed),
                         "skipped": len(rows) - len(ran), "shard": shard, "shards": shards,
                         "cohort": str(folder), "merged": merged is not None,
                         "summary": str(folder / "summary.csv")}  # fmt: skip
        if failed:
            error = SlideError(f"{len(failed)} of {len(rows)} slides failed; see summary.csv")
            record.finish("failed", error)
        else:
            record.finish("ok")
        # the W&B run gets the record, each slide's report and heatmap, and a table of the per-slide calls:
        # the cohort's (as its summary.csv) where this job merged it, else this shard's
        columns, summary = summary_table(merged if merged is not None else rows)
        table = (columns, [[row[c] for c in columns] for row in summary])
        # a cohort folder elsewhere may hold thousands of slides: their pictures stay in it
        plots = slide_plots(ran) if folder == out else []
        tracking.log_record(loggers, record, plots, {"slides": table}, log_model=cfg.logger.log_model)
    finally:
        tracking.close_loggers(loggers, record.status)
    for r in ran:
        _print_row(r)
    if merged is not None:
        print(f"summary: {folder / 'summary.csv'} ({len(merged)} slides)")
    else:
        print(f"summary: written by the last shard to finish, or: python -m patholite.slide merge={folder}")
    print(f"record:  {record.path}")
    if failed:
        print(f"patholite: {len(failed)} of {len(rows)} slides failed; see the summary", file=sys.stderr)
        return 1
    return 0


def _print_row(r: dict[str, Any]) -> None:
    if r["status"] == "ok" and r.get("mode") == "features":
        print(
            f"{Path(r['slide']).name}: {r['n_tiles']} tiles, {r['embed_dim']}-d features, "
            f"{r['tiles_per_s']:.1f} tiles/s -> {Path(r['out']) / r['files']['features']}"
        )
    elif r["status"] == "ok" and r.get("mode") == "smt":
        t, call = r["timings"], r["call"]
        megapixels = r["pixels_read"] / 1e6
        print(
            f"{Path(r['slide']).name}: {call['label']} (confidence {call['confidence']:.2f}), SMT read "
            f"{r['reads']} regions ({megapixels:.2f} Mpx decoded) in {t['read_s']:.2f} s, model "
            f"{t['model_s']:.2f} s, tissue {t['tissue_s']:.2f} s, total {t['total_s']:.2f} s "
            f"-> {r['out']}"
        )
    elif r["status"] == "ok":
        call = r["call"]
        t = r["timings"]
        confidence = "n/a" if call["confidence"] is None else f"{call['confidence']:.2f}"
        print(
            f"{Path(r['slide']).name}: {call['label']} (confidence {confidence}), {r['n_tiles']} tiles, "
            f"{t['tiles_per_s']:.1f} tiles/s (load {t['load_busy_s']:.1f} s in {t['workers']} workers, "
            f"model {t['process_s']:.1f} s, save {t['save_busy_s']:.2f} s) -> {r['out']}"
        )
    else:
        print(f"{Path(r['slide']).name}: FAILED {r['error']}")


def run_merge(cfg: DictConfig) -> int:
    """``merge=<cohort folder>``: its summary.csv/.md from its slides' reports; a W&B run with the table."""
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir).resolve()
    job = job_info(hc)
    record = RunRecord(
        run_dir=str(out), config=OmegaConf.to_container(cfg, resolve=True), job=job, entry="slide"
    )
    record.device = describe_machine()
    record.write()
    loggers: list = []
    try:
        with _recorded(record):
            check_slide_config(cfg)
            folder = Path(cfg.merge).expanduser().resolve()
            rows, csv_path = merge_cohort(folder)
            group = tracking.job_group(cfg, job, out, hc.runtime.choices)
            name = f"slide-merge-{folder.name}" + (f"-{job['num']}" if job["num"] is not None else "")
            loggers = tracking.build_loggers(cfg, out, group, name, None, job_type="slide", csv=False)
            record.wandb = tracking.wandb_info(
                loggers, cfg.logger.wandb.mode if cfg.logger.wandb else "disabled"
            )
        failed = sum(r["status"] != "ok" for r in rows)
        record.slides = {"n": len(rows), "ok": len(rows) - failed, "failed": failed, "cohort": str(folder),
                         "merged": True, "summary": str(csv_path)}  # fmt: skip
        record.finish("ok")  # the merge did its work; failed slides are rows of the summary
        columns, summary = summary_table(rows)
        table = (columns, [[row[c] for c in columns] for row in summary])
        tracking.log_record(loggers, record, [], {"slides": table})
    finally:
        tracking.close_loggers(loggers, record.status)
    print(f"merged {len(rows)} slides ({failed} failed) of {folder}")
    print(f"summary: {csv_path}\nrecord:  {record.path}")
    return 0


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="slide")
def _hydra_main(cfg: DictConfig) -> int:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        with sigterm_as_exit():
            code = run_slide(cfg)
    except SystemExit as err:
        # in a sweep (shards of a cohort) a failed job is its record, and the others go on: the sweep's
        # summary lists it and exits 1; an interrupted one (SIGTERM, Ctrl-C) still ends the sweep
        if multirun and err.code == 1:
            return 1
        raise
    if code and not multirun:
        raise SystemExit(code)
    return code


def main() -> None:
    run_hydra(_hydra_main)


if __name__ == "__main__":
    main()
