"""One slide, end to end: open, find tissue, tile (cached), stream the tiles through the model, report.

``run_slides`` does it for many slides with one loaded model; a slide that fails is a failed row of the
summary and the others go on. An SMT artifact is run by ``slides.smt_inference`` instead (``mode``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from patholite.errors import CheckpointError, ConfigError, PatholiteError, SlideError
from patholite.measure.artifacts import SIDECAR, load_artifact, read_sidecar
from patholite.slides.cache import slide_cache_dir, tissue_for
from patholite.slides.engine import TileSpec, stream_tiles

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- artifact
def resolve_artifact(path: str | Path, name: str | None = None) -> Path:
    """The artifact folder ``path`` names: an artifact folder or one of its files, or a run folder (its
    ``name`` artifact, else the last artifact its record lists that has a sidecar)."""
    path = Path(path).expanduser()
    if path.is_file():
        path = path.parent
    if (path / SIDECAR).is_file():
        if name is not None:
            raise ConfigError(
                f"artifact={path} is an artifact folder; artifact_name={name} picks an artifact of a run "
                "folder: give the run folder, or leave artifact_name out"
            )
        return path
    if not path.is_dir():
        raise CheckpointError(f"artifact={path} does not exist; give an artifact folder or a run folder")
    from patholite.measure.records import RECORD_FILE, read_record

    if not (path / RECORD_FILE).is_file():
        raise CheckpointError(
            f"artifact={path} is neither an artifact ({SIDECAR} missing) nor a run folder ({RECORD_FILE} "
            "missing)"
        )
    artifacts = [a for a in read_record(path).get("artifacts", []) if (Path(a["path"]) / SIDECAR).is_file()]
    if name is not None:
        artifacts = [a for a in artifacts if a["name"] == name]
    if not artifacts:
        which = f"named {name!r} " if name else ""
        raise CheckpointError(f"run {path} has no artifact {which}on disk; see its metrics.json")
    return Path(artifacts[-1]["path"])


MODES = ("auto", "tiles", "smt")


def is_smt_artifact(meta: dict[str, Any]) -> bool:
    """Whether a sidecar describes an SMT slide model (a ``model=smt`` run's artifact)."""
    return (meta.get("model") or {}).get("family") == "smt"


def check_slide_artifact(directory: Path, meta: dict[str, Any]) -> None:
    """Refuse, from the sidecar alone, artifacts the slide CLI cannot run at all (MIL bags)."""
    if meta.get("kind") == "mil":
        raise CheckpointError(
            f"artifact {directory} is a gated-attention MIL slide model: its bags are built from a tile "
            "classifier's embeddings, so the slide CLI does not run it; run it with scripts/bench_smt.py, or "
            "give the slide CLI a tile classifier or an SMT artifact"
        )


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
    """The slide's annotation XML: ``annotations`` as a file (one slide) or a folder of ``<stem>.xml``;
    with neither, an XML beside the slide."""
    if cfg.annotations:
        source = Path(cfg.annotations).expanduser()
        if source.is_file():
            return source
        if not source.is_dir():
            raise ConfigError(f"annotations={source} does not exist")
        candidate = source / f"{slide_path.stem}.xml"
        return candidate if candidate.is_file() else None
    beside = slide_path.with_suffix(".xml")
    return beside if beside.is_file() else None


def annotation_classes(cfg, class_names: list[str]) -> dict[str, str]:
    """XML group -> class: the model's class names themselves, the CAMELYON16 and BACH groups whose class
    the model predicts, then ``annotation_classes`` (the user's word wins)."""
    from patholite.slides.annotations import BACH_CLASS_MAP, CAMELYON16_CLASS_MAP, EXCLUSION

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
    from patholite.slides.annotations import check_fits, rasterize, read_annotations

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


def process_slide(path: Path, cfg, model: nn.Module, meta: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Every output of one slide into ``out_dir``; returns its report."""
    from patholite.slides.reader import open_slide
    from patholite.slides.report import SlideResult, write_slide_outputs
    from patholite.slides.tiling import cached_tiles

    start = time.perf_counter()
    class_names = list(meta["class_names"])
    geometry = tile_geometry(cfg.tile, meta, Path(meta["_directory"]))
    with open_slide(path, mpp=cfg.reader.mpp, backend=cfg.reader.backend) as slide:
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
        t2 = time.perf_counter()
        thumbnail, thumb_ds = slide.thumbnail(cfg.report.thumbnail_px)
        annotations = annotation_map(cfg, slide, class_names, thumb_ds)
        describe = slide.describe()
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = tile_spec(path, grid, geometry, meta, cfg.reader.mpp, cfg.reader.backend)
    e = cfg.engine
    extra = {} if grid.tissue_fraction is None else {"tissue_fraction": grid.tissue_fraction}
    stream = stream_tiles(
        model, spec, class_names, out_dir / "tiles.csv", e.batch_size, e.workers, e.prefetch, e.device, extra
    )
    timings = {"tissue_s": t1 - t0, "tiling_s": t2 - t1, **stream.timings}
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
        extra={
            "artifact": meta["_directory"],
            "artifact_kind": meta["kind"],
            "tile": {
                "patch_size": geometry.patch_size,
                "mpp": geometry.mpp,
                "magnification": geometry.magnification,
                "patch_level": grid.patch_level,
                "downsample": grid.downsample,
                "size0": int(grid.size0),
                "overlap": cfg.tile.overlap,
                "theta": cfg.tile.theta,
            },
            "slide": describe,
            "tiles_file": "tiles.csv",
        },
    )
    return write_slide_outputs(result, out_dir, _call_rule(cfg))


def _call_rule(cfg):
    from patholite.slides.report import CallRule

    severity = None if cfg.report.severity is None else list(cfg.report.severity)
    return CallRule(severity=severity, min_share=cfg.report.min_share)


def run_slides(paths: list[Path], cfg, out_dir: Path) -> list[dict[str, Any]]:
    """Every slide through one loaded model: a tile classifier (tiling) or an SMT slide model (its focusing
    walk), as ``mode`` and the artifact say. With ``slides=`` (many), a slide's failure of any kind is a
    failed summary row and the others go on; with ``slide=`` (one), its error is raised."""
    from patholite.slides.report import check_rule
    from patholite.slides.tiling import check_request

    directory = resolve_artifact(cfg.artifact, cfg.artifact_name)
    mode = slide_mode(str(cfg.get("mode", "auto")), read_sidecar(directory), directory)
    if mode == "smt":
        from patholite.slides.smt_inference import run_smt_slides

        return run_smt_slides(paths, cfg, out_dir, directory=directory)
    with model_threads(cfg.engine.threads or max(1, available_cores() - cfg.engine.workers)):
        model, meta = load_classifier(directory, cfg.engine.device)
        meta["_directory"] = str(directory)
        # settings that would fail every slide fail once, before any slide is read
        check_rule(_call_rule(cfg), meta["class_names"])
        geometry = tile_geometry(cfg.tile, meta, directory)
        t = cfg.tile
        check_request(geometry.patch_size, geometry.mpp, geometry.magnification, t.overlap, t.theta)
        # process_slide is looked up per slide (tests replace it)
        return each_slide(paths, cfg, out_dir, lambda path, out: process_slide(path, cfg, model, meta, out))


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
    from patholite.slides.report import failed_row, write_summary

    many = not cfg.slide
    rows = []
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
    write_summary(rows, out_dir)
    return rows


def _unique_names(paths: list[Path]) -> list[str]:
    """Output folder names: slide stems, made unique where two folders hold slides of the same name."""
    stems = [p.stem for p in paths]
    return [s if stems.count(s) == 1 else f"{s}-{i}" for i, s in enumerate(stems)]
