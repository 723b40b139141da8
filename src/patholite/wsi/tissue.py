"""Tissue detection on a low-resolution view of a slide: which level-0 areas hold tissue, not glass or ink.

R1's recipe: threshold (Otsu) a per-pixel tissue feature, then opening and closing, so a tile is kept only
when the tissue fraction of its footprint passes a threshold (``TissueMask.fractions``). The steps:

1. A median blur (``MEDIAN_PX``) removes scanner noise at the mask's own pixel scale.
2. Marker ink (green, blue, black) is found by colour rules that H&E stains cannot meet (``pen_mask``); it
   takes no part in the threshold and never counts as tissue.
3. The feature: HSV saturation (``otsu_saturation``: stained tissue is coloured, glass is grey, which also
   ignores grey bubble rims and dust) or darkness (``otsu_gray``: 255 - grey level, tissue darker than glass).
   A smooth background (uneven illumination, a gradient across the glass) is fitted with a quadratic surface
   on the glass pixels and subtracted (``flatten``).
4. Otsu's threshold on the feature over the pixels that are not ink; pixels above it seed tissue. Seeds grow
   (hysteresis) into connected pixels that stand out from the glass at all: a feature above the glass
   noise floor (median + max(5 robust SDs, ``min_contrast``) of the glass), or a broad area with more local
   texture than the glass has (``min_texture``). So pale tissue touching stained tissue (faint fat, whose
   membranes show as texture; loose stroma) is kept, while faint specks, bubble rims and the glass are not.
   The floor also keeps a blank slide from splitting its noise in two: it raises "no tissue found".
5. Opening, then closing, with elliptical kernels (radius ``open_um``, ``close_um``), removal of objects
   smaller than ``min_object_um2`` and filling of holes smaller than ``min_hole_um2``; sizes in micrometres
   go through mpp and the downsample, or, without an mpp, the ``*_px`` sizes in mask pixels are used.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import cv2
import numpy as np
from PIL import Image, PngImagePlugin
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects

from patholite.errors import ConfigError, SlideError
from patholite.io import atomic_path

# Bump whenever detection changes what it finds: it keys the cached masks (slides/cache.py).
TISSUE_VERSION = 2
log = logging.getLogger(__name__)

METHODS = ("otsu_saturation", "otsu_gray")
MEDIAN_PX = 5  # median blur at the mask's own pixel scale: scanner noise is per pixel, whatever the mpp
WHITE_VALUE = 250  # darkest channel at or above it: blank white (padding, overexposed glass)
PEN_MIN_SATURATION = 0.25  # HSV saturation of green/blue ink (pen_mask)
TEXTURE_PX = 7  # window of the local grey-level spread that lets faint textured tissue (fat) join
PEN_MARGIN_PX = 2  # ink is widened by its anti-aliased rim, paler than the ink itself
_PNG_KEY = "patholite.downsample"


@dataclass(eq=False)
class TissueMask:
    """Where the tissue is: a boolean mask of the slide at ``downsample`` level-0 pixels per mask pixel."""

    mask: np.ndarray  # bool (H, W)
    downsample: float  # level-0 px per mask px
    _integral: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.mask = np.asarray(self.mask, dtype=bool)
        self.downsample = float(self.downsample)
        if self.mask.ndim != 2 or self.downsample <= 0:
            raise SlideError(f"a tissue mask needs a 2-D mask and a positive downsample, got "
                             f"shape {self.mask.shape}, downsample {self.downsample}")  # fmt: skip

    @property
    def tissue_share(self) -> float:
        """Fraction of the mask that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def fractions(self, coords: np.ndarray, size0: float) -> np.ndarray:
        """Tissue fraction of each square tile footprint (level-0 top-left ``coords`` (N, 2), side ``size0``).

        Exact for the piecewise-constant mask, partial mask pixels included: the bilinear interpolation of
        the integral image is the exact area integral. Footprint outside the mask counts as no tissue."""
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        if size0 <= 0:
            raise ConfigError(f"tile side {size0} (level-0 px) must be positive")
        if self._integral is None:
            sums = self.mask.astype(np.int64).cumsum(0).cumsum(1)
            self._integral = np.pad(sums, ((1, 0), (1, 0)))
        h, w = self.mask.shape
        side = size0 / self.downsample
        x0 = np.clip(coords[:, 0] / self.downsample, 0, w)
        y0 = np.clip(coords[:, 1] / self.downsample, 0, h)
        x1 = np.clip(coords[:, 0] / self.downsample + side, 0, w)
        y1 = np.clip(coords[:, 1] / self.downsample + side, 0, h)
        area = self._area_to(x1, y1) - self._area_to(x0, y1) - self._area_to(x1, y0) + self._area_to(x0, y0)
        return np.clip(area / (side * side), 0.0, 1.0)

    def _area_to(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Tissue area in [0, x) x [0, y) mask pixels (x, y fractional): bilinear in the integral image."""
        integral = self._integral
        h, w = integral.shape[0] - 1, integral.shape[1] - 1
        i = np.minimum(np.floor(x).astype(np.int64), max(w - 1, 0))
        j = np.minimum(np.floor(y).astype(np.int64), max(h - 1, 0))
        a, b = x - i, y - j
        return (
            (1 - a) * (1 - b) * integral[j, i]
            + a * (1 - b) * integral[j, i + 1]
            + (1 - a) * b * integral[j + 1, i]
            + a * b * integral[j + 1, i + 1]
        )

    def save(self, path: str | Path) -> None:
        """Write the mask as a PNG (downsample in a text chunk) or an .npz, atomically."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".png", ".npz"):
            raise ConfigError(f"tissue mask file {path}: use a .png or .npz name")
        with atomic_path(path) as tmp:
            if suffix == ".png":
                info = PngImagePlugin.PngInfo()
                info.add_text(_PNG_KEY, repr(self.downsample))
                Image.fromarray(self.mask.astype(np.uint8) * 255).save(tmp, format="PNG", pnginfo=info)
            else:
                with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
                    np.savez_compressed(f, mask=self.mask, downsample=np.float64(self.downsample))

    @classmethod
    def load(cls, path: str | Path) -> TissueMask:
        """Read a mask written by ``save``; a missing or corrupt file raises ``SlideError``."""
        path = Path(path)
        try:
            if path.suffix.lower() == ".png":
                with Image.open(path) as image:
                    downsample = float(image.info[_PNG_KEY])
                    mask = np.asarray(image.convert("L")) > 127
            else:
                with np.load(path) as data:
                    mask, downsample = data["mask"], float(data["downsample"])
        except Exception as err:  # noqa: BLE001 - PIL/numpy/zip raise many types for a bad file
            raise SlideError(
                f"tissue mask {path} cannot be read ({type(err).__name__}: {err}); it is missing, corrupt "
                "or not written by patholite: delete it and detect the tissue again"
            ) from err
        return cls(mask, downsample)


def pen_mask(
    rgb: np.ndarray, min_saturation: float = 0.25, green_margin: int = 10, blue_margin: int = 90,
    dark_value: int = 45,
) -> np.ndarray:  # fmt: skip
    """Pixels of marker ink, by colour rules that H&E stains cannot meet.

    Both stains absorb green light at least as strongly as red (hematoxylin OD r 0.65 < g 0.70, eosin
    0.07 < 0.99), so stained tissue always has red >= green. Ink is:
    - green, cyan and most blue ink (the "low-red" inks): saturated (HSV S >= ``min_saturation``) with green
      above red by more than ``green_margin``;
    - deep blue ink with red == green: blue above both red and green by more than ``blue_margin`` (pure
      hematoxylin reaches about 75);
    - black ink (and other near-black debris): the brightest channel below ``dark_value``.
    Red ink cannot be told from eosin by colour and is not removed."""
    rgb16 = rgb.astype(np.int16)
    r, g, b = rgb16[..., 0], rgb16[..., 1], rgb16[..., 2]
    top = rgb16.max(axis=-1)
    saturation = (top - rgb16.min(axis=-1)) / np.maximum(top, 1)
    low_red = (saturation >= min_saturation) & (g > r + green_margin)
    deep_blue = (b > r + blue_margin) & (b > g + blue_margin)
    return low_red | deep_blue | (top < dark_value)


def _remove_small(mask: np.ndarray, area_px: float, holes: bool) -> np.ndarray:
    """skimage's remove_small_objects/holes for areas strictly below ``area_px`` (old and new keywords)."""
    size = int(np.ceil(area_px)) - 1  # remove areas <= size, i.e. < area_px
    if size < 1:
        return mask
    fn = remove_small_holes if holes else remove_small_objects
    if "max_size" in inspect.signature(fn).parameters:  # scikit-image >= 0.26
        return fn(mask, max_size=size)
    return fn(mask, size + 1)  # older: min_size / area_threshold remove areas strictly below it


def _ellipse(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _feature(rgb: np.ndarray, method: str) -> np.ndarray:
    """Per-pixel tissue evidence as float32 0-255, high on tissue."""
    if method == "otsu_saturation":
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1].astype(np.float32)
    return 255.0 - cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)


