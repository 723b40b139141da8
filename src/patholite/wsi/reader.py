"""Reading whole-slide images: OpenSlide (every format it reads) with tiffslide as the fallback backend.

A ``Slide`` answers in level-0 coordinates, like OpenSlide: regions are addressed by their level-0 top-left
corner, and any resolution is a level-0 downsample. ``mpp`` is the level-0 microns per pixel: the override
when given, else the slide's own value when it is plausible for a slide (real scanners write 0.1-10 um/px;
plain TIFFs often carry a print resolution such as 352.8, which is not a slide's). Every failure, at open or
at read time (a corrupt tile surfaces only when read), raises ``SlideError`` naming the slide and the region.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import OrderedDict
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np
from PIL import Image

from patholite.errors import ConfigError, SlideError

log = logging.getLogger(__name__)

# What OpenSlide reads (plus plain TIFFs through tiffslide); folders are DICOM or MIRAX companions.
SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".czi",
)  # fmt: skip
BACKENDS = ("auto", "openslide", "tiffslide")
# Microns per pixel a real slide scan can have (40x ~0.25, 20x ~0.5, 1.25x overview ~8).
PLAUSIBLE_MPP = (0.05, 20.0)
# Strips read at a time when a single-level slide must be downsampled whole (bounded memory).
_STRIP_PX = 2048


def _open_backend(path: Path, backend: str):
    """The backend's slide object, and the backend name that opened it."""
    errors = []
    if backend in ("auto", "openslide"):
        import openslide

        try:
            return openslide.OpenSlide(str(path)), "openslide"
        except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError, OSError) as err:
            errors.append(f"openslide: {err}")
    if backend in ("auto", "tiffslide"):
        import tiffslide

        try:
            slide = tiffslide.TiffSlide(str(path))
            # tiffslide opens files whose pixels it cannot decode (an unknown compression); a one-pixel
            # read of the coarsest level tells an opened slide from a readable one
            slide.read_region((0, 0), slide.level_count - 1, (1, 1))
            return slide, "tiffslide"
        except Exception as err:  # noqa: BLE001 - tiffslide raises tifffile/zarr/codec errors of many types
            errors.append(f"tiffslide: {type(err).__name__}: {err}")
    raise SlideError(
        f"cannot open slide {path}: {'; '.join(errors)}. Check the file is a complete whole-slide image "
        "in a format OpenSlide reads (.svs, .tif, .ndpi, .mrxs, DICOM, ...), or try reader.backend=tiffslide"
    )


def _float_property(props, *keys: str) -> float | None:
    for key in keys:
        value = props.get(key)
        if value in (None, ""):
            continue
        try:
            number = float(str(value).replace(",", "."))
        except ValueError:
            continue
        if math.isfinite(number) and number > 0:
            return number
    return None


