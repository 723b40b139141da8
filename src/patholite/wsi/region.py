"""Geometry and reading for focused slide-level models (SMT, R3): square level-0 regions, their patches,
reads padded outside the slide, and the layer-1 thumbnail of the tissue, cached per slide and setting.

A ``Box`` is a square of level-0 pixels that may extend past the slide (a tissue bounding box is rarely
square; a patch at the edge of a padded thumbnail is partly glass-less void): reads fill the part outside the
slide with white. Layer 1 sees ``tissue_box`` at ``image_size`` px; a focused patch ``index`` of an image
that shows ``parent`` is ``patch_box(parent, index, grid)``, re-read at ``image_size`` px, so each hop
magnifies ``grid`` times.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from patholite.config.slide_schema import ReaderConfig, TissueConfig
from patholite.errors import ConfigError, SlideError
from patholite.io import atomic_path
from patholite.wsi.cache import file_identity, slide_cache_dir, tissue_for
from patholite.wsi.reader import open_cached
from patholite.wsi.tissue import TISSUE_VERSION, detect_tissue

log = logging.getLogger(__name__)

THUMB_VERSION = 1  # bump when the thumbnail rendering changes: it keys the thumbnail cache
THUMB_DIR = "smt_thumbs"
POLICIES = ("upsample", "refuse")
_warned_upsample: set[tuple] = set()


@dataclass(frozen=True)
class Box:
    """A square region in level-0 pixels: top-left ``(x, y)`` and ``side`` (may extend past the slide)."""

    x: float
    y: float
    side: float

    def as_list(self) -> list[float]:
        return [float(self.x), float(self.y), float(self.side)]


# ------------------------------------------------------------------------------------------- geometry
def tissue_box(mask, dims: tuple[int, int], downsample: float | None = None) -> Box:
    """The square around the tissue's bounding box (side = the bbox's longer side, centred on it).

    ``mask``: a ``TissueMask`` (``.mask``, ``.downsample``) or a bool array with ``downsample`` (level-0 px
    per mask px); ``dims``: the slide's level-0 (width, height). No tissue: the square around the slide."""
    if downsample is None:
        mask, downsample = mask.mask, mask.downsample
    mask = np.asarray(mask, dtype=bool)
    w0, h0 = int(dims[0]), int(dims[1])
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        x0, y0, x1, y1 = 0.0, 0.0, float(w0), float(h0)
    else:
        ds = float(downsample)
        x0, x1 = max(0.0, float(cols[0]) * ds), min(float(w0), float(cols[-1] + 1) * ds)
        y0, y1 = max(0.0, float(rows[0]) * ds), min(float(h0), float(rows[-1] + 1) * ds)
    side = max(x1 - x0, y1 - y0, 1.0)
    return Box((x0 + x1 - side) / 2, (y0 + y1 - side) / 2, side)


def patch_box(parent: Box, index: int, grid: int) -> Box:
    """Patch ``index`` (row-major in ``grid`` x ``grid``) of an image that shows ``parent``."""
    if grid < 1:
        raise ConfigError(f"grid={grid} must be at least 1 (patches per image side)")
    if not 0 <= int(index) < grid * grid:
        raise ConfigError(f"patch index {index} lies outside a {grid}x{grid} grid (0..{grid * grid - 1})")
    side = parent.side / grid
    row, col = divmod(int(index), grid)
    return Box(parent.x + col * side, parent.y + row * side, side)


