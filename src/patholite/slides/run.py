"""``python -m patholite.slide``'s work: resolve the artifact, pick the walk it needs (tiles, SMT, or the
tiles' embeddings), run every slide through it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from patholite.artifacts.resolve import resolve_artifact
from patholite.artifacts.sidecar import is_smt_artifact, read_sidecar
from patholite.errors import CheckpointError, ConfigError
from patholite.models.encoder import is_encoder_meta
from patholite.slides.cohort import Cohort, check_slide_artifact, each_slide
from patholite.slides.extract import (
    check_feature_artifact,
    feature_threads,
    prepare_feature_slides,
    run_feature_slides,
)
from patholite.slides.inference import prepare_tile_slides, run_tile_slides, tile_threads
from patholite.slides.smt_inference import prepare_smt_slides, run_smt_slides, smt_threads
from patholite.slides.supervise import Supervisor, limits_set

MODES = ("auto", "tiles", "smt", "features")
# each mode's model threads and its set-up (the model loaded once; returns one slide's process)
PREPARE: dict[str, tuple[Callable[[Any], int], Callable[[Any, Path], Callable]]] = {
    "tiles": (tile_threads, prepare_tile_slides),
    "smt": (smt_threads, prepare_smt_slides),
    "features": (feature_threads, prepare_feature_slides),
}


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


def run_slides(
    paths: list[Path], cfg, out_dir: Path, directory: Path | None = None, *, cohort: Cohort | None = None
) -> list[dict[str, Any]]:
    """Every slide through one loaded model: a tile classifier (tiling) or an SMT slide model (its focusing
    walk), as ``mode`` and the artifact say (``directory``: the artifact folder, default resolved from
    ``cfg.artifact``). With ``slides=`` (many), a slide's failure of any kind is a failed summary row and
    the others go on; with ``slide=`` (one), its error is raised. With ``limits`` set, a supervised worker
    process runs the slides (``slides.supervise``): a slide past a limit is a failed row too."""
    directory = directory or resolve_artifact(cfg.artifact, cfg.artifact_name)
    mode = slide_mode(str(cfg.get("mode", "auto")), read_sidecar(directory), directory)
    if limits_set(cfg.get("limits")):
        # the worker loads the model (its errors raised here, before any slide) and the supervisor is
        # each slide's process
        with Supervisor(ModeSetup(mode), cfg, directory, cfg.limits) as process:
            return each_slide(paths, cfg, out_dir, process, cohort=cohort)
    if mode == "smt":
        return run_smt_slides(paths, cfg, out_dir, directory=directory, cohort=cohort)
    if mode == "features":
        return run_feature_slides(paths, cfg, out_dir, directory, cohort=cohort)
    return run_tile_slides(paths, cfg, out_dir, directory, cohort=cohort)


@dataclass(frozen=True)
class ModeSetup:
    """A mode's set-up as the supervised worker runs it: picklable (the worker imports this module and
    looks the mode up), it sets the model threads as the run's own process would, then loads the model."""

    mode: str

    def __call__(self, cfg, directory: Path) -> Callable[[Path, Path], dict[str, Any]]:
        threads, prepare = PREPARE[self.mode]
        torch.set_num_threads(max(1, int(threads(cfg))))  # for the worker's life: nothing to restore
        return prepare(cfg, directory)
