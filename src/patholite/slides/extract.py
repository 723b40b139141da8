"""``mode=features``: every tissue tile of every slide through an embedder, one feature file per slide.

The embedder is an encoder artifact of any kind (float, torch INT8, ONNX Runtime: its forward returns the
embedding), or a tile classifier's pre-logits embedding (``slides.baselines.EmbeddingTap``: torch float or
dynamic INT8 only, ONNX and QAT expose no head). Tiles stream through the engine of tile mode
(``slides.engine.stream_tiles`` with ``embed=True``); each slide gets ``tiles.csv`` (tiles without class
columns), ``features.h5`` (``slides.features``: its layout) and ``report.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from patholite.artifacts import int8_dynamic, torch_float
from patholite.artifacts.load import load_artifact
from patholite.artifacts.sidecar import is_smt_artifact, read_sidecar
from patholite.errors import CheckpointError, ConfigError
from patholite.io import write_json
from patholite.models.encoder import ENCODER_KEY, is_encoder_meta
from patholite.slides.baselines import EmbeddingTap
from patholite.slides.cohort import Cohort, available_cores, check_slide_artifact, each_slide, model_threads
from patholite.slides.engine import stream_tiles
from patholite.slides.features import FEATURES_FILE, write_features
from patholite.slides.inference import (
    load_classifier,
    tile_block,
    tile_geometry,
    tile_spec,
    tissue_and_grid,
)
from patholite.wsi.reader import open_slide
from patholite.wsi.tiling import check_request

# classifier kinds whose pre-logits can be caught (a torch module with timm's head)
TAPPABLE = (torch_float.KIND, int8_dynamic.KIND)


def check_feature_artifact(directory: Path, meta: dict[str, Any]) -> None:
    """Refuse, from the sidecar alone, artifacts that give no tile embedding (before any slide is read)."""
    check_slide_artifact(directory, meta)
    if is_smt_artifact(meta) or meta.get("slide_model"):
        raise CheckpointError(
            f"artifact {directory} is a slide-level model, which reads regions, not tiles: it has no tile "
            "features; for mode=features give an encoder or a tile classifier artifact (SMT: mode=smt)"
        )
    kind = meta.get("kind")
    if not is_encoder_meta(meta) and kind not in TAPPABLE:
        raise CheckpointError(
            f"artifact {directory} is a {kind} tile classifier, whose pre-logits embedding cannot be taken "
            "(ONNX and QAT artifacts expose no classifier head): for mode=features use a torch float or "
            "dynamic-INT8 artifact of it, or an encoder artifact"
        )


class PreLogits(nn.Module):
    """A tile classifier read for its embedding: the input of its classifier head (``EmbeddingTap``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.tap = EmbeddingTap(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tap(x)[1]


@dataclass
class Embedder:
    model: nn.Module  # images (B, 3, S, S) -> embeddings (B, D)
    meta: dict[str, Any]  # the artifact's sidecar, with its folder as ``_directory``
    embed_dim: int
    encoder: bool  # an encoder artifact (else a classifier's pre-logits)


def load_embedder(directory: Path, device: str = "cpu") -> Embedder:
    """The artifact's model as an embedder, checked to return one embedding of a fixed width per image."""
    sidecar = read_sidecar(directory)
    check_feature_artifact(directory, sidecar)
    encoder = is_encoder_meta(sidecar)
    if encoder:
        model, meta = load_artifact(directory)
        if device != "cpu":
            if meta["kind"] != torch_float.KIND:
                raise ConfigError(
                    f"artifact {directory} ({meta['kind']}) runs on the CPU: use engine.device=cpu"
                )
            model = model.to(device)
    else:
        model, meta = load_classifier(directory, device)
        model = PreLogits(model)
    size = int(meta["image_size"])
    with torch.inference_mode():
        out = model(torch.zeros(2, 3, size, size, device=device))
    if isinstance(out, tuple) or out.ndim != 2 or out.shape[0] != 2:
        shape = [tuple(o.shape) for o in out] if isinstance(out, tuple) else tuple(out.shape)
        raise CheckpointError(f"artifact {directory} returns {shape} for 2 images, not one embedding each")
    width = int(out.shape[1])
    declared = (meta.get(ENCODER_KEY) or {}).get("embed_dim") if encoder else None
    if declared is not None and int(declared) != width:
        raise CheckpointError(
            f"artifact {directory} returns {width}-wide embeddings but its sidecar says "
            f"embed_dim={declared}; the artifact is inconsistent, export it again"
        )
    meta["_directory"] = str(directory)
    return Embedder(model.eval(), meta, width, encoder)


def process_feature_slide(path: Path, cfg, embedder: Embedder, out_dir: Path) -> dict[str, Any]:
    """One slide's ``tiles.csv``, ``features.h5`` and ``report.json`` into ``out_dir``; returns its report."""
    start = time.perf_counter()
    meta = embedder.meta
    geometry = tile_geometry(cfg.tile, meta, Path(meta["_directory"]))
    with open_slide(path, mpp=cfg.reader.mpp, backend=cfg.reader.backend) as slide:
        _, grid, grid_timings = tissue_and_grid(slide, path, cfg, geometry)
        describe = slide.describe()
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = tile_spec(path, grid, geometry, meta, cfg.reader.mpp, cfg.reader.backend)
    e = cfg.engine
    extra = {} if grid.tissue_fraction is None else {"tissue_fraction": grid.tissue_fraction}
    csv_path = out_dir / "tiles.csv"
    stream = stream_tiles(
        embedder.model, spec, [], csv_path, e.batch_size, e.workers, e.prefetch, e.device, extra, embed=True
    )
    features = stream.embeddings
    if features is None:  # a grid with no tile: an empty bag of the embedder's width
        features = np.zeros((0, embedder.embed_dim), np.float32)
    mpp = grid.mpp if grid.mpp is not None else geometry.mpp
    model_name = (meta.get("model") or {}).get("name")
    write_features(
        out_dir / FEATURES_FILE,
        features,
        grid.coords,
        {
            "slide": path.stem,
            "slide_path": str(path),
            "patch_size": int(grid.size0),
            "patch_level": 0,
            "mpp": None if mpp is None else float(mpp),
            "tile_px": int(meta["image_size"]),
            "artifact": meta["_directory"],
            "artifact_kind": meta["kind"],
            "model": model_name or "",
            "encoder": embedder.encoder,
        },
    )
    timings = {**grid_timings, **stream.timings, "total": time.perf_counter() - start}
    report = {
        "slide": str(path),
        "status": "ok",
        "mode": "features",
        "n_tiles": int(len(grid)),
        "embed_dim": embedder.embed_dim,
        "encoder": embedder.encoder,
        "tile_size0": int(grid.size0),
        "seconds": timings["total"],
        # the engine's rate: tiles over the stream's wall time (reading and the model, overlapped)
        "tiles_per_s": stream.timings["tiles_per_s"],
        "timings": timings,
        "extra": {
            "artifact": meta["_directory"],
            "artifact_kind": meta["kind"],
            "model": model_name,
            "tile": tile_block(geometry, grid, cfg, mpp),
            "slide": describe,
        },
        "out_dir": str(out_dir),
        "files": {"features": FEATURES_FILE, "tiles": "tiles.csv"},
    }
    write_json(out_dir / "report.json", report)
    return report


def feature_threads(cfg) -> int:
    """The model's threads in feature mode: as tile mode's (the same engine)."""
    return cfg.engine.threads or max(1, available_cores() - cfg.engine.workers)


def prepare_feature_slides(cfg, directory: Path) -> Callable[[Path, Path], dict[str, Any]]:
    """Feature mode's set-up: the artifact's embedder loaded (and refused when it gives no embedding) and
    the tile request checked, once, before any slide is read. Returns one slide's ``process(path, out) ->
    report``, run in this process or in a supervised worker (``slides.supervise``)."""
    embedder = load_embedder(directory, cfg.engine.device)
    geometry = tile_geometry(cfg.tile, embedder.meta, directory)
    t = cfg.tile
    check_request(geometry.patch_size, geometry.mpp, geometry.magnification, t.overlap, t.theta)
    # process_feature_slide is looked up per slide (tests may replace it)
    return lambda path, out: process_feature_slide(path, cfg, embedder, out)


def run_feature_slides(
    paths: list[Path], cfg, out_dir: Path, directory: Path, *, cohort: Cohort | None = None
) -> list[dict[str, Any]]:
    """Every slide's feature file through the embedder of the artifact ``directory``; the cohort's summary
    and failure policy (``slides.cohort.each_slide``)."""
    with model_threads(feature_threads(cfg)):
        return each_slide(paths, cfg, out_dir, prepare_feature_slides(cfg, directory), cohort=cohort)
