"""The tile grid of a slide: level-0 top-left corners of square tiles at a target resolution, kept where the
tissue fraction of their footprint exceeds theta (R1), stored as CLAM-style HDF5 and reused when it fits.

A tile is ``patch_size`` pixels at the target resolution, ``downsample`` level-0 pixels per target pixel, so
its level-0 footprint is ``size0 = round(patch_size * downsample)``. Neighbours start ``(patch_size -
overlap) * downsample`` level-0 pixels apart; every tile lies fully inside the slide; order is row-major
(y, then x). ``patch_level`` is the coarsest pyramid level still at least as fine as the target: the engine
reads there and resizes when the target falls between levels.

HDF5 layout (CLAM's, so its feature extraction reads ours): dataset ``coords`` (N, 2) int64, level-0 (x, y),
with attributes ``patch_size`` (pixels read at ``patch_level``: ``read_region(coord, patch_level,
(patch_size, patch_size))`` covers the tile), ``patch_level``, ``downsample`` (that level's downsample),
``level_dim``, plus ours: ``target_patch_size`` and ``target_downsample`` (the tile at the target
resolution, what the model sees), ``level_downsample``, ``size0``, ``overlap``, ``mpp`` (NaN: unknown),
``theta``, ``slide_dimensions``, ``slide`` (file name) and the request (``request_mpp``,
``request_magnification``, ``tissue_digest``) that ``cached_tiles`` compares. Dataset ``tissue_fraction``
(N,) float32 when a tissue mask chose the tiles.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from patholite.errors import ConfigError, SlideError
from patholite.io import atomic_path
from patholite.wsi.tissue import TissueMask

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: patch_size and downsample mean what CLAM means (at patch_level)
_REQUIRED_ATTRS = (
    "target_patch_size", "patch_level", "target_downsample", "level_downsample", "size0", "overlap", "mpp",
    "slide_dimensions", "format_version",
)  # fmt: skip


@dataclass
class TileGrid:
    """Tile corners of one slide at one resolution (see the module docstring for the geometry)."""

    coords: np.ndarray  # (N, 2) int64 level-0 top-left x, y
    patch_size: int  # tile side in px at the target resolution
    patch_level: int  # pyramid level to read from
    downsample: float  # level-0 px per target px
    size0: int  # level-0 footprint side of one tile
    mpp: float | None  # target microns per pixel, when known
    overlap: int  # px at the target resolution shared by neighbours
    tissue_fraction: np.ndarray | None  # (N,) tissue share of each tile; None: no tissue mask was used
    slide_dimensions: tuple[int, int]  # level-0 (w, h)
    level_downsample: float = 1.0  # the downsample of patch_level

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def stride0(self) -> float:
        """Level-0 pixels between neighbouring tile corners."""
        return (self.patch_size - self.overlap) * self.downsample


def tissue_digest(tissue: TissueMask | None) -> str:
    """A short fingerprint of a mask (its pixels and downsample): "" for no mask."""
    if tissue is None:
        return ""
    h = hashlib.sha256(np.packbits(tissue.mask).tobytes())
    h.update(f"{tissue.mask.shape}|{tissue.downsample!r}".encode())
    return h.hexdigest()[:16]


def check_request(patch_size: int, mpp, magnification, overlap: int, theta: float) -> None:
    if int(patch_size) != patch_size or patch_size < 1:
        raise ConfigError(f"tile.size={patch_size} must be a positive whole number of pixels")
    if mpp is not None and magnification is not None:
        raise ConfigError(
            f"tile.mpp={mpp} and tile.magnification={magnification} both set: give one target resolution"
        )
    for name, value in (("tile.mpp", mpp), ("tile.magnification", magnification)):
        if value is not None and not value > 0:
            raise ConfigError(f"{name}={value} must be positive")
    if int(overlap) != overlap or not 0 <= overlap < patch_size:
        raise ConfigError(f"tile.overlap={overlap} must be in [0, tile.size={patch_size}): neighbours "
                          "would not advance")  # fmt: skip
    if not 0.0 <= theta <= 1.0:
        raise ConfigError(f"tile.theta={theta} is a tissue fraction: give a value in [0, 1]")


def _axis_starts(length: int, size0: int, stride0: float) -> np.ndarray:
    """Level-0 starts along one axis of every tile that fits inside ``length``."""
    count = int(math.floor((length - size0) / stride0 + 1e-9)) + 1
    starts = np.round(np.arange(count) * stride0).astype(np.int64)
    return starts[starts + size0 <= length]


@dataclass(frozen=True)
class _Geometry:
    downsample: float
    size0: int
    patch_level: int
    mpp: float | None


def _geometry(slide, patch_size: int, mpp: float | None, magnification: float | None) -> _Geometry:
    """Downsample, level-0 tile side, read level and target mpp of a request; a too-large tile raises."""
    downsample = 1.0 if mpp is None and magnification is None else slide.downsample_for(mpp, magnification)
    size0 = int(round(patch_size * downsample))
    width, height = (int(v) for v in slide.dimensions)
    if size0 > width or size0 > height:
        raise SlideError(
            f"slide {slide.path}: one tile covers {size0}x{size0} level-0 px ({patch_size} px at downsample "
            f"{downsample:.3g}) but the slide is {width}x{height}; use a smaller tile.size or a finer "
            "tile.mpp / tile.magnification"
        )
    target_mpp = float(mpp) if mpp is not None else (None if slide.mpp is None else slide.mpp * downsample)
    level = int(slide.best_level_for_downsample(downsample))
    return _Geometry(float(downsample), size0, level, target_mpp)


def _warn_upsampling(slide, geo: _Geometry) -> None:
    # legitimate (a 40x model on a 20x scan) but never free: the tiles hold less detail than the model expects
    if geo.downsample < 0.999:
        log.warning(
            "slide %s: the tile resolution (mpp %s) is finer than the scan's (mpp %s): tiles are upsampled "
            "%.2fx from level 0",
            slide.path, geo.mpp, slide.mpp, 1 / geo.downsample,
        )  # fmt: skip


def tile_grid(
    slide,
    patch_size: int,
    mpp: float | None = None,
    magnification: float | None = None,
    overlap: int = 0,
    tissue: TissueMask | None = None,
    theta: float = 0.5,
) -> TileGrid:
    """The grid of ``patch_size`` tiles at a target ``mpp`` or ``magnification`` (neither: level 0), kept
    where the tissue fraction exceeds ``theta`` when a ``tissue`` mask is given."""
    check_request(patch_size, mpp, magnification, overlap, theta)
    patch_size, overlap = int(patch_size), int(overlap)
    geo = _geometry(slide, patch_size, mpp, magnification)
    _warn_upsampling(slide, geo)
    width, height = (int(v) for v in slide.dimensions)
    stride0 = (patch_size - overlap) * geo.downsample
    xs, ys = _axis_starts(width, geo.size0, stride0), _axis_starts(height, geo.size0, stride0)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")  # row-major: y outer, x inner
    coords = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1).astype(np.int64)
    fractions = None
    if tissue is not None:
        fractions = tissue.fractions(coords, geo.size0).astype(np.float32)
        keep = fractions > theta
        if not keep.any():
            raise SlideError(
                f"slide {slide.path}: none of its {len(coords)} tiles has a tissue fraction above "
                f"tile.theta={theta} (best {float(fractions.max()):.2f}); lower tile.theta, use smaller "
                "tiles, or check the tissue mask (tissue.*)"
            )
        coords, fractions = coords[keep], fractions[keep]
    return TileGrid(
        coords=coords,
        patch_size=patch_size,
        patch_level=geo.patch_level,
        downsample=geo.downsample,
        size0=geo.size0,
        mpp=geo.mpp,
        overlap=overlap,
        tissue_fraction=fractions,
        slide_dimensions=(width, height),
        level_downsample=float(slide.level_downsamples[geo.patch_level]),
    )


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _none(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def save_tiles_h5(path: str | Path, grid: TileGrid, **extra_attrs) -> None:
    """Write ``grid`` as CLAM-style HDF5 (atomically); ``extra_attrs`` go on the ``coords`` dataset
    (None becomes NaN)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        dset = f.create_dataset("coords", data=np.asarray(grid.coords, dtype=np.int64).reshape(-1, 2))
        attrs = {
            "patch_size": int(round(grid.size0 / grid.level_downsample)),  # CLAM: read at patch_level
            "patch_level": int(grid.patch_level),
            "downsample": float(grid.level_downsample),
            "level_downsample": float(grid.level_downsample),
            "target_patch_size": int(grid.patch_size),
            "target_downsample": float(grid.downsample),
            "size0": int(grid.size0),
            "overlap": int(grid.overlap),
            "mpp": _nan(grid.mpp),
            "slide_dimensions": np.asarray(grid.slide_dimensions, dtype=np.int64),
            "format_version": FORMAT_VERSION,
        }
        for key, value in {**attrs, **extra_attrs}.items():
            dset.attrs[key] = _nan(value) if value is None else value
        if grid.tissue_fraction is not None:
            f.create_dataset("tissue_fraction", data=np.asarray(grid.tissue_fraction, dtype=np.float32))