def _flatten(feature: np.ndarray, background: np.ndarray, max_samples: int = 50_000) -> np.ndarray:
    """Subtract a quadratic surface fitted to the background pixels (uneven illumination, gradients)."""
    ys, xs = np.nonzero(background)
    if ys.size < 50:  # too little glass to fit: nothing to flatten against
        return feature
    if ys.size > max_samples:  # a fixed stride keeps the fit deterministic and cheap
        step = ys.size // max_samples + 1
        ys, xs = ys[::step], xs[::step]
    h, w = feature.shape

    def design(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x, y = x / max(w - 1, 1) - 0.5, y / max(h - 1, 1) - 0.5
        return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1)

    values = feature[ys, xs].astype(np.float64)
    coef, *_ = np.linalg.lstsq(design(xs.astype(np.float64), ys.astype(np.float64)), values, rcond=None)
    # the surface over the whole image from a row and a column (float32, broadcast): a 2048-px image needs
    # one image-sized array, not six float64 design columns
    c = coef.astype(np.float32)
    x = (np.arange(w, dtype=np.float32) / max(w - 1, 1) - 0.5)[None, :]
    y = (np.arange(h, dtype=np.float32) / max(h - 1, 1) - 0.5)[:, None]
    surface = c[0] + c[1] * x + c[2] * y + c[3] * x * x + c[4] * x * y + c[5] * y * y
    # extrapolation under the tissue stays within the range seen on the glass
    np.clip(surface, values.min(), values.max(), out=surface)
    return (feature - surface + np.float32(np.median(values))).astype(np.float32)


