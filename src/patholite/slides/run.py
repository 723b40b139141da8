"""``python -m patholite.slide``'s work: resolve the artifact, pick the walk it needs (tiles or SMT), run
every slide through it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from patholite.artifacts.resolve import resolve_artifact
from patholite.artifacts.sidecar import is_smt_artifact, read_sidecar
from patholite.errors import CheckpointError, ConfigError
from patholite.slides.cohort import check_slide_artifact
from patholite.slides.inference import run_tile_slides
from patholite.slides.smt_inference import run_smt_slides

MODES = ("auto", "tiles", "smt")


def slide_mode(mode: str, meta: dict[str, Any], directory: Path) -> str:
    """``tiles`` or ``smt``: what ``mode`` (auto | tiles | smt) means for the artifact ``meta`` describes."""
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r}: use auto (by the artifact), tiles or smt")
    check_slide_artifact(directory, meta)
    smt = is_smt_artifact(meta)
    if mode == "auto":
        return "smt" if smt else "tiles"
    if mode == "smt" and not smt:
        raise CheckpointError(
            f"artifact {directory} is a tile classifier, not an SMT slide model; use mode=tiles or an "
            "artifact of a model=smt run"
        )
    return mode


def run_slides(paths: list[Path], cfg, out_dir: Path, directory: Path | None = None) -> list[dict[str, Any]]:
    """Every slide through one loaded model: a tile classifier (tiling) or an SMT slide model (its focusing
    walk), as ``mode`` and the artifact say (``directory``: the artifact folder, default resolved from
    ``cfg.artifact``). With ``slides=`` (many), a slide's failure of any kind is a failed summary row and
    the others go on; with ``slide=`` (one), its error is raised."""
    directory = directory or resolve_artifact(cfg.artifact, cfg.artifact_name)
    mode = slide_mode(str(cfg.get("mode", "auto")), read_sidecar(directory), directory)
    if mode == "smt":
        return run_smt_slides(paths, cfg, out_dir, directory=directory)
    return run_tile_slides(paths, cfg, out_dir, directory)