def _read(path: Path) -> tuple[TileGrid, dict]:
    """The grid in ``path`` and every attribute of its ``coords``; SlideError for anything unusable."""
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise KeyError("dataset 'coords'")
            attrs = dict(f["coords"].attrs)
            coords = np.asarray(f["coords"][()])
            fractions = np.asarray(f["tissue_fraction"][()]) if "tissue_fraction" in f else None
        missing = [key for key in _REQUIRED_ATTRS if key not in attrs]
        if missing:
            raise KeyError(f"attributes {missing} of 'coords'")
        if coords.ndim != 2 or coords.shape[1] != 2:
            raise ValueError(f"'coords' has shape {coords.shape}, not (N, 2)")
        if fractions is not None and fractions.shape != (coords.shape[0],):
            raise ValueError(f"'tissue_fraction' has shape {fractions.shape}, not ({coords.shape[0]},)")
        grid = TileGrid(
            coords=coords.astype(np.int64),
            patch_size=int(attrs["target_patch_size"]),
            patch_level=int(attrs["patch_level"]),
            downsample=float(attrs["target_downsample"]),
            level_downsample=float(attrs["level_downsample"]),
            size0=int(attrs["size0"]),
            mpp=_none(attrs["mpp"]),
            overlap=int(attrs["overlap"]),
            tissue_fraction=None if fractions is None else fractions.astype(np.float32),
            slide_dimensions=tuple(int(v) for v in attrs["slide_dimensions"]),
        )
    except Exception as err:  # noqa: BLE001 - h5py raises OSError/KeyError/TypeError... for bad files
        raise SlideError(
            f"tile coordinates {path} cannot be used ({type(err).__name__}: {err}); it is missing, corrupt "
            "or not written by patholite: delete it to tile the slide again"
        ) from err
    return grid, attrs


