"""Classical stain normalisation as data transforms (``dataset.stain_norm``): Macenko and Reinhard.

Both map an HxWx3 uint8 RGB tile toward a reference staining, at train and test time alike. The reference
is fitted once, on an image file (``dataset.stain_reference``) or on the training split (a seeded sample of
its tiles, pooled): the statistics the model was trained on, so a test tile is brought toward them.

- **Reinhard** (Reinhard et al. 2001, as used for H&E by later work): each channel of CIELAB (OpenCV's
  8-bit-free float conversion) is standardised per image and given the reference's mean and std.
- **Macenko** (Macenko et al. 2009): optical density ``OD = -ln((I + 1) / 240)`` (240: the bright
  background), pixels with any OD below 0.15 dropped as background, the plane of the two largest principal
  directions of the OD, the stain vectors at the 1st and 99th percentile of the angle in that plane
  (haematoxylin: the one with the larger red OD), densities by least squares, each stain's 99th percentile
  scaled to the reference's, and the tile re-rendered with the reference stain vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from patholite.errors import ConfigError

METHODS = ("macenko", "reinhard")
_IO = 240.0  # Macenko's background intensity
_BETA = 0.15  # OD below this in any channel: background
_ALPHA = 1.0  # percentile of the angle (and 100 - it) that picks the stain vectors
_MIN_TISSUE = 16  # fewer tissue pixels than this: a tile is left as it is (nothing to estimate from)
REFERENCE_TILES = 64  # training tiles pooled into the reference when no image is given


def _pixels(images: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(im, np.float64).reshape(-1, 3) for im in images])


# ------------------------------------------------------------------------------------------ Reinhard
def _lab(rgb: np.ndarray) -> np.ndarray:
    """Pixels (N,3) uint8-range RGB -> CIELAB (float32 conversion: no 8-bit rounding)."""
    rgb = np.asarray(rgb, np.float32).reshape(-1, 1, 3) / 255.0
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float64)


@dataclass
class Reinhard:
    """Reinhard colour transfer in CIELAB toward ``mean``/``std`` (3 each)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, images: Sequence[np.ndarray]) -> Reinhard:
        lab = _lab(_pixels(images))
        return cls(lab.mean(0), lab.std(0) + 1e-6)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        lab = _lab(image)
        lab = (lab - lab.mean(0)) / (lab.std(0) + 1e-6) * self.std + self.mean
        rgb = cv2.cvtColor(lab.astype(np.float32).reshape(-1, 1, 3), cv2.COLOR_LAB2RGB)
        return np.clip(rgb.reshape(image.shape) * 255.0 + 0.5, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- Macenko
def _od(rgb: np.ndarray) -> np.ndarray:
    return -np.log((np.asarray(rgb, np.float64).reshape(-1, 3) + 1.0) / _IO)


def macenko_vectors(rgb: np.ndarray) -> np.ndarray | None:
    """The two stain vectors (rows: haematoxylin, eosin; unit RGB OD) of an image's pixels, or None when
    too few pixels hold tissue."""
    od = _od(rgb)
    od = od[np.all(od > _BETA, axis=1)]
    if len(od) < _MIN_TISSUE:
        return None
    _, vecs = np.linalg.eigh(np.cov(od, rowvar=False))
    plane = vecs[:, 1:3]  # the two largest principal directions (eigh sorts ascending)
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [_ALPHA, 100 - _ALPHA])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    v1, v2 = v1 * np.sign(v1.sum() or 1.0), v2 * np.sign(v2.sum() or 1.0)  # OD vectors are positive
    h, e = (v1, v2) if v1[0] > v2[0] else (v2, v1)  # haematoxylin absorbs more red
    return np.stack([h / np.linalg.norm(h), e / np.linalg.norm(e)])


def _densities(rgb: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Per-pixel stain densities (N,2) of ``rgb`` under ``vectors`` (2,3), least squares."""
    return np.linalg.lstsq(vectors.T, _od(rgb).T, rcond=None)[0].T


@dataclass
class Macenko:
    """Macenko normalisation toward reference stain ``vectors`` (2,3) and 99th-percentile ``max_density``."""

    vectors: np.ndarray
    max_density: np.ndarray

    @classmethod
    def fit(cls, images: Sequence[np.ndarray]) -> Macenko:
        pixels = _pixels(images)
        vectors = macenko_vectors(pixels)
        if vectors is None:
            raise ConfigError(
                "dataset.stain_norm=macenko: the reference holds almost no stained tissue (optical density "
                f"above {_BETA} in every channel); give dataset.stain_reference=<an H&E tissue image>"
            )
        return cls(vectors, np.percentile(_densities(pixels, vectors), 99, axis=0))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        vectors = macenko_vectors(image)
        if vectors is None:  # background or blank: nothing to normalise
            return image
        dens = _densities(image, vectors)
        dens *= self.max_density / np.maximum(np.percentile(dens, 99, axis=0), 1e-6)
        rgb = _IO * np.exp(-dens @ self.vectors) - 1.0
        return np.clip(rgb.reshape(image.shape) + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- entry
def read_reference(path: str) -> np.ndarray:
    """The reference image ``dataset.stain_reference`` names, HxWx3 uint8 RGB."""
    file = Path(path).expanduser()
    image = cv2.imread(str(file), cv2.IMREAD_COLOR) if file.is_file() else None
    if image is None:
        raise ConfigError(
            f"dataset.stain_reference={path}: not a readable image file; give an RGB image of H&E tissue "
            "(PNG, JPEG, TIFF), or null to fit the reference on the training split"
        )
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def check_stain_norm(method: str | None) -> None:
    if method is not None and method not in METHODS:
        raise ConfigError(f"dataset.stain_norm={method!r} is not one of {', '.join(METHODS)} (or null: none)")


def fit_stain_norm(
    method: str | None, reference: str | None, train_images: Sequence[np.ndarray]
) -> Macenko | Reinhard | None:
    """The normaliser ``dataset.stain_norm`` asks for, fitted on ``reference`` (an image file) or, when
    None, on the training images given (a sample: the caller picks it)."""
    check_stain_norm(method)
    if method is None:
        if reference:
            raise ConfigError(
                f"dataset.stain_reference={reference} is set but dataset.stain_norm is null; set "
                f"dataset.stain_norm={'|'.join(METHODS)}, or drop the reference"
            )
        return None
    images = [read_reference(reference)] if reference else list(train_images)
    if not images:
        raise ConfigError(f"dataset.stain_norm={method}: no reference images to fit it on")
    return (Macenko if method == "macenko" else Reinhard).fit(images)


class StainNormalise:
    """A transform step (before ``ToTensorImage``): HxWx3 uint8 in, normalised HxWx3 uint8 out."""

    def __init__(self, normaliser: Macenko | Reinhard) -> None:
        self.normaliser = normaliser

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.normaliser(np.asarray(image, np.uint8))

    def __repr__(self) -> str:
        return f"StainNormalise({type(self.normaliser).__name__})"
