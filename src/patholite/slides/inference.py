"""A tile classifier over whole slides: open, find tissue, tile (cached), stream the tiles through the model,
report. ``run_tile_slides`` does it for many slides with one loaded model (``slides.cohort``); an SMT
artifact is run by ``slides.smt_inference`` instead (``slides.run`` picks).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from patholite.artifacts.load import load_artifact
from patholite.artifacts.sidecar import is_smt_artifact, read_sidecar
from patholite.errors import CheckpointError, ConfigError, SlideError
from patholite.slides.cohort import Cohort, available_cores, check_slide_artifact, each_slide, model_threads
from patholite.slides.engine import TileSpec, stream_tiles
from patholite.slides.qupath import write_qupath_outputs
from patholite.slides.report import CallRule, SlideResult, check_rule, write_slide_outputs
from patholite.wsi.annotations import (
    BACH_CLASS_MAP,
    CAMELYON16_CLASS_MAP,
    EXCLUSION,
    check_fits,
    find_annotation,
    rasterize,
    read_annotations,
)
from patholite.wsi.cache import slide_cache_dir, tissue_for
from patholite.wsi.reader import open_slide
from patholite.wsi.tiling import TileGrid, cached_tiles, check_request
from patholite.wsi.tissue import TissueMask

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- artifact
def load_classifier(directory: Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The artifact's model, checked to produce one score per class its sidecar names."""
    sidecar = read_sidecar(directory)
    check_slide_artifact(directory, sidecar)
    if is_smt_artifact(sidecar):
        raise CheckpointError(
            f"artifact {directory} is an SMT slide-level model, not a tile classifier; run it with mode=smt "
            "(or mode=auto)"
        )
    if sidecar.get("slide_model"):
        raise CheckpointError(f"artifact {directory} is a slide-level model, not a tile classifier")
    model, meta = load_artifact(directory)
    if device != "cpu":
        if meta["kind"] != "torch_float":
            raise ConfigError(f"artifact {directory} ({meta['kind']}) runs on the CPU: use engine.device=cpu")
        model = model.to(device)
    size = int(meta["image_size"])
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, size, size, device=device))
    n = len(meta["class_names"])
    if out.ndim != 2 or out.shape[1] != n:
        raise CheckpointError(
            f"artifact {directory} outputs {tuple(out.shape)} scores but its sidecar names {n} classes "
            f"{meta['class_names']}; the artifact is inconsistent, export it again"
        )
    return model.eval(), meta


@dataclass
class TileGeometry:
    patch_size: int  # px at the target resolution
    mpp: float | None
    magnification: float | None


def tile_geometry(tile_cfg, meta: dict[str, Any], directory: Path) -> TileGeometry:
    """The tile size and resolution: the config's, else those the artifact was trained on."""
    size = tile_cfg.size or meta.get("tile_size") or meta["image_size"]
    if tile_cfg.mpp is not None and tile_cfg.magnification is not None:
        raise ConfigError("set tile.mpp or tile.magnification, not both")
    mpp = tile_cfg.mpp
    if mpp is None and tile_cfg.magnification is None:
        mpp = meta.get("mpp")
        if mpp is None:
            raise ConfigError(
                f"artifact {directory} does not record the resolution it was trained at (no mpp in its "
                f"sidecar; dataset={meta.get('dataset')}); set tile.mpp=<um/px> or tile.magnification=<x>"
            )
    return TileGeometry(int(size), None if mpp is None else float(mpp), tile_cfg.magnification)


def annotation_path(cfg, slide_path: Path) -> Path | None:
    """The slide's annotation file (ASAP / ImageScope XML or QuPath GeoJSON): ``annotations`` as a file (one
    slide) or a folder of ``<stem>.xml|.geojson|.json``; with neither, such a file beside the slide."""
    if cfg.annotations:
        source = Path(cfg.annotations).expanduser()
        if source.is_file():
            return source
        if not source.is_dir():
            raise ConfigError(f"annotations={source} does not exist")
        return find_annotation(source, slide_path.stem)
    return find_annotation(slide_path.parent, slide_path.stem)


