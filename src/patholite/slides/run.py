"""``python -m patholite.slide``'s work: resolve the artifact, pick the walk it needs (tiles, SMT, or the
tiles' embeddings), run every slide through it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from patholite.artifacts.resolve import resolve_artifact
from patholite.artifacts.sidecar import is_smt_artifact, read_sidecar
from patholite.errors import CheckpointError, ConfigError
from patholite.models.encoder import is_encoder_meta
from patholite.slides.cohort import check_slide_artifact
from patholite.slides.extract import check_feature_artifact, run_feature_slides
from patholite.slides.inference import run_tile_slides
from patholite.slides.smt_inference import run_smt_slides

MODES = ("auto", "tiles", "smt", "features")


def slide_mode(mode: str, meta: dict[str, Any], directory: Path) -> str:
    """``tiles``, ``smt`` or ``features``: what ``mode`` (auto | tiles | smt | features) means for the
    artifact ``meta`` describes (auto: an SMT model walks, an encoder embeds, a tile classifier
    classifies); an artifact the mode cannot run is refused here, from its sidecar, before any slide is
    read."""
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r}: use auto (by the artifact), tiles, smt or features")
    check_slide_artifact(directory, meta)
    smt = is_smt_artifact(meta)
    if mode == "auto":
        return "smt" if smt else "features" if is_encoder_meta(meta) else "tiles"
    if mode == "features":
        check_feature_artifact(directory, meta)
        return mode
    if is_encoder_meta(meta):
        raise CheckpointError(
            f"artifact {directory} is an encoder: it returns embeddings, not classes; run it with "
            "mode=features"
        )
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
    if mode == "features":
        return run_feature_slides(paths, cfg, out_dir, directory)
    return run_tile_slides(paths, cfg, out_dir, directory)
