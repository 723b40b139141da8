"""Reading one image file as HxWx3 uint8 RGB, whatever its storage, or refusing it with a clear error.

Pathology and dermoscopy collections mix grayscale scans, palette PNGs, RGBA exports, CMYK and 16-bit TIFFs.
Everything with a clear RGB meaning is converted (alpha composited on white, 16 bits scaled by the dtype
range); anything else (float pixels, more than 4 channels, several pages, corrupt or truncated files) raises
``DatasetError`` naming the file, so a bad file stops a run at its first read instead of training on garbage.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from patholite.errors import DatasetError

_TIFF_SUFFIXES = (".tif", ".tiff")
# PIL modes that PIL itself converts to RGB faithfully (colour spaces, bilevel, 8-bit gray).
_PIL_TO_RGB = ("RGB", "L", "1", "CMYK", "YCbCr", "RGBX")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def shown(items: list, n: int = 5) -> str:
    """The first ``n`` items for an error message, and how many there are in all."""
    return ", ".join(map(str, items[:n])) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def headerless_rows(path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, stripped cells) of each non-blank row of a header-less CSV (a BOM is ignored)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            row = [v.strip() for v in row]
            if any(row):
                yield line_no, row


def require_path(path: str | Path, what: str, hint: str, directory: bool = False) -> Path:
    """``path`` as a Path if it exists (as a folder when ``directory``); else a DatasetError with ``hint``."""
    p = Path(path).expanduser()
    ok = p.is_dir() if directory else p.is_file()
    if not ok:
        kind = "folder" if directory else "file"
        found = " (it is a file)" if directory and p.exists() else " (it is a folder)" if p.exists() else ""
        raise DatasetError(f"{what}: expected the {kind} {p}, not found{found}. {hint}")
    return p


_CONVERT = "convert it to an 8-bit RGB, grayscale or RGBA PNG/JPEG/TIFF, or remove it from the dataset"
_RECOPY = "copy or download it again (the file is damaged), or remove it from the dataset"


def _refuse(path: str | Path, why: str, fix: str = _CONVERT) -> DatasetError:
    return DatasetError(f"cannot read image {path}: {why}; {fix}")


def _scale16(a: np.ndarray) -> np.ndarray:
    """uint16 -> uint8 by the dtype range (65535 -> 255), rounded."""
    return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite uint8 RGB over a white background by a uint8 alpha."""
    a = alpha.astype(np.float32)[..., None] / 255.0
    return np.rint(rgb.astype(np.float32) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _array_to_rgb(a: np.ndarray, path: str | Path, cmyk: bool = False) -> np.ndarray:
    """An HxW or HxWxC integer array (C <= 4) -> HxWx3 uint8 RGB."""
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = _scale16(a)
    elif a.dtype != np.uint8:
        raise _refuse(path, f"pixels are {a.dtype}; only 8- and 16-bit unsigned integers are supported")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise _refuse(path, f"pixel array of shape {a.shape}; expected HxW or HxWxC")
    if a.shape[2] > 4:
        raise _refuse(
            path, f"{a.shape[2]} channels; expected gray, gray+alpha, RGB, RGBA or CMYK (at most 4)"
        )
    c = a.shape[2]
    if cmyk and c == 4:
        # Naive CMYK -> RGB (no ICC profile): enough for classification, where colour is learnt anyway.
        cmy, k = a[..., :3].astype(np.float32) / 255.0, a[..., 3:].astype(np.float32) / 255.0
        return np.rint(255.0 * (1.0 - cmy) * (1.0 - k)).astype(np.uint8)
    if c == 1:
        return np.repeat(a, 3, axis=2)
    if c == 2:
        return _on_white(np.repeat(a[..., :1], 3, axis=2), a[..., 1])
    if c == 3:
        return np.ascontiguousarray(a)
    return _on_white(a[..., :3], a[..., 3])


def _pil_to_rgb(img: Image.Image, path: str | Path) -> np.ndarray:
    mode = img.mode
    if mode == "P":
        # A palette may carry transparency; go through RGBA so it is composited like any alpha.
        mode, img = (
            ("RGBA", img.convert("RGBA")) if "transparency" in img.info else ("RGB", img.convert("RGB"))
        )
    if mode in _ALPHA_MODES:
        rgba = np.asarray(img.convert("RGBA"))
        return _on_white(rgba[..., :3], rgba[..., 3])
    if mode in _PIL_TO_RGB:
        return np.ascontiguousarray(np.asarray(img.convert("RGB")))
    if mode.startswith("I;16"):
        return _array_to_rgb(np.asarray(img).astype(np.uint16), path)
    if mode == "I":
        # 32-bit int: older Pillow opens 16-bit PNGs this way; accept values a 16-bit image can hold.
        a = np.asarray(img)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise _refuse(path, "32-bit integer pixels outside the 16-bit range")
        return _array_to_rgb(a.astype(np.uint16), path)
    if mode == "F":
        raise _refuse(path, "floating-point pixels have no defined 8-bit scale")
    raise _refuse(path, f"PIL mode {mode!r} has no RGB meaning here")


def _read_tiff(path: str | Path) -> np.ndarray:
    """TIFFs PIL cannot open (unusual bit depths, planar layouts, extra channels), via tifffile."""
    try:
        with tifffile.TiffFile(path) as tif:
            if len(tif.series) != 1 or len(tif.series[0].levels) != 1 or len(tif.pages) != 1:
                raise _refuse(
                    path,
                    f"{len(tif.pages)} pages / {len(tif.series)} series; expected one image "
                    "(whole-slide images belong to the slide datasets)",
                )
            series = tif.series[0]
            axes, a = series.axes, series.asarray()
            cmyk = tif.pages[0].photometric == tifffile.PHOTOMETRIC.SEPARATED
    except DatasetError:
        raise
    except Exception as e:  # tifffile raises many types for broken files
        raise _refuse(path, f"not a readable TIFF ({type(e).__name__}: {e})", _RECOPY) from e
    if axes == "SYX" or (axes == "CYX" and a.shape[0] <= 4):
        a = np.moveaxis(a, 0, -1)  # planar channels -> channels last
    elif axes not in ("YX", "YXS", "YXC"):
        raise _refuse(path, f"TIFF axes {axes!r} with shape {a.shape}; expected a 2-D image")
    return _array_to_rgb(a, path, cmyk=cmyk)


def _writable(a: np.ndarray) -> np.ndarray:
    # np.asarray(PIL image) is a read-only view of its bytes; torch.from_numpy warns on those.
    return a if a.flags.writeable and a.flags.c_contiguous else np.array(a, order="C")


def read_rgb(path: str) -> np.ndarray:
    """The image at ``path`` as a writable HxWx3 uint8 RGB array; DatasetError if it cannot mean RGB."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"image {path} not found (was it moved or deleted after the split was read?)")
    try:
        with Image.open(p) as img:
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                raise _refuse(
                    path,
                    f"it holds {frames} frames/pages; expected a single image (a whole-slide image belongs "
                    "to the slide datasets)",
                )
            img.load()  # decode now: truncated and corrupt files fail here, not later
            return _writable(_pil_to_rgb(img, path))
    except DatasetError:
        raise
    except Image.DecompressionBombError as e:
        raise _refuse(path, f"too large for one image ({e})", "tile it, or use the slide datasets") from e
    except (OSError, ValueError, SyntaxError) as e:
        # UnidentifiedImageError is an OSError. PIL reports truncated/corrupt data as OSError and bad headers
        # as SyntaxError/ValueError; TIFFs it cannot decode (bit depths, layouts) get a second try.
        if p.suffix.lower() in _TIFF_SUFFIXES:
            return _writable(_read_tiff(p))
        if isinstance(e, UnidentifiedImageError):
            raise _refuse(
                path, "not an image format PIL recognises (corrupt, or not an image)", _RECOPY
            ) from e
        raise _refuse(path, f"corrupt or truncated ({e})", _RECOPY) from e


def probe_image(path: str) -> None:
    """Check, from its header alone, that ``path`` is one image ``read_rgb`` can convert; DatasetError if not.

    Cheap enough to run over a whole dataset before training: a wrong mode or a multi-page file then stops
    the run at start, not in a loader worker hours later. Damaged pixel data still shows only on decoding.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"image {path} not found")
    try:
        with Image.open(p) as img:
            frames, mode = getattr(img, "n_frames", 1), img.mode
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        read_rgb(path)  # PIL cannot even read the header: the full reader refuses clearly, or copes (TIFFs)
        return
    if frames > 1:
        raise _refuse(path, f"it holds {frames} frames/pages; expected a single image")
    known = (*_PIL_TO_RGB, *_ALPHA_MODES, "P", "I")
    if mode not in known and not mode.startswith("I;16"):
        if mode == "F":
            raise _refuse(path, "floating-point pixels have no defined 8-bit scale")
        raise _refuse(path, f"PIL mode {mode!r} has no RGB meaning here")