def annotation_classes(cfg, class_names: list[str]) -> dict[str, str]:
    """XML group -> class: the model's class names themselves, the CAMELYON16 and BACH groups whose class
    the model predicts, then ``annotation_classes`` (the user's word wins)."""
    known = {**CAMELYON16_CLASS_MAP, **BACH_CLASS_MAP}
    mapping = {group: c for group, c in known.items() if c in class_names or c == EXCLUSION}
    return {**mapping, **{c: c for c in class_names}, **dict(cfg.annotation_classes)}


def annotation_map(cfg, slide, class_names: list[str], downsample: float):
    """The slide's annotations rasterised at ``downsample`` (class index, 255 unlabelled), or None.

    Annotations only draw the report's map. An XML found beside the slide that does not fit the model's
    classes is left out with a warning; one named by ``annotations=`` must fit (its error says how)."""
    path = annotation_path(cfg, slide.path)
    if path is None:
        return None

    try:
        annotations = read_annotations(path, class_map=annotation_classes(cfg, class_names))
        check_fits(annotations, slide.dimensions, path)
        labels, _ = rasterize(annotations, class_names, slide.dimensions, downsample, background=None)
    except SlideError as err:
        if cfg.annotations:
            raise
        log.warning("annotations %s beside the slide are not drawn: %s", path, err)
        return None
    return labels


# ---------------------------------------------------------------------------------------- one slide
def tile_block(geometry: TileGeometry, grid, cfg, mpp: float | None) -> dict[str, Any]:
    """The tile geometry a slide report records (``mpp``: the tiles' microns per pixel as used)."""
    return {
        "patch_size": geometry.patch_size,
        "mpp": mpp,
        "magnification": geometry.magnification,
        "patch_level": grid.patch_level,
        "downsample": grid.downsample,
        "size0": int(grid.size0),
        "overlap": cfg.tile.overlap,
        "theta": cfg.tile.theta,
    }


def tile_spec(path: Path, grid, geometry: TileGeometry, meta: dict[str, Any], mpp, backend: str) -> TileSpec:
    """What the engine's loader workers need to read one slide's tiles for the artifact ``meta``."""
    return TileSpec(
        path=str(path),
        coords=grid.coords,
        size0=int(grid.size0),
        patch_size=geometry.patch_size,
        image_size=int(meta["image_size"]),
        mean=tuple(meta.get("mean") or (0.485, 0.456, 0.406)),
        std=tuple(meta.get("std") or (0.229, 0.224, 0.225)),
        mpp=mpp,
        backend=backend,
    )


def tissue_and_grid(slide, path: Path, cfg, geometry: TileGeometry) -> tuple[TissueMask, TileGrid, dict]:
    """The open slide's tissue mask and tile grid, through the per-slide cache (``paths.cache_dir/slides``),
    with the seconds each took (``tissue_s``, ``tiling_s``)."""
    cache = slide_cache_dir(Path(cfg.paths.cache_dir) / "slides", path, cfg)
    t0 = time.perf_counter()
    tissue = tissue_for(slide, cfg, cache)
    t1 = time.perf_counter()
    grid = cached_tiles(
        slide,
        cache / f"tiles-{geometry.patch_size}-{geometry.mpp}-{geometry.magnification}.h5",
        patch_size=geometry.patch_size,
        mpp=geometry.mpp,
        magnification=geometry.magnification,
        overlap=cfg.tile.overlap,
        tissue=tissue,
        theta=cfg.tile.theta,
    )
    return tissue, grid, {"tissue_s": t1 - t0, "tiling_s": time.perf_counter() - t1}