def chain_check(
    box: Box, image_size: int, grid: int, hops: int = 2, policy: str = "upsample", source: str = "slide"
) -> None:
    """Whether the magnification chain reaches full resolution: the last hop's region is
    ``box.side / grid**hops`` level-0 px and is shown at ``image_size`` px. Smaller: ``policy="refuse"``
    raises ``SlideError``; ``"upsample"`` logs once (the reads are upsampled)."""
    if policy not in POLICIES:
        raise ConfigError(f"model.smt.too_small={policy!r} must be one of {list(POLICIES)}")
    needed = image_size * grid**hops
    if box.side >= needed:
        return
    if policy == "refuse":
        raise SlideError(
            f"{source} is too small for the magnification chain: its tissue box is {box.side:.0f} px of "
            f"level 0, but layer {hops + 1} at full resolution needs {needed} px (image_size {image_size} "
            f"x grid {grid}^{hops}); use a smaller grid (model.smt.grid=8) or model.smt.too_small=upsample"
        )
    key = (image_size, grid, hops)
    if key not in _warned_upsample:
        _warned_upsample.add(key)
        log.warning(
            "%s: tissue box %.0f px < %d px (image_size %d x grid %d^%d): layer %d reads are upsampled "
            "(logged once)", source, box.side, needed, image_size, grid, hops, hops + 1,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------- reading
def read_box(slide, box: Box, size: int) -> np.ndarray:
    """``box`` of an open ``Slide`` at ``size`` x ``size`` px (uint8 RGB), white outside the slide."""
    w0, h0 = slide.dimensions
    scale = size / box.side  # output px per level-0 px
    x0, y0 = max(box.x, 0.0), max(box.y, 0.0)
    x1, y1 = min(box.x + box.side, float(w0)), min(box.y + box.side, float(h0))
    out = np.full((size, size, 3), 255, np.uint8)
    if x1 <= x0 or y1 <= y0:
        return out
    ox0, oy0 = round((x0 - box.x) * scale), round((y0 - box.y) * scale)
    ox1 = min(size, max(ox0 + 1, round((x1 - box.x) * scale)))
    oy1 = min(size, max(oy0 + 1, round((y1 - box.y) * scale)))
    if ox0 >= size or oy0 >= size:
        return out
    lx, ly = math.floor(x0), math.floor(y0)
    size0 = (max(1, math.ceil(x1) - lx), max(1, math.ceil(y1) - ly))
    out[oy0:oy1, ox0:ox1] = slide.read_scaled((lx, ly), size0, (ox1 - ox0, oy1 - oy0))
    return out


class RegionReader:
    """Reads square level-0 regions of one slide at a given size, through the process's open slide
    (``open_cached``); counts its reads (``reads``) and the seconds they took (``read_seconds``)."""

    def __init__(self, path: str | Path, mpp: float | None = None, backend: str = "auto") -> None:
        self.path = Path(path)
        self.mpp, self.backend = mpp, backend
        self.reads = 0
        self.read_seconds = 0.0

    @property
    def slide(self):
        return open_cached(self.path, self.mpp, self.backend)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.slide.dimensions

    def read(self, box: Box, size: int) -> np.ndarray:
        """``box`` at ``size`` x ``size`` px, HxWx3 uint8, padded white outside the slide."""
        start = time.perf_counter()
        try:
            return read_box(self.slide, box, int(size))
        finally:
            self.reads += 1
            self.read_seconds += time.perf_counter() - start

    def __repr__(self) -> str:
        return f"RegionReader({self.path.name}, reads={self.reads}, read_seconds={self.read_seconds:.3f})"


# ------------------------------------------------------------------------------------------- thumbnails
def _node(value, schema) -> DictConfig:
    """A config node (DictConfig, dict, dataclass or None) over the schema's defaults, as a DictConfig."""
    node = OmegaConf.structured(schema)
    if value is None:
        return node
    return OmegaConf.merge(
        node, value if isinstance(value, DictConfig | dict) else OmegaConf.structured(value)
    )


def thumbnail_file(path: Path, cache_root: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cache_root).expanduser() / THUMB_DIR / f"{path.stem}-{digest}.npz"


def _load_thumbnail(file: Path, key_text: str, image_size: int) -> tuple[np.ndarray, Box] | None:
    """The cached thumbnail, or None (with a warning) when it is unreadable or stale."""
    try:
        with np.load(file, allow_pickle=False) as z:
            stored, image, box = str(z["key"]), z["image"], z["box"]
        if stored != key_text:
            raise ValueError("its stored key differs from the slide's and settings'")
        if image.shape != (image_size, image_size, 3) or image.dtype != np.uint8 or box.shape != (3,):
            raise ValueError(f"it holds a {image.shape} {image.dtype} image, not {image_size}x{image_size}x3")
        return image, Box(*(float(v) for v in box))
    except Exception as err:  # noqa: BLE001 - a damaged or stale cache is rebuilt, never trusted
        log.warning("thumbnail cache %s is unusable (%s); rendering it again", file, err)
        return None


def smt_tissue_box(slide, cfg, cache_root: str | Path | None = None, tissue_px: int | None = None) -> Box:
    """SMT's layer-1 region: the square around the tissue's bounding box. ``tissue_px``: the long side of
    the low-resolution image the tissue is found on; a bounding box needs no fine mask, and a 512-px image
    costs a few hundredths of a second where the tiler's 2048-px mask costs about one. None: the tiler's
    mask, from (and to) its cache under ``cache_root``. ``cfg``: a node with ``tissue`` and ``reader``."""
    return tissue_box(smt_tissue_mask(slide, cfg, cache_root, tissue_px), slide.dimensions)


def smt_tissue_mask(slide, cfg, cache_root: str | Path | None = None, tissue_px: int | None = None):
    """The tissue mask ``smt_tissue_box`` frames (same arguments); the walk's tissue-masked candidates
    (``model.smt.tissue_min``) read their tissue fractions from it."""
    if tissue_px is None:
        return tissue_for(slide, cfg, slide_cache_dir(Path(cache_root), Path(slide.path), cfg))
    options = {key: cfg.tissue[key] for key in cfg.tissue}
    return detect_tissue(slide, **{**options, "max_side": int(tissue_px)})


def cached_thumbnail(
    path: str | Path, cache_root: str | Path, image_size: int, tissue_cfg=None, reader_cfg=None,
    tissue_px: int | None = None,
) -> tuple[np.ndarray, Box]:  # fmt: skip
    """The slide's tissue box rendered at ``image_size`` px (uint8 SxSx3) and the box, rendered once per
    slide file and settings under ``cache_root/smt_thumbs``; the tissue mask comes from (and goes to) the
    slide engine's cache under ``cache_root``. ``tissue_cfg`` / ``reader_cfg``: the ``tissue`` and
    ``reader`` nodes (None: their defaults); ``tissue_px``: see ``smt_tissue_box``."""
    path, cache_root = Path(path), Path(cache_root).expanduser()
    if not path.exists():
        raise SlideError(f"slide {path} does not exist")
    cfg = OmegaConf.create(
        {"tissue": _node(tissue_cfg, TissueConfig), "reader": _node(reader_cfg, ReaderConfig)}
    )
    settings = OmegaConf.to_container(cfg, resolve=True)
    key = {"version": THUMB_VERSION, "tissue_version": TISSUE_VERSION, "slide": file_identity(path),
           "image_size": int(image_size), **settings}  # fmt: skip
    if tissue_px is not None:  # keys of thumbnails on the tiler's mask stay as they were
        key["tissue_px"] = int(tissue_px)
    key_text = json.dumps(key, sort_keys=True, default=str)
    file = thumbnail_file(path, cache_root, key)
    if file.is_file():
        found = _load_thumbnail(file, key_text, int(image_size))
        if found is not None:
            return found
    slide = open_cached(path, cfg.reader.mpp, cfg.reader.backend)
    box = smt_tissue_box(slide, cfg, cache_root, tissue_px)
    image = read_box(slide, box, int(image_size))
    with atomic_path(file) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would add ".npz"
        np.savez_compressed(f, image=image, box=np.array(box.as_list()), key=np.array(key_text))
    return image, box


def pixels_decoded(slide, sides: list[float], size: int) -> int:
    """Pixels the reads of these level-0 square sides at ``size`` px decode from the slide file, each at the
    pyramid level ``read_scaled`` picks: what reading costs (the level-0 *area* they cover is another
    measure: a thumbnail covers the whole tissue box from a coarse level)."""
    return int(sum(w * h for _, w, h in (slide.scaled_read_size((d, d), (size, size)) for d in sides)))
