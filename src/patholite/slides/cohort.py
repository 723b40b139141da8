"""Many slides through one loaded model: a row per slide in one summary, failures as rows (with ``slides=``)
or raised (with ``slide=``), and the model's threads set for the run and restored after."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from patholite.errors import CheckpointError, PatholiteError
from patholite.progress import Progress
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


def each_slide(
    paths: list[Path], cfg, out_dir: Path, process: Callable[[Path, Path], dict[str, Any]]
) -> list[dict[str, Any]]:
    """``process(path, out_dir / <name>)`` for every slide, then summary.csv/.md. With ``slides=`` (many), a
    slide's failure of any kind is a failed row and the others go on; with ``slide=`` (one), it is raised."""
    many = not cfg.slide
    rows = []
    # slides done, tiles per second over them, time left (an SMT walk reads regions, not tiles: counts none)
    with Progress("slides", len(paths), "slides", rate_of="tiles") as progress:
        for path, name in zip(paths, _unique_names(paths), strict=True):
            log.info("slide %s", path)
            start = time.perf_counter()
            try:
                report = process(path, out_dir / name)
                rows.append({"slide": str(path), "status": "ok", "out": str(out_dir / name), **report})
            except Exception as err:
                if not many:
                    raise
                if isinstance(err, PatholiteError):
                    log.error("slide %s failed: %s", path, err)
                else:  # a bug or an environment failure: keep its traceback in the log
                    log.exception("slide %s failed", path)
                rows.append(failed_row(path, err))
            rows[-1]["seconds"] = time.perf_counter() - start
            failed = int(rows[-1]["status"] != "ok")
            progress.advance(1, tiles=int(rows[-1].get("n_tiles") or 0), failed=failed)
    write_summary(rows, out_dir)
    return rows


def _unique_names(paths: list[Path]) -> list[str]:
    """Output folder names: slide stems, made unique where two folders hold slides of the same name."""
    stems = [p.stem for p in paths]
    return [s if stems.count(s) == 1 else f"{s}-{i}" for i, s in enumerate(stems)]