def process_slide(path: Path, cfg, model: nn.Module, meta: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Every output of one slide into ``out_dir``; returns its report."""
    start = time.perf_counter()
    class_names = list(meta["class_names"])
    geometry = tile_geometry(cfg.tile, meta, Path(meta["_directory"]))
    with open_slide(path, mpp=cfg.reader.mpp, backend=cfg.reader.backend) as slide:
        tissue, grid, grid_timings = tissue_and_grid(slide, path, cfg, geometry)
        thumbnail, thumb_ds = slide.thumbnail(cfg.report.thumbnail_px)
        annotations = annotation_map(cfg, slide, class_names, thumb_ds)
        describe = slide.describe()
        dimensions = tuple(int(v) for v in slide.dimensions)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = tile_spec(path, grid, geometry, meta, cfg.reader.mpp, cfg.reader.backend)
    e = cfg.engine
    extra = {} if grid.tissue_fraction is None else {"tissue_fraction": grid.tissue_fraction}
    stream = stream_tiles(
        model, spec, class_names, out_dir / "tiles.csv", e.batch_size, e.workers, e.prefetch, e.device, extra
    )
    timings = {**grid_timings, **stream.timings}
    timings["total"] = time.perf_counter() - start
    result = SlideResult(
        slide=str(path),
        class_names=class_names,
        coords=grid.coords,
        size0=int(grid.size0),
        probs=stream.probs,
        tissue_fraction=grid.tissue_fraction,
        thumbnail=thumbnail,
        thumb_downsample=thumb_ds,
        tissue_mask=tissue.mask,
        mask_downsample=tissue.downsample,
        annotation_map=annotations,
        annotation_downsample=thumb_ds if annotations is not None else None,
        timings=timings,
        dimensions=dimensions,
        extra={
            "artifact": meta["_directory"],
            "artifact_kind": meta["kind"],
            "tile": tile_block(geometry, grid, cfg, geometry.mpp),
            "slide": describe,
            "tiles_file": "tiles.csv",
        },
    )
    rule = _call_rule(cfg)
    check_rule(rule, class_names)
    qupath = write_qupath_outputs(result, out_dir)  # before report.json, which lists them and comes last
    return write_slide_outputs(result, out_dir, rule, qupath)


def _call_rule(cfg):
    severity = None if cfg.report.severity is None else list(cfg.report.severity)
    return CallRule(severity=severity, min_share=cfg.report.min_share)


def tile_threads(cfg) -> int:
    """The model's threads in tile mode: ``engine.threads``, else the cores the loader workers leave."""
    return cfg.engine.threads or max(1, available_cores() - cfg.engine.workers)


def prepare_tile_slides(cfg, directory: Path) -> Callable[[Path, Path], dict[str, Any]]:
    """Tile mode's set-up: the artifact's classifier loaded and the settings that would fail every slide
    checked, once, before any slide is read. Returns one slide's ``process(path, out) -> report``, run in
    this process or in a supervised worker (``slides.supervise``)."""
    model, meta = load_classifier(directory, cfg.engine.device)
    meta["_directory"] = str(directory)
    check_rule(_call_rule(cfg), meta["class_names"])
    geometry = tile_geometry(cfg.tile, meta, directory)
    t = cfg.tile
    check_request(geometry.patch_size, geometry.mpp, geometry.magnification, t.overlap, t.theta)
    # process_slide is looked up per slide (tests replace it)
    return lambda path, out: process_slide(path, cfg, model, meta, out)


def run_tile_slides(
    paths: list[Path], cfg, out_dir: Path, directory: Path, *, cohort: Cohort | None = None
) -> list[dict[str, Any]]:
    """Every slide through the tile classifier of the artifact ``directory``: tissue, tiles, pipelined
    inference, report; the cohort's summary and failure policy (``slides.cohort.each_slide``)."""
    with model_threads(tile_threads(cfg)):
        return each_slide(paths, cfg, out_dir, prepare_tile_slides(cfg, directory), cohort=cohort)