class Slide:
    """One open whole-slide image. Use ``open_slide``; close it (or use ``with``) when done."""

    def __init__(self, path: str | Path, mpp: float | None = None, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"slide.backend={backend!r}: choose one of {list(BACKENDS)}")
        if mpp is not None and not (PLAUSIBLE_MPP[0] <= float(mpp) <= PLAUSIBLE_MPP[1]):
            raise ConfigError(
                f"slide.mpp={mpp} is not a plausible level-0 microns per pixel for a slide "
                f"({PLAUSIBLE_MPP[0]}-{PLAUSIBLE_MPP[1]}; 40x is about 0.25, 20x about 0.5)"
            )
        self.path = Path(path)
        if not self.path.exists():
            raise SlideError(f"slide {self.path} does not exist")
        target = self.path
        if self.path.is_dir():  # a DICOM slide is a folder of instances; OpenSlide opens it from any one
            instances = sorted(p for p in self.path.iterdir() if p.suffix.lower() == ".dcm")
            if not instances:
                raise SlideError(f"slide {self.path} is a folder without DICOM (.dcm) files")
            target = instances[0]
        self._osr, self.backend = _open_backend(target, backend)
        self.properties = dict(self._osr.properties)
        self.dimensions: tuple[int, int] = tuple(int(v) for v in self._osr.dimensions)
        self.level_count: int = int(self._osr.level_count)
        self.level_dimensions: list[tuple[int, int]] = [
            (int(w), int(h)) for w, h in self._osr.level_dimensions
        ]
        self.level_downsamples: list[float] = [float(d) for d in self._osr.level_downsamples]
        self.mpp_override = None if mpp is None else float(mpp)
        self.native_mpp = self._native_mpp()
        self.objective_power = _float_property(
            self.properties, "openslide.objective-power", "tiffslide.objective-power", "aperio.AppMag"
        )
        if min(self.dimensions) < 1:
            raise SlideError(f"slide {self.path} has an empty level 0 {self.dimensions}")

    # -- facts
    def _native_mpp(self) -> float | None:
        """The slide's own level-0 mpp (mean of x and y), or None when absent."""
        x = _float_property(self.properties, "openslide.mpp-x", "tiffslide.mpp-x", "aperio.MPP")
        y = _float_property(self.properties, "openslide.mpp-y", "tiffslide.mpp-y", "aperio.MPP")
        if x is None and y is None:
            return None
        if x is None or y is None:
            return x if y is None else y
        return (x + y) / 2

    @property
    def mpp(self) -> float | None:
        """Level-0 microns per pixel: the override, else the slide's own value when plausible, else None."""
        if self.mpp_override is not None:
            return self.mpp_override
        native = self.native_mpp
        if native is not None and PLAUSIBLE_MPP[0] <= native <= PLAUSIBLE_MPP[1]:
            return native
        return None

    def require_mpp(self) -> float:
        """``mpp``, or a clear error when the slide has none usable and no override was given."""
        mpp = self.mpp
        if mpp is None:
            found = "none" if self.native_mpp is None else f"{self.native_mpp:g}, which no slide scan has"
            raise SlideError(
                f"slide {self.path} has no usable microns per pixel (found: {found}); "
                "set reader.mpp=<level-0 um/px> (dataset.reader.mpp for slide datasets; "
                "40x is about 0.25, 20x about 0.5)"
            )
        return mpp

    def downsample_for(self, mpp: float | None = None, magnification: float | None = None) -> float:
        """Level-0 pixels per pixel at a target mpp or objective magnification (neither: level 0)."""
        if mpp is not None and magnification is not None:
            raise ConfigError("give a target mpp or a magnification, not both")
        if mpp is not None:
            if mpp <= 0:
                raise ConfigError(f"target mpp={mpp} must be positive")
            return float(mpp) / self.require_mpp()
        if magnification is not None:
            if magnification <= 0:
                raise ConfigError(f"target magnification={magnification} must be positive")
            if self.objective_power is not None and self.mpp_override is None:
                return self.objective_power / float(magnification)
            # no objective power (or an explicit mpp): the usual convention, 10x = 1 um/px
            return (10.0 / float(magnification)) / self.require_mpp()
        return 1.0

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level that is not coarser than ``downsample`` (so reading it never upsamples)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.001:  # tolerate rounding in the stored downsamples
                best = level
        return best

    # -- reading
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """HxWx3 uint8 RGB of ``size`` pixels at ``level`` from level-0 ``location``; alpha onto white."""
        if not 0 <= level < self.level_count:
            raise SlideError(f"slide {self.path} has levels 0-{self.level_count - 1}, not {level}")
        w, h = int(size[0]), int(size[1])
        if w < 1 or h < 1:
            raise SlideError(f"slide {self.path}: region size {size} is empty")
        x, y = int(location[0]), int(location[1])
        try:
            region = self._osr.read_region((x, y), level, (w, h))
        except Exception as err:  # noqa: BLE001 - openslide/tiffslide raise many types for corrupt tiles
            raise SlideError(
                f"slide {self.path} failed to read the region at level-0 ({x}, {y}), level {level}, "
                f"size {w}x{h}: {type(err).__name__}: {err}. The file is corrupt or truncated; "
                "re-export or re-download it, or leave it out"
            ) from err
        rgba = np.asarray(region)
        if rgba.ndim == 3 and rgba.shape[2] == 4 and rgba[..., 3].min() < 255:  # most regions are opaque
            alpha = rgba[..., 3:4].astype(np.float32) / 255.0
            rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
            return rgb.round().astype(np.uint8)
        return np.ascontiguousarray(rgba[..., :3]).astype(np.uint8, copy=False)

    def scaled_read_size(self, size0: tuple[float, float], size: tuple[int, int]) -> tuple[int, int, int]:
        """(level, width, height) that ``read_scaled`` reads from the file for a level-0 region of ``size0``
        shown at ``size``: what a read costs in decoded pixels."""
        ds = min(size0[0] / size[0], size0[1] / size[1])
        level = self.best_level_for_downsample(ds)
        level_ds = self.level_downsamples[level]
        return level, max(1, round(size0[0] / level_ds)), max(1, round(size0[1] / level_ds))

    def read_scaled(
        self, location: tuple[int, int], size0: tuple[int, int], size: tuple[int, int]
    ) -> np.ndarray:
        """A level-0 region of ``size0`` pixels resampled to ``size``: read from the coarsest level that is
        still at least as fine as needed, then resized (area interpolation)."""
        level, *read = self.scaled_read_size(size0, size)
        image = self.read_region(location, level, tuple(read))
        return resize_rgb(image, size)

    def low_resolution(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """The whole slide at about ``max_side`` pixels on its long side, and its downsample.

        From the coarsest pyramid level whose long side is still at least ``max_side`` (resized when it is
        larger); a slide without such a level (single-level scans) is read from the finest level in strips,
        each shrunk as it arrives, so memory stays bounded by one strip."""
        w0, h0 = self.dimensions
        scale = max(w0, h0) / max_side
        if scale <= 1:
            return self.read_region((0, 0), 0, (w0, h0)), 1.0
        out = (max(1, round(w0 / scale)), max(1, round(h0 / scale)))
        level = self.best_level_for_downsample(scale)
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        if lw * lh <= 4 * max_side * max_side:  # small enough to read at once
            image = self.read_region((0, 0), level, (lw, lh))
            return cv2.resize(image, out, interpolation=cv2.INTER_AREA), w0 / out[0]
        strips = []
        rows = max(1, _STRIP_PX * _STRIP_PX // lw)  # level rows per strip: about 4 Mpx read at a time
        for top in range(0, lh, rows):
            height = min(rows, lh - top)
            strip = self.read_region((0, round(top * ds)), level, (lw, height))
            target_h = max(1, round(height * out[1] / lh))
            strips.append(cv2.resize(strip, (out[0], target_h), interpolation=cv2.INTER_AREA))
        image = np.concatenate(strips, axis=0)
        if image.shape[0] != out[1]:
            image = cv2.resize(image, out, interpolation=cv2.INTER_AREA)
        return image, w0 / out[0]

    def thumbnail(self, max_side: int = 1024) -> tuple[np.ndarray, float]:
        """A thumbnail of the whole slide (pixels, level-0 px per pixel)."""
        return self.low_resolution(max_side)

    # -- lifetime
    def close(self) -> None:
        if self._osr is not None:
            self._osr.close()
            self._osr = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Slide({self.path.name}, {self.backend}, {self.dimensions[0]}x{self.dimensions[1]}, "
            f"{self.level_count} levels, mpp={self.mpp}, objective={self.objective_power})"
        )

    def describe(self) -> dict:
        """The facts a report records about the slide."""
        return {
            "path": str(self.path),
            "backend": self.backend,
            "dimensions": list(self.dimensions),
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": self.level_downsamples,
            "mpp": self.mpp,
            "native_mpp": self.native_mpp,
            "mpp_overridden": self.mpp_override is not None,
            "objective_power": self.objective_power,
            "vendor": self.properties.get("openslide.vendor"),
        }


def open_slide(path: str | Path, mpp: float | None = None, backend: str = "auto") -> Slide:
    """Open a whole-slide image (``mpp``: override of the level-0 microns per pixel)."""
    return Slide(path, mpp=mpp, backend=backend)


_OPEN_SLIDES = 8  # slides kept open per process by open_cached
_open: OrderedDict[tuple, Slide] = OrderedDict()
_open_pid: int | None = None


def open_cached(path: str | Path, mpp: float | None = None, backend: str = "auto") -> Slide:
    """An open slide, kept open for this process (the least recently used of more than a few is closed).

    For readers of many tiles (loader workers): a forked worker gets its own handles, never its parent's,
    which the parent still uses (so they are dropped, not closed)."""
    global _open_pid
    if _open_pid != os.getpid():
        _open.clear()
        _open_pid = os.getpid()
    key = (str(path), mpp, backend)
    slide = _open.get(key)
    if slide is None:
        slide = _open[key] = open_slide(path, mpp=mpp, backend=backend)
        while len(_open) > _OPEN_SLIDES:
            _open.popitem(last=False)[1].close()
    _open.move_to_end(key)
    return slide


def forget_cached(path: str | Path) -> None:
    """Close this process's cached handles of ``path``."""
    for key in [k for k in _open if k[0] == str(path)]:
        _open.pop(key).close()


def resize_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` resized to ``size`` (w, h) with box filtering (area averaging) when shrinking.

    Pillow, not OpenCV: tiles are read in DataLoader worker processes forked from a parent whose OpenCV
    thread pool (started by tissue detection) does not survive the fork, and a worker resizing with it hangs.
    """
    size = (int(size[0]), int(size[1]))
    if (image.shape[1], image.shape[0]) == size:
        return image
    shrink = size[0] <= image.shape[1] and size[1] <= image.shape[0]
    method = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(image).resize(size, method))


# A list file's first line naming one of these (a CSV header) makes it a manifest: one slide per row, with
# optional columns (slides.manifest reads them all)
MANIFEST_PATH_COLUMNS = ("slide", "path")


def manifest_header(source: Path) -> list[str] | None:
    """The lower-cased header of a CSV manifest (its first line names a ``slide`` or ``path`` column), or
    None for a plain list (one path per line) or any other file."""
    if source.suffix.lower() != ".csv" or not source.is_file():
        return None
    with open(source, newline="") as f:
        for row in csv.reader(f):
            if row and not row[0].lstrip().startswith("#"):
                header = [cell.strip().lower() for cell in row]
                return header if any(c in MANIFEST_PATH_COLUMNS for c in header) else None
    return None


def find_slides(source: str | Path) -> list[Path]:
    """Slides named by ``source``: one file, a folder (every slide file in it, sorted; DICOM folders count
    as one slide each), a text file listing one path per line, or a CSV manifest with a header naming a
    ``slide`` (or ``path``) column (relative paths from the list's folder in both)."""
    source = Path(source).expanduser()
    if not source.exists():
        raise SlideError(f"slides={source} does not exist; give a slide file, a folder or a list file")
    if _is_dicom(source):  # a DICOM slide: a folder of instances, one slide
        return [source]
    if source.is_dir():
        found = sorted(p for p in source.iterdir() if _is_slide_file(p) or _is_dicom(p))
        if not found:
            raise SlideError(f"slides={source}: no slide files ({', '.join(SLIDE_SUFFIXES)}) in the folder")
        return found
    if source.suffix.lower() in (".txt", ".lst", ".csv"):
        header = manifest_header(source)
        if header is not None:  # a manifest: the path column's cells (slides.manifest reads the rest)
            column = next(c for c in header if c in MANIFEST_PATH_COLUMNS)
            with open(source, newline="") as f:
                rows = csv.reader(ln for ln in f if not ln.lstrip().startswith("#"))
                next(rows)
                lines = [dict(zip(header, row, strict=False)).get(column, "").strip() for row in rows]
        else:
            lines = [ln.strip() for ln in source.read_text().splitlines()]
        paths = [Path(ln) for ln in lines if ln and not ln.startswith("#")]
        paths = [p if p.is_absolute() else source.parent / p for p in paths]
        if not paths:
            raise SlideError(f"slides={source}: the list names no slides (one path per line)")
        return paths
    return [source]


def _is_slide_file(path: Path) -> bool:
    # ground truth and annotations written beside slides (.xml, .npz, .json) are not slides
    return path.is_file() and path.suffix.lower() in SLIDE_SUFFIXES and not path.name.startswith(".")


def _is_dicom(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() == ".dcm" for p in path.iterdir())


def read_slide_tile(
    path: str,
    box: tuple[int, int, int, int],
    patch_size: int,
    mpp: float | None = None,
    backend: str = "auto",
) -> np.ndarray:
    """The level-0 square ``box`` = (x, y, size0, size0) of slide ``path`` as a ``patch_size`` HxWx3 tile."""
    x, y, w, h = box
    return open_cached(path, mpp, backend).read_scaled((x, y), (w, h), (patch_size, patch_size))
