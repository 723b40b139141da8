"""The cohort benchmark (issue 17): slides per hour of 1, 2 and 4 local shards of the real slide CLI, the
merged summaries compared, a shard killed and rerun, and the arithmetic of a 10,000-slide 40x cohort from
the measured per-tile costs. ``scripts/bench_cohort.py`` makes the slides and the artifact and calls these.

Every shard runs ``python -m patholite.slide`` with each thread pool pinned (``pinned_env``: OpenMP, MKL,
OpenBLAS, numexpr and OpenCV through the environment; torch through ``engine.threads``; no loader workers),
so a shard is one core's worth of work and the shard counts compare like for like.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from patholite.compress.quantize import quantize_dynamic_int8
from patholite.slides.cohort import PARTIAL, REPORT_FILE, model_threads
from patholite.slides.engine import SlideTiles, TileSpec
from patholite.slides.inference import load_classifier
from patholite.wsi.reader import forget_cached, open_slide
from patholite.wsi.tiling import tile_grid
from patholite.wsi.tissue import detect_tissue

# Every thread pool a shard could start besides torch's (engine.threads): BLAS/OpenMP and OpenCV's own
# (cv2 reads OPENCV_FOR_THREADS_NUM when it loads; the slide engine never calls cv2.setNumThreads)
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "OPENCV_FOR_THREADS_NUM",
)
# summary.csv columns that depend on the slides and the model only (the timing columns, tiles_per_s and
# seconds, differ from run to run); frac_<class> columns are added as found
SUMMARY_COLUMNS = ("slide", "status", "error", "call", "confidence", "call_share", "n_tiles")
SKIPPED_LINE = re.compile(r"skipped (\d+) slides already complete")
# the cohort loop's line as each slide starts (the slide CLI's log format: [time][logger][level] - message)
SLIDE_LOG_LINE = re.compile(r"^\[([\d-]+ [\d:,]+)\]\[patholite\.slides\.cohort\]\[INFO\] - slide (.+)$")


def pinned_env(
    threads: int = 1, base: Mapping[str, str] | None = None, src: str | Path | None = None
) -> dict:
    """``base`` (default: this process's environment) with every thread pool pinned to ``threads``; ``src``
    (a checkout's ``src``) first on PYTHONPATH, absolute, so the shards run that code, not an installed
    copy."""
    env = dict(os.environ if base is None else base)
    env.update({var: str(threads) for var in THREAD_VARS})
    env["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"  # no accelerator plugin imports in each shard
    if src is not None:
        rest = env.get("PYTHONPATH")
        env["PYTHONPATH"] = os.pathsep.join([str(Path(src).resolve()), *([rest] if rest else [])])
    return env


def cohort_command(
    slides: Path,
    artifact: Path,
    out: Path,
    run_dir: Path,
    cache_dir: Path,
    shards: int,
    threads: int = 1,
    launcher: str | None = "submitit_local",
    python: str = sys.executable,
) -> list[str]:
    """The slide CLI over the cohort folder ``slides`` into ``out``: with a launcher, one sweep of ``shards``
    jobs (``shard=0..n-1``); without, one plain job (``shard=0`` of ``shards``), for the kill test."""
    args = [
        python, "-m", "patholite.slide", f"slides={slides}", f"artifact={artifact}", f"out={out}",
        f"shards={shards}", "engine.workers=0", f"engine.threads={threads}", "logger=none",
        f"paths.cache_dir={cache_dir}",  # a fresh cache per run: every run detects tissue itself
    ]  # fmt: skip
    if launcher is None:
        return [*args, "shard=0", f"hydra.run.dir={run_dir}"]
    shard_list = ",".join(str(i) for i in range(shards))
    return [args[0], args[1], args[2], "-m", *args[3:], f"shard={shard_list}",
            f"hydra/launcher={launcher}", f"hydra.sweep.dir={run_dir}"]  # fmt: skip


# ----------------------------------------------------------------------------------------- one config
@dataclass
class CohortRun:
    """One launch of a cohort: wall seconds from launch to the merged summary, and each job's timeline."""

    shards: int
    wall_s: float
    slides: int
    summary: str
    # per job (from its run record): seconds from launch to its start, and its own duration
    jobs: list[dict[str, Any]] = field(default_factory=list)
    # per shard: the seconds its slides took (the summary's per-slide seconds, summed over its share)
    shard_slide_s: list[float] = field(default_factory=list)

    @property
    def slides_per_hour(self) -> float:
        return self.slides / self.wall_s * 3600

    @property
    def processing_slides_per_hour(self) -> float:
        """Slides/hour of the slide processing alone: the slides over the slowest shard's slide seconds."""
        return self.slides / max(self.shard_slide_s) * 3600

    def breakdown(self) -> dict[str, float]:
        """Where the wall time goes: launch to the first job's start (the launcher importing the CLI,
        submitit starting each job: a fresh Python importing torch), the last job's own time outside its
        slides (loading the model, the artifact's digest, the merge), and the last job's end to the
        launcher's exit (submitit's polling, the sweep's comparison table)."""
        if not self.jobs:
            return {}
        ends = [j["start_after_launch_s"] + (j["duration_s"] or 0) for j in self.jobs]
        last = max(range(len(self.jobs)), key=lambda i: ends[i])
        shard = self.jobs[last]["shard"] or 0
        in_job = (self.jobs[last]["duration_s"] or 0) - (
            self.shard_slide_s[shard] if self.shard_slide_s else 0
        )
        return {
            "start_s": min(j["start_after_launch_s"] for j in self.jobs),
            "last_start_s": max(j["start_after_launch_s"] for j in self.jobs),
            "in_job_s": in_job,
            "tail_s": self.wall_s - ends[last],
        }

    @property
    def overhead_s(self) -> float:
        """Wall time not spent in any slide by the slowest shard: process start-up (a fresh Python
        importing torch per job, the launcher's own), loading the model, the merge and polling."""
        return self.wall_s - max(self.shard_slide_s, default=0.0)


def run_cohort(
    slides: Path,
    artifact: Path,
    work: Path,
    shards: int,
    env: Mapping[str, str],
    threads: int = 1,
    timeout: float = 3600,
) -> CohortRun:
    """Run the cohort once with ``shards`` local shards into fresh folders under ``work``."""
    out, run_dir, cache = work / "cohort", work / "runs", work / "cache"
    cmd = cohort_command(slides, artifact, out, run_dir, cache, shards, threads)
    start_epoch, start = time.time(), time.perf_counter()
    proc = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    (work / "launcher.log").write_text(proc.stdout + proc.stderr)
    summary = out / "summary.csv"
    if proc.returncode != 0 or not summary.is_file():
        raise RuntimeError(
            f"cohort run with {shards} shards failed (exit {proc.returncode}; log {work / 'launcher.log'}): "
            f"{proc.stderr[-1500:]}"
        )
    jobs = job_timeline(run_dir, start_epoch)
    by_shard = {j["shard"]: sum(j["slide_walls"].values()) for j in jobs}
    return CohortRun(
        shards=shards,
        wall_s=wall,
        slides=len(read_summary(summary)),
        summary=str(summary),
        jobs=jobs,
        shard_slide_s=[by_shard.get(i, 0.0) for i in range(shards)],
    )


def job_timeline(run_dir: Path, launch_epoch: float) -> list[dict[str, Any]]:
    """Each slide job's start (seconds after launch), duration and slides' wall seconds, from the run
    records and logs under ``run_dir``."""
    jobs = []
    for path in sorted(run_dir.rglob("metrics.json")):
        record = json.loads(path.read_text())
        if record.get("entry") != "slide" or not record.get("started_at"):
            continue
        started = dt.datetime.fromisoformat(record["started_at"]).timestamp()
        log = path.parent / "slide.log"
        jobs.append({
            "shard": (record.get("slides") or {}).get("shard") or 0,
            "start_after_launch_s": round(started - launch_epoch, 2),
            "duration_s": record.get("duration_s"),
            "slide_walls": slide_walls(log.read_text(), record["finished_at"]) if log.is_file() else {},
        })  # fmt: skip
    return jobs


def slide_walls(log: str, finished_at: str) -> dict[str, float]:
    """Each slide's whole wall seconds in a job (engine, tissue and its outputs: a report's own seconds end
    before its heatmaps, report and GeoJSON are drawn), from the cohort loop's ``slide <path>`` log lines:
    each slide lasts until the next one starts, the last until the job's record finished (``finished_at``,
    ISO; the merge, when this job did it, is in it: a few reads of small reports)."""
    starts = []
    for line in log.splitlines():
        match = SLIDE_LOG_LINE.match(line)
        if match:
            stamp = dt.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local time
            starts.append((stamp, match.group(2).strip()))
    end = dt.datetime.fromisoformat(finished_at).timestamp()
    stamps = [t for t, _ in starts] + [end]
    return {path: round(stamps[i + 1] - t, 3) for i, (t, path) in enumerate(starts)}


def rotation(configs: Sequence[int], repeat: int) -> list[int]:
    """The order of ``configs`` in repeat ``repeat``: rotated by one each repeat, so no configuration always
    runs first (a cold page cache) or last (a machine warmed by the others)."""
    k = repeat % len(configs)
    return [*configs[k:], *configs[:k]]


def ratio_summary(rates: Mapping[int, Sequence[float]], base: int = 1) -> dict[int, dict[str, float]]:
    """Per configuration, the ratio of its rate to ``base``'s in the same repeat: median, min and max."""
    if base not in rates:
        raise ValueError(f"ratio_summary needs the base configuration {base} among {sorted(rates)}")
    out = {}
    for config, values in rates.items():
        if len(values) != len(rates[base]):
            raise ValueError(
                f"configuration {config} has {len(values)} repeats, {base} has {len(rates[base])}"
            )
        ratios = [v / b for v, b in zip(values, rates[base], strict=True)]
        out[config] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return out


def scaling_summary(runs: Mapping[int, Sequence[CohortRun]], cores: int) -> dict[str, Any]:
    """Per shard count (runs in repeat order): medians of slides/hour, wall, the slowest shard's slide
    seconds, the overhead and the jobs' start after launch; the ratios to one shard; and what limits the
    counts above ``cores`` (shards that share a core)."""
    configs = {}
    for n, rs in runs.items():
        starts = [j["start_after_launch_s"] for r in rs for j in r.jobs]
        configs[n] = {
            "slides_per_hour": [round(r.slides_per_hour, 1) for r in rs],
            "slides_per_hour_median": statistics.median(r.slides_per_hour for r in rs),
            "wall_s": [round(r.wall_s, 2) for r in rs],
            "wall_s_median": statistics.median(r.wall_s for r in rs),
            "slowest_shard_slide_s_median": statistics.median(max(r.shard_slide_s) for r in rs),
            "shard_slide_s": [[round(v, 1) for v in r.shard_slide_s] for r in rs],
            "overhead_s_median": statistics.median(r.overhead_s for r in rs),
            "job_start_s_median": statistics.median(starts) if starts else math.nan,
            **{
                f"{k}_median": statistics.median(r.breakdown()[k] for r in rs)
                for k in ("start_s", "last_start_s", "in_job_s", "tail_s")
                if all(r.jobs for r in rs)
            },
        }
    ratios = ratio_summary({n: [r.slides_per_hour for r in rs] for n, rs in runs.items()})
    processing = ratio_summary({n: [r.processing_slides_per_hour for r in rs] for n, rs in runs.items()})
    over = [n for n in runs if n > cores]
    note = (
        f"{', '.join(map(str, over))} shards on {cores} cores: shards share cores (one thread each), "
        "so they add start-ups and contention (memory bandwidth, the page cache) but no compute; "
        "slides/hour can at best match the cores' count."
        if over
        else ""
    )
    return {
        "configs": configs,
        "ratios": ratios,
        "processing_ratios": processing,
        "cores": cores,
        "note": note,
    }


# ------------------------------------------------------------------------------------------ summaries
def read_summary(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def summary_signature(path: str | Path) -> tuple[list[str], list[tuple[str, ...]]]:
    """The columns of a summary.csv that must not depend on the shard count (``SUMMARY_COLUMNS`` and every
    ``frac_<class>``), and its rows restricted to them, as written (exact text)."""
    rows = read_summary(path)
    if not rows:
        return list(SUMMARY_COLUMNS), []
    columns = [c for c in SUMMARY_COLUMNS if c in rows[0]] + [c for c in rows[0] if c.startswith("frac_")]
    return columns, [tuple(r[c] for c in columns) for r in rows]


def compare_summaries(summaries: Mapping[str, str | Path]) -> dict[str, Any]:
    """Whether every summary.csv of ``summaries`` (label -> path) has the same calls and class shares as the
    first; the differing cells (label, slide, column, first's value, its value) where not."""
    labels = list(summaries)
    if not labels:
        raise ValueError("compare_summaries needs at least one summary")
    columns, reference = summary_signature(summaries[labels[0]])
    differences = []
    for label in labels[1:]:
        other_columns, rows = summary_signature(summaries[label])
        if other_columns != columns or len(rows) != len(reference):
            differences.append({"label": label, "what": f"columns {other_columns} / {len(rows)} rows "
                                f"against {columns} / {len(reference)} rows"})  # fmt: skip
            continue
        for a, b in zip(reference, rows, strict=True):
            for column, x, y in zip(columns, a, b, strict=True):
                if x != y:
                    differences.append({"label": label, "slide": a[0], "column": column, "reference": x,
                                        "value": y})  # fmt: skip
    return {"identical": not differences, "columns": columns, "slides": len(reference),
            "compared": labels, "differences": differences[:20]}  # fmt: skip


# --------------------------------------------------------------------------------------- kill, rerun
def folder_states(out: Path) -> dict[str, Any]:
    """A cohort folder's slide folders: complete (report.json), failed (failed.json), incomplete (a visible
    folder with neither: must never happen) and the hidden work folders of interrupted jobs."""
    complete, failed, incomplete, work = [], [], [], []
    if out.is_dir():
        for sub in sorted(p for p in out.iterdir() if p.is_dir()):
            if PARTIAL in sub.name:
                work.append(sub.name)
            elif sub.name.startswith("."):
                continue  # .cohort: the shard markers
            elif (sub / REPORT_FILE).is_file():
                complete.append(sub.name)
            elif (sub / "failed.json").is_file():
                failed.append(sub.name)
            else:
                incomplete.append(sub.name)
    return {"complete": complete, "failed": failed, "incomplete": incomplete, "work_folders": work}


def kill_and_rerun(
    slides: Path,
    artifact: Path,
    work: Path,
    env: Mapping[str, str],
    n_slides: int,
    kill_after: int,
    threads: int = 1,
    timeout: float = 1800,
) -> dict[str, Any]:
    """One shard (``shards=1``, no launcher) started in its own process group, SIGKILLed (the whole group)
    once ``kill_after`` slides are complete; the folder counted; the same command rerun and counted again."""
    out, cache = work / "cohort", work / "cache"
    first = cohort_command(slides, artifact, out, work / "run-killed", cache, 1, threads, launcher=None)
    if not 0 < kill_after < n_slides:
        raise ValueError(f"kill_after={kill_after} must be between 1 and the slides ({n_slides}) - 1")
    log = open(work / "killed.log", "w")  # noqa: SIM115 - the child writes it until it is killed
    proc = subprocess.Popen(
        first, env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    start = time.perf_counter()
    try:
        # killed once k slides are complete and the next one is being written (its hidden work folder)
        while not _killable(folder_states(out), kill_after):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the shard ended (exit {proc.returncode}) before {kill_after} slides were complete; "
                    f"see {work / 'killed.log'}, or give fewer --kill-after"
                )
            if time.perf_counter() - start > timeout:
                raise RuntimeError(f"{kill_after} slides not complete after {timeout} s")
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    killed_at = time.perf_counter() - start
    before = folder_states(out)
    rerun_dir = work / "run-rerun"
    second = cohort_command(slides, artifact, out, rerun_dir, cache, 1, threads, launcher=None)
    t0 = time.perf_counter()
    done = subprocess.run(second, env=dict(env), capture_output=True, text=True, timeout=timeout)
    rerun_s = time.perf_counter() - t0
    (work / "rerun.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"the rerun failed (exit {done.returncode}); see {work / 'rerun.log'}")
    after = folder_states(out)
    match = SKIPPED_LINE.search(done.stdout)
    record = json.loads((rerun_dir / "metrics.json").read_text()).get("slides") or {}
    skipped = int(match.group(1)) if match else 0
    return {
        "slides": n_slides,
        "killed_after_s": round(killed_at, 2),
        "killed_with_complete": len(before["complete"]),
        "after_kill": {k: len(v) for k, v in before.items()},
        "visible_incomplete_after_kill": before["incomplete"],
        "rerun_skipped_line": match.group(0) if match else None,
        "rerun_skipped": skipped,
        "rerun_processed": int(record.get("n", 0)) - int(record.get("skipped", 0)),
        "rerun_s": round(rerun_s, 2),
        "after_rerun": {k: len(v) for k, v in after.items()},
        "skipped_only_complete": skipped == len(before["complete"]),
        "all_complete_after_rerun": len(after["complete"]) == n_slides
        and not (after["incomplete"] or after["work_folders"] or after["failed"]),
        "summary": str(out / "summary.csv"),
    }


def _killable(states: Mapping[str, list[str]], kill_after: int) -> bool:
    return len(states["complete"]) >= kill_after and bool(states["work_folders"])


# ---------------------------------------------------------------------------------- per-tile costs
def report_costs(cohort: Path, walls: Mapping[str, float]) -> dict[str, float]:
    """Per-tile and per-slide seconds of a single-thread, no-worker cohort run, from its slides' reports:
    reading (tile read + decode + resize: the engine's load busy time), the model (process time), outputs
    (the slide's seconds after the engine: heatmaps, report, GeoJSON; per tile) and tissue (per slide).
    ``walls``: each slide's whole seconds by path (``slide_walls``)."""
    reports = [json.loads(p.read_text()) for p in sorted(cohort.glob(f"*/{REPORT_FILE}"))]
    if not reports:
        raise ValueError(f"{cohort} holds no slide reports")
    whole = {str(Path(p).resolve()): s for p, s in walls.items()}
    seconds = [whole.get(str(Path(r["slide"]).resolve())) for r in reports]
    if None in seconds:
        raise ValueError(f"{cohort}: walls lack some of its slides; give every slide's (slide_walls)")
    tiles = sum(r["timings"]["tiles"] for r in reports)
    load = sum(r["timings"]["load_busy_s"] for r in reports)
    model = sum(r["timings"]["process_s"] for r in reports)
    # a report's own seconds (timings.total) end before its outputs are drawn
    outputs = sum(s - r["timings"]["total"] for s, r in zip(seconds, reports, strict=True))
    tissue = [r["timings"]["tissue_s"] + r["timings"]["tiling_s"] for r in reports]
    return {
        "slides": len(reports),
        "tiles": tiles,
        "read_s_per_tile": load / tiles,
        "model_s_per_tile": model / tiles,
        "outputs_s_per_tile": outputs / tiles,
        "tissue_s_per_slide": statistics.median(tissue),
        "slide_s_median": statistics.median(seconds),
    }


def read_level(target_mpp: float, level_mpps: Sequence[float]) -> float:
    """The microns per pixel of the level a reader decodes for ``target_mpp``: the coarsest level at least
    as fine as the target (the finest when none is), which it then resizes."""
    usable = [m for m in level_mpps if m <= target_mpp * (1 + 1e-6)] or [min(level_mpps)]
    return max(usable)


# -------------------------------------------------------------------------------------- the estimate
@dataclass(frozen=True)
class CohortAssumptions:
    """A 40x cohort: slide size and pyramid, tissue share, cluster nodes and their cores."""

    slides: int = 10_000
    width_px: int = 100_000
    height_px: int = 80_000
    mpp: float = 0.25  # 40x
    level_downsamples: tuple[float, ...] = (1.0, 4.0, 16.0, 64.0)  # Aperio-style
    tissue_share: float = 0.40
    cores_per_node: int = 32
    threads_per_shard: int = 1
    nodes: tuple[int, ...] = (1, 4, 16, 64)
    bytes_per_decoded_px: float = 0.3  # JPEG at about 10:1 of 3 bytes per pixel
    filesystem_gb_s: float = 5.0  # a shared parallel filesystem's aggregate read rate


@dataclass(frozen=True)
class ModelCosts:
    """Measured seconds for one model geometry on one core: reading per tile (on the measured slide, which
    decodes ``measured_decoded_side`` px per side), the model per tile (float and INT8), outputs per tile,
    tissue per slide, and a shard's start-up."""

    name: str
    tile_um: float  # a tile's side in micrometres (tile_size x mpp)
    mpp: float  # the model's resolution
    read_s_per_tile: float
    measured_decoded_side: float
    model_s_per_tile: dict[str, float]  # precision -> seconds
    outputs_s_per_tile: float
    tissue_s_per_slide: float
    startup_s: float = 0.0


def estimate_cohort(costs: ModelCosts, a: CohortAssumptions) -> dict[str, Any]:
    """Wall time and core-hours of ``a.slides`` slides from ``costs``, with every step written out."""
    um_w, um_h = a.width_px * a.mpp, a.height_px * a.mpp
    grid = (um_w / costs.tile_um) * (um_h / costs.tile_um)
    tiles = math.floor(grid * a.tissue_share)
    level_mpps = [a.mpp * d for d in a.level_downsamples]
    level_mpp = read_level(costs.mpp, level_mpps)
    side = costs.tile_um / level_mpp  # pixels decoded per tile side
    read = costs.read_s_per_tile * (side / costs.measured_decoded_side) ** 2  # decode cost ~ pixels
    lines = [
        f"slide {a.width_px:,} x {a.height_px:,} px at {a.mpp} um/px = {um_w:,.0f} x {um_h:,.0f} um; "
        f"tiles of {costs.tile_um:.1f} um: {um_w / costs.tile_um:,.1f} x {um_h / costs.tile_um:,.1f} = "
        f"{grid:,.0f}; x {a.tissue_share:.0%} tissue = {tiles:,} tiles per slide",
        f"reading: the level at {level_mpp:g} um/px for the model's {costs.mpp:.3g}, "
        f"{side:.0f} px decoded per tile side against {costs.measured_decoded_side:.0f} measured: "
        f"{costs.read_s_per_tile * 1e3:.3f} ms x ({side:.0f}/{costs.measured_decoded_side:.0f})^2 = "
        f"{read * 1e3:.3f} ms per tile",
    ]
    per_precision = {}
    for precision, model_s in costs.model_s_per_tile.items():
        per_tile = read + model_s + costs.outputs_s_per_tile
        slide_s = costs.tissue_s_per_slide + tiles * per_tile
        core_h = a.slides * slide_s * a.threads_per_shard / 3600
        lines.append(
            f"{precision}: per tile {read * 1e3:.3f} read + {model_s * 1e3:.3f} model + "
            f"{costs.outputs_s_per_tile * 1e3:.3f} outputs = {per_tile * 1e3:.3f} ms; per slide "
            f"{costs.tissue_s_per_slide:.2f} tissue + {tiles:,} x {per_tile * 1e3:.3f} ms = "
            f"{slide_s:,.1f} s; {a.slides:,} slides x {slide_s:,.1f} s x {a.threads_per_shard} core / 3600 = "
            f"{core_h:,.1f} core-hours"
        )
        walls = {}
        for n in a.nodes:
            shards = n * a.cores_per_node // a.threads_per_shard
            per_shard = math.ceil(a.slides / shards)
            wall_s = per_shard * slide_s + costs.startup_s
            read_gb_s = shards * tiles * side**2 * a.bytes_per_decoded_px / slide_s / 1e9
            bound = read_gb_s > a.filesystem_gb_s
            walls[n] = {"shards": shards, "slides_per_shard": per_shard, "wall_h": wall_s / 3600,
                        "read_gb_s": read_gb_s, "filesystem_bound": bound}  # fmt: skip
            lines.append(
                f"  {n} node(s) x {a.cores_per_node} cores / {a.threads_per_shard} thread = {shards} shards: "
                f"ceil({a.slides:,}/{shards}) = {per_shard} slides x {slide_s:,.1f} s + "
                f"{costs.startup_s:.0f} s start-up = {wall_s / 3600:,.2f} h; reads {read_gb_s:,.2f} GB/s"
                + (
                    f" (above a {a.filesystem_gb_s:g} GB/s filesystem)"
                    if read_gb_s > a.filesystem_gb_s
                    else ""
                )
            )
        per_precision[precision] = {"per_tile_ms": per_tile * 1e3, "slide_s": slide_s, "core_hours": core_h,
                                    "nodes": walls}  # fmt: skip
    return {"model": costs.name, "tiles_per_slide": tiles, "read_ms_per_tile": read * 1e3,
            "costs": asdict(costs), "assumptions": asdict(a), "precisions": per_precision,
            "arithmetic": lines}  # fmt: skip


# ------------------------------------------------------------------------------ in-process measurements
def model_costs(artifact: Path, threads: int = 1, batch: int = 32, repeats: int = 5) -> dict[str, float]:
    """Seconds per tile of an artifact's network, float and dynamic INT8 of the same network (torch.ao, the
    ptq stage's ``quantize_dynamic_int8``), on ``threads`` threads; the two alternate, best of ``repeats``
    (the least disturbed by the rest of the machine). Content does not change a ViT's cost: random tiles."""
    net, meta = load_classifier(artifact)
    nets = {"float": net, "int8": quantize_dynamic_int8(net)}
    size = int(meta["image_size"])
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    best = {name: math.inf for name in nets}
    with model_threads(threads), torch.inference_mode():
        for name in nets:
            nets[name](images[:2])  # warm-up: first-call allocations
        for rep in range(repeats):
            for name in nets if rep % 2 == 0 else reversed(nets):
                start = time.perf_counter()
                torch.softmax(nets[name](images), 1)
                best[name] = min(best[name], (time.perf_counter() - start) / batch)
    return best


def read_costs(
    slide: Path, tile_um: float, mpp: float, image_size: int, tiles: int = 200
) -> dict[str, float]:
    """Seconds per tile to read, decode and resize tissue tiles of ``tile_um`` micrometres at ``mpp`` (the
    engine's ``SlideTiles``, in this process), and the pixels per side it decodes from the slide's level."""
    patch = round(tile_um / mpp)
    with open_slide(slide) as s:
        grid = tile_grid(s, patch, mpp=mpp, tissue=detect_tissue(s), theta=0.5)
        level_mpps = [s.mpp * d for d in s.level_downsamples]
    coords = grid.coords[:tiles]
    spec = TileSpec(str(slide), coords, int(grid.size0), patch, image_size, (0.5,) * 3, (0.25,) * 3)
    dataset = SlideTiles(spec)
    dataset[0]  # opens the slide: not a per-tile cost
    start = time.perf_counter()
    for i in range(len(coords)):
        dataset[i]
    seconds = (time.perf_counter() - start) / len(coords)
    forget_cached(str(slide))
    return {"read_s_per_tile": seconds, "decoded_side": tile_um / read_level(mpp, level_mpps),
            "tiles": len(coords)}  # fmt: skip


def cpu_description() -> dict[str, Any]:
    """The CPU's model name, core count and vector features (lscpu's avx2 / avx512* / amx flags)."""
    info: dict[str, Any] = {"model": None, "cores": os.cpu_count(), "features": []}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            info["model"] = value.strip()
        elif key.strip() == "Flags":
            flags = value.split()
            info["features"] = [f for f in flags if f == "avx2" or f.startswith(("avx512", "amx"))]
    return info


# ------------------------------------------------------------------------------------------- the report
def _fmt(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


def results_markdown(report: Mapping[str, Any]) -> str:
    """The RESULTS.md section of a benchmark report (``scripts/bench_cohort.py``'s JSON)."""
    setup, cpu = report["setup"], report["cpu"]
    scaling, kill = report["scaling"], report["kill_rerun"]
    lines = [
        "## Cohorts in shards (issue 17, `scripts/bench_cohort.py`)",
        "",
        f"{report['date']}, {cpu['model']} ({cpu['cores']} cores; "
        f"{', '.join(cpu['features']) or 'no AVX2'}), an otherwise idle machine. "
        f"Command: `{setup['command']}`.",
        "",
        f"**Method.** {setup['slides']} synthetic slides of {setup['slide_px']:,} x {setup['slide_px']:,} px "
        "(0.5 um/px, lesions and nuisances; `bench_slides.make_slide`), the artifact "
        f"{setup['artifact_desc']}. "
        "Each configuration runs the real CLI, `python -m patholite.slide -m slides=<dir> artifact=<a> "
        "out=<fresh> shards=n shard=0..n-1 hydra/launcher=submitit_local engine.workers=0 engine.threads=1 "
        "logger=none paths.cache_dir=<fresh>` (a fresh cache: every run detects tissue), with "
        f"{', '.join(f'`{v}=1`' for v in THREAD_VARS)}. Wall time is from the launch to the launcher's exit "
        "(the last shard has merged summary.csv); slides/hour = slides / wall. "
        f"{setup['repeats']} repeats, the shard counts in rotating order within each; ratios are to one "
        "shard in the same repeat.",
        "",
        "| shards | slides/h | ratio to 1 shard, wall | ratio, slide processing only | wall s "
        "| slowest shard's slides s | launch to jobs' start s | in the last job, outside slides s "
        "| last job's end to exit s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n, row in scaling["configs"].items():
        r, q = scaling["ratios"][n], scaling["processing_ratios"][n]
        t = {
            k: _fmt(row.get(f"{k}_median", math.nan), 1)
            for k in ("start_s", "last_start_s", "in_job_s", "tail_s")
        }
        lines.append(
            f"| {n} | {_fmt(row['slides_per_hour_median'], 0)} | **{_fmt(r['median'])}x** "
            f"({_fmt(r['min'])}-{_fmt(r['max'])}) | {_fmt(q['median'])}x ({_fmt(q['min'])}-{_fmt(q['max'])}) "
            f"| {_fmt(row['wall_s_median'], 1)} | {_fmt(row['slowest_shard_slide_s_median'], 1)} "
            f"| {t['start_s']}-{t['last_start_s']} | {t['in_job_s']} | {t['tail_s']} |"
        )
    lines += ["", "Medians over the repeats; ratios: median (min-max) over the repeats."]
    target = scaling["ratios"].get(2) or scaling["ratios"].get("2")
    processing = scaling["processing_ratios"].get(2) or scaling["processing_ratios"].get("2")
    summaries = report["summaries"]
    lines += [
        "",
        f"- **Scaling.** Two shards: **{_fmt(target['median'])}x** one shard (target 1.8x: "
        f"{'met' if target['median'] >= 1.8 else 'missed'}); the slide processing alone (the slowest "
        f"shard's slide seconds) scales {_fmt(processing['median'])}x. {scaling['note']}",
        f"- **Identical summaries.** {'Identical' if summaries['identical'] else 'NOT identical'} for "
        f"{', '.join(summaries['compared'])} ({summaries['slides']} slides; columns compared: "
        f"{', '.join(f'`{c}`' for c in summaries['columns'])}; not `tiles_per_s` and `seconds`, which are "
        "timings).",
        f"- **Kill and rerun.** One shard (`shards=1`, no launcher) killed with SIGKILL to its process group "
        f"after {kill['killed_after_s']:.0f} s, with {kill['killed_with_complete']} of {kill['slides']} "
        f"slides complete: {kill['after_kill']['complete']} complete folders, "
        f"{kill['after_kill']['incomplete']} "
        f"visible incomplete folders, {kill['after_kill']['work_folders']} hidden `.<slide>.partial-*` work "
        f"folder(s). The same command again printed `{kill['rerun_skipped_line']}` and processed "
        f"{kill['rerun_processed']} slides; after it: {kill['after_rerun']['complete']} complete, "
        f"{kill['after_rerun']['incomplete']} incomplete, {kill['after_rerun']['work_folders']} work folders "
        f"(every slide complete: {'yes' if kill['all_complete_after_rerun'] else 'NO'}).",
        "",
        "**Measured per-tile costs** (one core):",
        "",
        "| model | tile | read ms/tile | model float ms/tile | model INT8 ms/tile | outputs ms/tile "
        "| tissue s/slide | source |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for est in report["estimates"]:
        c = est["costs"]
        ms = [c["read_s_per_tile"], c["model_s_per_tile"]["float"], c["model_s_per_tile"]["int8"]]
        ms.append(c["outputs_s_per_tile"])
        cells = " | ".join(_fmt(v * 1e3, 3) for v in ms)
        lines.append(
            f"| {c['name']} | {c['tile_um']:.0f} um at {c['mpp']:.3g} um/px | {cells} "
            f"| {_fmt(c['tissue_s_per_slide'])} | {est['source']} |"
        )
    a = report["estimates"][0]["assumptions"]
    lines += [
        "",
        f"**10,000 slides of 40x.** Assumptions: {a['width_px']:,} x {a['height_px']:,} px at {a['mpp']} "
        "um/px, "
        f"pyramid downsamples {', '.join(f'{d:g}' for d in a['level_downsamples'])}, {a['tissue_share']:.0%} "
        f"tissue; nodes of C = {a['cores_per_node']} cores, shards = nodes x C / {a['threads_per_shard']} "
        "thread; a tile's read cost scales with the pixels decoded (the level the reader picks), the model's "
        "with nothing on the slide; tissue detection reads a fixed-size low-resolution level, so its "
        "measured per-slide cost is kept; outputs (heatmaps, GeoJSON, report) per tile as measured; per "
        "shard one start-up (the measured 1-shard overhead). Reading is assumed to scale per core: on a "
        f"shared filesystem it stops where the cohort's read rate reaches its bandwidth (taken as "
        f"{a['filesystem_gb_s']:g} GB/s at {a['bytes_per_decoded_px']} bytes per decoded pixel, JPEG ~10:1).",
        "",
    ]
    for est in report["estimates"]:
        lines += [f"*{est['model']}* ({est['source']}):", "", "```", *est["arithmetic"], "```", ""]
    lines += [
        "| model | precision | s/slide | core-hours | wall h at N = "
        + ", ".join(str(n) for n in a["nodes"])
        + " nodes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for est in report["estimates"]:
        for precision, p in est["precisions"].items():
            walls = ", ".join(
                _fmt(v["wall_h"]) + (" (fs)" if v["filesystem_bound"] else "") for v in p["nodes"].values()
            )
            lines.append(
                f"| {est['model']} | {precision} | {_fmt(p['slide_s'], 1)} | {_fmt(p['core_hours'], 0)} "
                f"| {walls} |"
            )
    lines += ["", *report.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"