def load_tiles_h5(path: str | Path) -> TileGrid:
    """Read a grid written by ``save_tiles_h5``; a missing, corrupt or foreign file raises ``SlideError``."""
    return _read(Path(path))[0]


def _request(slide, patch_size: int, mpp=None, magnification=None, overlap: int = 0, tissue=None,
             theta: float = 0.5) -> dict:  # fmt: skip
    """What a grid of this slide was asked for, as stored with it and compared by ``cached_tiles``."""
    check_request(patch_size, mpp, magnification, overlap, theta)
    geo = _geometry(slide, int(patch_size), mpp, magnification)
    return {
        "slide": Path(slide.path).name,
        "slide_dimensions": tuple(int(v) for v in slide.dimensions),
        "request_mpp": _nan(mpp),
        "request_magnification": _nan(magnification),
        "target_patch_size": int(patch_size),
        "overlap": int(overlap),
        "theta": float(theta),
        "tissue_digest": tissue_digest(tissue),
        "target_downsample": geo.downsample,
        "format_version": FORMAT_VERSION,
        "mpp": _nan(geo.mpp),
        "size0": geo.size0,
        "patch_level": geo.patch_level,
    }


def _mismatch(attrs: dict, want: dict) -> list[str]:
    """The names of stored values that differ from the wanted ones (NaN equals NaN)."""
    differ = []
    for key, value in want.items():
        have = attrs.get(key)
        if have is None:
            differ.append(key)
        elif isinstance(value, float):
            have = float(have)
            if not (math.isclose(have, value, rel_tol=1e-9) or (math.isnan(have) and math.isnan(value))):
                differ.append(key)
        elif isinstance(value, tuple):
            if tuple(int(v) for v in np.atleast_1d(have)) != value:
                differ.append(key)
        elif (have.decode() if isinstance(have, bytes) else have) != value:
            differ.append(key)
    return differ


def cached_tiles(slide, h5_path: str | Path, **tile_grid_kwargs) -> TileGrid:
    """``tile_grid(slide, **tile_grid_kwargs)``, read from ``h5_path`` when it was written for the same
    request of the same slide (name, size, resolution, overlap, theta, tissue mask); else built and written
    there. A corrupt or foreign file is rebuilt with a warning."""
    h5_path = Path(h5_path)
    want = _request(slide, **tile_grid_kwargs)
    if h5_path.is_file():
        try:
            grid, attrs = _read(h5_path)
            differ = _mismatch(attrs, want)
            if not differ:
                return grid
            log.info("tile cache %s was made for other settings (%s); tiling again", h5_path, differ)
        except SlideError as err:
            log.warning("tile cache %s is unusable (%s); tiling again", h5_path, err)
    grid = tile_grid(slide, **tile_grid_kwargs)
    level = grid.patch_level
    stored = {k: want[k] for k in ("slide", "request_mpp", "request_magnification", "theta", "tissue_digest")}
    save_tiles_h5(
        h5_path,
        grid,
        **stored,
        level_dim=np.asarray(slide.level_dimensions[level], dtype=np.int64),
    )
    return grid