def _thresholds(
    feature: np.ndarray, valid: np.ndarray, white: np.ndarray, min_contrast: float
) -> tuple[float, float, np.ndarray] | None:
    """Otsu's threshold over the valid pixels, floored by the glass noise, and the glass pixels used for the
    floor; None when nothing stands out.

    Blank white pixels (padding, overexposed glass) take part in Otsu's split, where they are glass, but not
    in the noise estimate when other glass exists: a band of exact white beside real glass would make the
    glass look bimodal and its noise huge."""
    values = feature[valid]
    if float(values.max() - values.min()) < min_contrast:
        return None
    otsu = float(threshold_otsu(values))
    glass = valid & (feature <= otsu)
    if np.count_nonzero(glass & ~white) >= 16:
        glass &= ~white
    floor = _noise_floor(feature[glass], min_contrast)
    return max(otsu, floor), floor, glass


def _noise_floor(levels: np.ndarray, min_step: float) -> float:
    """The level the glass only exceeds by chance: median + max(5 robust SDs (1.4826 MAD), ``min_step``)."""
    median = float(np.median(levels))
    noise = 1.4826 * float(np.median(np.abs(levels - median)))
    return median + max(5.0 * noise, min_step)


def _texture(rgb: np.ndarray) -> np.ndarray:
    """Local standard deviation of the grey level over a TEXTURE_PX window (float32)."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    mean = cv2.blur(gray, (TEXTURE_PX, TEXTURE_PX))
    return np.sqrt(np.maximum(cv2.blur(gray * gray, (TEXTURE_PX, TEXTURE_PX)) - mean * mean, 0.0))


def _textured(texture: np.ndarray, glass: np.ndarray, min_texture: float) -> np.ndarray:
    """Broad areas with more texture than the glass's noise allows. Eroding by a whole window, then
    dilating by half of one, drops thin textured lines (bubble rims, scratches, the edge of ink) and the
    band of texture a window sees along every tissue edge, so neither can bridge tissue to the glass."""
    textured = (texture > _noise_floor(texture[glass], min_texture)).astype(np.uint8)
    half = TEXTURE_PX // 2
    return cv2.dilate(cv2.erode(textured, _ellipse(2 * half)), _ellipse(half)).astype(bool)


def _grow(seeds: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """The connected components (8-connected) of ``weak`` that hold a seed (hysteresis thresholding)."""
    count, labels = cv2.connectedComponents(weak.astype(np.uint8), connectivity=8)
    keep = np.zeros(count, bool)
    keep[np.unique(labels[seeds & weak])] = True
    keep[0] = False  # the label of everything outside ``weak``
    return keep[labels]


def _sizes(mpp: float | None, downsample: float, um: tuple, px: tuple) -> tuple[int, int, float, float]:
    """Opening and closing radii (px) and smallest object and hole areas (px^2) at the mask's resolution,
    from micrometres ``um`` (open, close, object, hole) or, without an mpp, from mask pixels ``px``."""
    if mpp is None:
        return int(px[0]), int(px[1]), float(px[2]), float(px[3])
    scale = mpp * downsample  # micrometres per mask pixel
    # at least a 3x3 kernel where a size was asked for: coarse masks still lose their one-pixel specks
    radii = [max(1, round(r / scale)) if r > 0 else 0 for r in um[:2]]
    return radii[0], radii[1], um[2] / scale**2, um[3] / scale**2


def _ink(rgb: np.ndarray, min_area_px: float) -> np.ndarray:
    """Marker ink blobs of at least ``min_area_px``, widened by their pale anti-aliased rims."""
    pen = _remove_small(pen_mask(rgb, PEN_MIN_SATURATION), min_area_px, holes=False)
    if pen.any():
        pen = cv2.dilate(pen.astype(np.uint8), _ellipse(PEN_MARGIN_PX)).astype(bool)
    return pen


def detect_tissue_image(
    rgb: np.ndarray,
    downsample: float,
    mpp: float | None,
    method: str = "otsu_saturation",
    *,
    open_um: float = 4.0,
    close_um: float = 16.0,
    min_object_um2: float = 10_000.0,
    min_hole_um2: float = 20_000.0,
    open_px: int = 1,
    close_px: int = 2,
    min_object_px: float = 64.0,
    min_hole_px: float = 256.0,
    min_contrast: float = 3.0,
    min_texture: float = 1.0,
    flatten: bool = True,
    exclude_pen: bool = True,
    pen_min_um2: float = 5_000.0,
    pen_min_px: float = 16.0,
    source: str = "image",
) -> TissueMask:
    """Tissue mask of an RGB image of a slide at ``downsample`` level-0 px per pixel (module docstring).

    ``mpp`` is the level-0 microns per pixel (None: morphology sizes are the ``*_px`` values, in mask pixels).
    ``min_contrast`` (feature units, 0-255) is the least step over the glass that lets a pixel join a seed;
    ``min_texture`` (grey levels of local SD) the least texture over the glass's that does.
    Ink blobs smaller than ``pen_min_um2`` (``pen_min_px`` without an mpp) are ignored: marker strokes are
    hundreds of micrometres wide, while clusters of dark nuclei or dye specks at fine mask resolutions are not
    ink and must not punch holes in the tissue. ``source`` names the slide in errors."""
    if method not in METHODS:
        raise ConfigError(f"tissue.method={method!r}: choose one of {list(METHODS)}")
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or min(rgb.shape[:2]) < 2:
        raise SlideError(
            f"{source}: tissue detection needs an HxWx3 uint8 RGB image, got {rgb.shape} {rgb.dtype}"
        )
    if mpp is None:
        log.info("%s has no mpp: tissue morphology sizes are the tissue.*_px values (mask pixels)", source)
    texture = _texture(rgb)  # before the blur, which would wipe out faint membranes
    rgb = cv2.medianBlur(rgb, MEDIAN_PX)
    sizes = _sizes(mpp, downsample, (open_um, close_um, min_object_um2, min_hole_um2),
                   (open_px, close_px, min_object_px, min_hole_px))  # fmt: skip
    pen_px = pen_min_px if mpp is None else pen_min_um2 / (mpp * downsample) ** 2
    pen = _ink(rgb, pen_px) if exclude_pen else np.zeros(rgb.shape[:2], bool)
    valid, white = ~pen, rgb.min(axis=-1) >= WHITE_VALUE
    if np.count_nonzero(valid) < 16:
        _no_tissue(
            source,
            method,
            f"only {np.count_nonzero(valid)} pixels of {rgb.shape[1]}x{rgb.shape[0]} are not ink",
        )
    feature = _feature(rgb, method)
    found = _thresholds(feature, valid, white, min_contrast)
    if found is not None and flatten:
        feature = _flatten(feature, found[2])
        found = _thresholds(feature, valid, white, min_contrast)
    if found is None:
        _no_tissue(source, method, "the image is uniform: no pixel stands out from the glass")
    high, floor, glass = found
    weak = (feature > floor) | _textured(texture, glass, min_texture)
    mask = _grow(feature > high, weak & valid)
    mask = _clean(mask, sizes) & valid  # hole filling must not bring the ink back
    if not mask.any():
        _no_tissue(source, method, f"nothing above the threshold {high:.1f} survived the cleaning")
    log.info("tissue of %s: %.1f%% (%s threshold %.1f)", source, 100 * mask.mean(), method, high)
    return TissueMask(mask, downsample)


def _clean(mask: np.ndarray, sizes: tuple[int, int, float, float]) -> np.ndarray:
    """Opening, closing, then removal of small objects and filling of small holes."""
    open_r, close_r, min_object, min_hole = sizes
    work = mask.astype(np.uint8)
    if open_r > 0:
        work = cv2.morphologyEx(work, cv2.MORPH_OPEN, _ellipse(open_r))
    if close_r > 0:
        work = cv2.morphologyEx(work, cv2.MORPH_CLOSE, _ellipse(close_r))
    return _remove_small(_remove_small(work.astype(bool), min_object, holes=False), min_hole, holes=True)


def _no_tissue(source: str, method: str, why: str) -> NoReturn:
    other = "otsu_gray" if method == "otsu_saturation" else "otsu_saturation"
    raise SlideError(
        f"no tissue found in {source} with tissue.method={method} ({why}). If the slide does hold tissue, "
        f"try tissue.method={other}, lower tissue.min_contrast or tissue.min_object_um2, or "
        "tissue.exclude_pen=false if the stain is unusual"
    )


def detect_tissue(slide, max_side: int = 2048, **options) -> TissueMask:
    """Tissue mask of an open ``Slide`` from its low-resolution view (``detect_tissue_image`` options)."""
    image, downsample = slide.low_resolution(max_side)
    return detect_tissue_image(image, downsample, slide.mpp, source=f"slide {slide.path}", **options)
