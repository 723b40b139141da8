"""Built-in synthetic histology: procedural H&E-like tiles of the four BACH classes, cached on disk.

A tile is drawn as two optical-density maps, haematoxylin (nuclei) and eosin (stroma, cytoplasm), which
Beer-Lambert mixing turns into RGB. What a tile shows follows a few latent tissue properties (nuclear atypia,
gland density, duct size, lumen filling, stromal infiltration and reaction); each class has a prototype of
them. ``difficulty`` blends a tile's latents toward a neighbouring class (Normal-Benign, InSitu-Invasive) and
strengthens the nuisances (stain, blur, noise): at 0 the classes are far apart, at 0.5 (the default) a small
ViT trained from scratch for 12 epochs on 400 tiles per class reaches about 85-90% test accuracy, at 1 they
overlap heavily. Results on these tiles check the pipeline; they say nothing about diagnostic quality."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from filelock import FileLock

from patholite.data.base import SPLITS, HistologyDataModule, ImageSet
from patholite.errors import ConfigError, DatasetError
from patholite.io import atomic_path
from patholite.progress import Progress

log = logging.getLogger(__name__)

SYNTHETIC_CLASSES = ["Normal", "Benign", "InSitu", "Invasive"]
# Bump whenever the drawing changes: it keys the cache, so old tiles are never mixed with new ones.
GENERATOR_VERSION = 1

# Latent tissue properties, each in [0, 1].
ATYPIA, GLANDS, DUCT_SIZE, FILL, INFILTRATION, STROMA_CELLS = range(6)
_PROTOTYPES = np.array(
    [
        [0.05, 0.12, 0.15, 0.00, 0.00, 0.10],  # Normal: few small regular glands in abundant stroma
        [0.20, 1.00, 0.30, 0.50, 0.00, 0.25],  # Benign: crowded, proliferative but orderly glands
        [0.65, 0.55, 0.95, 0.95, 0.00, 0.20],  # InSitu: large ducts filled with atypical cells
        [0.95, 0.03, 0.30, 0.60, 1.00, 0.85],  # Invasive: atypical nests and cords in reactive stroma
    ],
    dtype=np.float64,
)
# Which class a tile's latents drift toward under difficulty: the confusions pathologists make.
_NEIGHBOURS = np.array(
    [[0.0, 0.7, 0.1, 0.2], [0.6, 0.0, 0.3, 0.1], [0.1, 0.3, 0.0, 0.6], [0.1, 0.1, 0.8, 0.0]]
)

# Haematoxylin and eosin optical-density vectors of RGB (Macenko's reference stain matrix: a softer pink
# than Ruifrok's eosin, closer to real slides).
_H_VEC = np.array([0.5626, 0.7201, 0.4062])
_E_VEC = np.array([0.2159, 0.8012, 0.5581])
# The tissue field one tile shows, whatever its pixel size: the synthetic slides draw a tile as 256 px at
# 0.5 um/px, so a model trained on these tiles reads slides at TILE_FIELD_UM / tile_size um/px.
TILE_FIELD_UM = 128.0
_GREY = np.ones(3) / np.sqrt(3.0)  # the grey axis of OD space: turning a stain about it changes its hue only


@dataclass(frozen=True)
class StainShift:
    """Another lab's staining (``dataset.stain_shift``, test split only): both stain vectors turned by
    ``rotate_deg`` about the grey axis of optical density (a hue shift that keeps them positive up to 60
    degrees) and the haematoxylin and eosin densities scaled. The tiles' tissue is the same as unshifted:
    the same random draws, only rendered in other colours."""

    rotate_deg: float = 0.0
    scale_h: float = 1.0
    scale_e: float = 1.0

    @classmethod
    def from_config(cls, cfg) -> StainShift:
        """The shift ``dataset.stain_shift`` describes, checked (one clear error naming the key)."""
        shift = cls(float(cfg.rotate_deg), float(cfg.scale_h), float(cfg.scale_e))
        if not -60.0 <= shift.rotate_deg <= 60.0:
            raise ConfigError(
                f"dataset.stain_shift.rotate_deg={shift.rotate_deg} must lie in [-60, 60] degrees (beyond, "
                "the stain vectors turn negative: no staining does that)"
            )
        for key in ("scale_h", "scale_e"):
            value = getattr(shift, key)
            if not (math.isfinite(value) and 0.0 < value <= 4.0):
                raise ConfigError(f"dataset.stain_shift.{key}={value} must lie in (0, 4] (1: unchanged)")
        return shift

    @property
    def neutral(self) -> bool:
        return self.rotate_deg == 0.0 and self.scale_h == 1.0 and self.scale_e == 1.0

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """The haematoxylin and eosin OD vectors turned about the grey axis (Rodrigues' formula)."""
        cos, sin = math.cos(math.radians(self.rotate_deg)), math.sin(math.radians(self.rotate_deg))

        def turn(v: np.ndarray) -> np.ndarray:
            return v * cos + np.cross(_GREY, v) * sin + _GREY * (_GREY @ v) * (1 - cos)

        return turn(_H_VEC), turn(_E_VEC)


NO_SHIFT = StainShift()
_SUPERSAMPLE = 2  # draw at twice the size and downsample: smooth edges without anti-aliased float drawing
_BASE = 96.0  # lengths below are in pixels of a 96-px tile and scale with the size


# ------------------------------------------------------------------------------------------- latents
def sample_latents(rng: np.random.Generator, label: int, difficulty: float) -> np.ndarray:
    """A tile's latent tissue properties: its class prototype, blended toward a neighbour class."""
    other = rng.choice(4, p=_NEIGHBOURS[label])
    mix = difficulty * rng.random() ** 1.5  # mostly small; near 0.5 the tile could be either class
    z = (1 - mix) * _PROTOTYPES[label] + mix * _PROTOTYPES[other]
    z = z + rng.normal(0.0, 0.03 + 0.10 * difficulty, size=z.shape)
    return np.clip(z, 0.0, 1.0)


# ------------------------------------------------------------------------------------------- drawing
def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Roughly unit-variance noise varying over about ``cells`` blobs per side."""
    low = rng.standard_normal((cells + 1, cells + 1), np.float32)
    return cv2.resize(low, (n, n), interpolation=cv2.INTER_CUBIC)


def _blob(rng: np.random.Generator, centres, r, elong, angle, irreg, k: int = 12) -> np.ndarray:
    """Vertices (N,k,2) of irregular ellipses: radius ``r``, stretched ``elong``, wobbling ``irreg``."""
    centres = np.asarray(centres, np.float64).reshape(-1, 2)
    r, elong, angle, irreg = (
        np.broadcast_to(np.asarray(v, np.float64), len(centres))[:, None] for v in (r, elong, angle, irreg)
    )
    m = len(centres)
    t = np.linspace(0, 2 * np.pi, k, endpoint=False)[None, :]
    wobble = 1 + irreg * (
        rng.uniform(-1, 1, (m, 1)) * np.cos(2 * t + rng.uniform(0, 6.3, (m, 1)))
        + rng.uniform(-1, 1, (m, 1)) * np.cos(3 * t + rng.uniform(0, 6.3, (m, 1)))
    )
    px, py = r * wobble * np.cos(t) * elong, r * wobble * np.sin(t) / elong
    ca, sa = np.cos(angle), np.sin(angle)
    return np.stack([px * ca - py * sa, px * sa + py * ca], axis=-1) + centres[:, None, :]


def _fill(layer: np.ndarray, polys: np.ndarray, value: float) -> None:
    """Fill polygons (N,k,2) in float pixels, with 2 fractional bits of sub-pixel precision."""
    cv2.fillPoly(layer, list(np.round(polys * 4).astype(np.int32)), float(value), cv2.LINE_8, 2)


def _hex_points(rng: np.random.Generator, centre, radius: float, spacing: float, jitter: float) -> np.ndarray:
    """A jittered hexagonal grid of points within ``radius`` of ``centre``: packed, barely touching cells."""
    k = int(radius / spacing) + 1
    iy, ix = np.mgrid[-k : k + 1, -k : k + 1].astype(np.float64)
    pts = np.stack([(ix + 0.5 * (iy % 2)) * spacing, iy * spacing * 0.866], -1).reshape(-1, 2)
    pts += rng.uniform(0, spacing, 2) + rng.normal(0, jitter * spacing, pts.shape)
    return pts[np.hypot(pts[:, 0], pts[:, 1]) < radius] + centre


def _nuclear_radius(atypia: float) -> float:
    """Mean nuclear radius in 96-px-tile pixels: atypical (malignant) nuclei are larger."""
    return 1.5 + 2.1 * atypia


class _Canvas:
    """The optical-density maps of one tile being drawn, supersampled: haematoxylin of everything but
    nuclei, nuclei (textured at the end), eosin. Lengths are in pixels of a 96-px tile times ``u``."""

    def __init__(self, rng: np.random.Generator, size: int, z: np.ndarray) -> None:
        self.rng, self.z = rng, z
        self.n = n = size * _SUPERSAMPLE
        self.u = n / _BASE
        self.nuc = np.zeros((n, n), np.float32)
        self.haem, self.eosin = self._stroma()
        self.free = np.ones((n, n), bool)  # stroma, where stromal and invasive cells may sit

    def _stroma(self) -> tuple[np.ndarray, np.ndarray]:
        """Pink collagen in streaky bundles (white noise smeared along a line), pale oedematous patches."""
        rng, n, u, cells = self.rng, self.n, self.u, self.z[STROMA_CELLS]
        length = int(rng.uniform(8, 16) * u) | 1
        kernel = np.zeros((length, length), np.float32)
        kernel[length // 2, :] = 1.0 / length
        rot = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), rng.uniform(0, 180), 1.0)
        kernel = cv2.warpAffine(kernel, rot, kernel.shape)
        streaks = cv2.filter2D(rng.standard_normal((n, n), np.float32), -1, kernel)
        streaks = cv2.GaussianBlur(streaks, (0, 0), 0.6 * u)
        fibres = np.clip(0.5 + streaks / (3 * streaks.std() + 1e-6), 0, 1)
        eosin = rng.uniform(0.4, 0.65) * (1 + 0.25 * cells) * (0.55 + 0.8 * fibres)
        eosin *= 1 + 0.15 * _smooth_noise(rng, n, 5)
        eosin *= 1 - 0.55 / (1 + np.exp(-3 * (_smooth_noise(rng, n, 2) - rng.uniform(0.8, 2.5))))
        haem = np.full((n, n), 0.03 + 0.10 * cells, np.float32)  # desmoplastic stroma takes more haematoxylin
        return haem, np.clip(eosin, 0.05, None).astype(np.float32)

    def fat(self) -> None:
        """Adipocytes: empty, slightly polygonal fat cells with thin septa."""
        rng, u = self.rng, self.u
        cells = _hex_points(rng, rng.uniform(0, self.n, 2), self.n * rng.uniform(0.2, 0.5), 15 * u, 0.08)
        polys = _blob(rng, cells, 7.3 * u, 1.05, rng.uniform(0, 3, len(cells)), 0.06)
        _fill(self.eosin, polys, 0.02)
        _fill(self.haem, polys, 0.0)

    def nuclei(
        self,
        centres: np.ndarray,
        atypia: float,
        od: float = 1.0,
        radius: float | None = None,
        elong: float = 1.15,
    ) -> None:
        """Nuclei at ``centres`` (N,2); atypia makes them larger, varied, irregular, darker, nucleolated."""
        rng, m = self.rng, len(centres)
        if m == 0:
            return
        scale = np.clip(rng.normal(1, 0.06 + 0.3 * atypia, m), 0.5, 2)
        r = (radius or _nuclear_radius(atypia)) * self.u * scale
        el = 1 + np.abs(rng.normal(elong - 1, 0.08 + 0.2 * atypia, m))
        polys = _blob(rng, centres, r, el, rng.uniform(0, np.pi, m), 0.04 + 0.28 * atypia)
        ods = od * (1 + 0.7 * atypia) * np.clip(rng.normal(1, 0.05 + 0.18 * atypia, m), 0.6, 1.6)
        for poly, value in zip(polys, ods, strict=True):  # one call per nucleus: each has its own darkness
            _fill(self.nuc, poly[None], value)
        if atypia > 0.45:
            pick = rng.random(m) < atypia - 0.3
            for (x, y), rr in zip(centres[pick], r[pick], strict=True):
                cv2.circle(self.nuc, (int(x), int(y)), max(1, int(0.3 * rr)), float(od * 2.2), -1)

    def place_glands(self) -> list[tuple[float, float, float]]:
        """Centres and radii of non-overlapping glands covering the tile's share of glandular tissue."""
        rng, n, z = self.rng, self.n, self.z
        radius = (8 + 26 * z[DUCT_SIZE]) * self.u
        expected = 0.7 * z[GLANDS] * n * n / (np.pi * radius**2)
        count = max(int(expected + rng.random()), int(expected > 0.5))
        glands: list[tuple[float, float, float]] = []
        for _ in range(count * 10):
            if len(glands) == count:
                break
            r = radius * rng.uniform(0.75, 1.25)
            # small glands may be cut by the tile edge; large ducts keep about half in view or more
            span = max(0.2 * n, 0.5 * n + 0.2 * r - 0.5 * r * r / (0.3 * n))
            cx, cy = rng.uniform(0.5 * n - span, 0.5 * n + span, 2)
            if all(math.hypot(cx - x, cy - y) > r + q for x, y, q in glands):
                glands.append((cx, cy, r))
        mask = np.ones((n, n), np.uint8)
        for cx, cy, r in glands:
            cv2.circle(mask, (int(cx), int(cy)), int(r + 2 * self.u), 0, -1)
        self.free = mask.astype(bool)
        return glands

    def gland(self, cx: float, cy: float, radius: float) -> None:
        """A gland or duct: basement membrane with myoepithelium, epithelium, and a lumen that fills (solid,
        cribriform, comedo necrosis) as proliferation grows."""
        rng, u, a, fill = self.rng, self.u, self.z[ATYPIA], self.z[FILL]
        nd = _nuclear_radius(a) * 2 * u
        elong, angle = rng.uniform(1.0, 1.35), rng.uniform(0, np.pi)
        outline = _blob(rng, (cx, cy), radius, elong, angle, 0.05 + 0.12 * a, k=24)
        lumen_r = max(0.0, radius - nd * 1.3 - fill * max(0.0, radius - nd * 1.3))
        _fill(self.eosin, outline, rng.uniform(0.25, 0.38))
        _fill(self.haem, outline, 0.08 + 0.1 * a)
        poly = list(np.round(outline * 4).astype(np.int32))
        membrane = float(rng.uniform(0.9, 1.2))  # dense eosinophilic basement membrane
        cv2.polylines(self.eosin, poly, True, membrane, max(1, int(1.2 * u)), cv2.LINE_8, 2)
        # epithelial nuclei on a hex grid between membrane and lumen, drawn in the gland's stretched frame
        pts = _hex_points(rng, (0, 0), radius - 0.55 * nd, nd * (1.25 - 0.2 * a), 0.05 + 0.2 * a)
        pts = pts[np.hypot(pts[:, 0], pts[:, 1]) > lumen_r + 0.5 * nd] * (elong, 1 / elong)
        rot = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
        self.nuclei(pts @ rot + (cx, cy), a)
        # myoepithelial cells: flat dark nuclei along the membrane, the mark of an intact boundary
        ring = outline[0, rng.choice(24, size=8, replace=False)]
        self.nuclei(ring, 0.0, od=1.1, radius=1.3, elong=2.2)
        if lumen_r > 0:
            lumen = _blob(rng, (cx, cy), lumen_r, elong, angle, 0.08)
            for layer, value in ((self.haem, 0.01), (self.eosin, rng.uniform(0.02, 0.12)), (self.nuc, 0.0)):
                _fill(layer, lumen, value)
        if fill > 0.6 and radius > 12 * u:
            if rng.random() < 0.35:  # comedo necrosis: pink debris with nuclear dust in the centre
                rr = int(radius * rng.uniform(0.25, 0.45))
                cv2.circle(self.eosin, (int(cx), int(cy)), rr, float(rng.uniform(0.5, 0.7)), -1)
                cv2.circle(self.nuc, (int(cx), int(cy)), rr, 0.0, -1)
                for x, y in rng.normal(0, rr * 0.5, (int(rr * 0.8), 2)) + (cx, cy):
                    cv2.circle(self.nuc, (int(x), int(y)), max(1, int(0.5 * u)), 1.3, -1)
            else:  # cribriform: punched-out secondary lumens
                for _ in range(rng.integers(1, 6)):
                    d, t = rng.uniform(0, radius - nd * 1.5), rng.uniform(0, 2 * np.pi)
                    c = (int(cx + d * np.cos(t)), int(cy + d * np.sin(t)))
                    rr = int(rng.uniform(0.6, 1.3) * nd)
                    for layer, value in ((self.haem, 0.01), (self.eosin, 0.05), (self.nuc, 0.0)):
                        cv2.circle(layer, c, rr, float(value), -1)

    def infiltrate(self) -> None:
        """Invasive carcinoma: atypical nests, single-file cords and lone cells in the stroma, unbounded."""
        rng, u, n = self.rng, self.u, self.n
        a = max(self.z[ATYPIA], 0.3)
        nd = _nuclear_radius(a) * 2 * u
        for _ in range(rng.poisson(22 * self.z[INFILTRATION] ** 1.5)):
            for _try in range(4):  # start in the stroma: invasion surrounds ducts, it is not inside them
                cx, cy = rng.uniform(0, n, 2)
                if self.free[int(cy), int(cx)]:
                    break
            kind, c = rng.random(), (int(cx), int(cy))
            if kind < 0.45:  # nest, often with a retraction cleft around it
                rad = nd * rng.uniform(0.9, 2.2)
                if rng.random() < 0.5:
                    cv2.circle(self.eosin, c, int(rad + 1.5 * u), 0.08, -1)
                cv2.circle(self.eosin, c, int(rad), float(rng.uniform(0.4, 0.55)), -1)  # eosinophilic cells
                cv2.circle(self.haem, c, int(rad), 0.06, -1)
                centres = _hex_points(rng, (cx, cy), rad, nd * 1.25, 0.2)
            elif kind < 0.75:  # cord: cells in single file
                t, k = rng.uniform(0, np.pi), rng.integers(3, 8)
                centres = (cx, cy) + np.arange(k)[:, None] * nd * 1.15 * (np.cos(t), np.sin(t))
                centres += rng.normal(0, 0.5 * u, (k, 2))
                ends = [tuple(int(v) for v in centres[i]) for i in (0, -1)]
                cv2.line(self.eosin, ends[0], ends[1], 0.45, int(nd * 1.2))
            else:  # single cell with a rim of cytoplasm
                centres = np.array([[cx, cy]])
                cv2.circle(self.eosin, c, int(nd * 0.9), 0.45, -1)
            self.nuclei(centres, a)

    def stromal_cells(self) -> None:
        """Fibroblasts (thin spindles) and lymphocytes (small dark dots), more where the stroma reacts."""
        rng, cells = self.rng, self.z[STROMA_CELLS]
        for count, radius, elong, od in (
            (rng.poisson(4 + 14 * cells), 1.2, 2.6, 0.9),
            (rng.poisson(1 + 30 * cells**2), 1.4, 1.05, 1.5),
        ):
            pts = rng.uniform(0, self.n, (count, 2))
            self.nuclei(pts[self.free[pts[:, 1].astype(int), pts[:, 0].astype(int)]], 0.0, od, radius, elong)

    def optical_density(self) -> tuple[np.ndarray, np.ndarray]:
        """Haematoxylin and eosin maps, nuclei included, with chromatin texture (coarser when atypical)."""
        grain = self.rng.standard_normal((self.n, self.n), np.float32)
        chromatin = 1 + np.float32(0.15 + 0.3 * self.z[ATYPIA]) * grain
        return self.haem + cv2.GaussianBlur(self.nuc, (0, 0), 0.5 * self.u) * chromatin, self.eosin


def _to_rgb(
    rng: np.random.Generator,
    haem: np.ndarray,
    eosin: np.ndarray,
    size: int,
    difficulty: float,
    shift: StainShift = NO_SHIFT,
) -> np.ndarray:
    """Beer-Lambert mixing with per-tile stain vectors and strengths, then optics: blur and sensor noise."""
    spread, tilt = 0.10 + 0.25 * difficulty, 0.02 + 0.05 * difficulty
    base_h, base_e = shift.vectors()
    haem, eosin = haem * np.float32(shift.scale_h), eosin * np.float32(shift.scale_e)
    h_vec, e_vec = base_h + rng.normal(0, tilt, 3), base_e + rng.normal(0, tilt, 3)
    stains = np.stack([h_vec / np.linalg.norm(h_vec), e_vec / np.linalg.norm(e_vec)], 1).astype(np.float32)
    gain_h, gain_e = rng.uniform(1 - spread, 1 + spread), rng.uniform(1 - spread, 1 + spread)
    amounts = cv2.merge([haem * gain_h, eosin * gain_e])
    od = cv2.transform(amounts, stains)  # (n,n,2) stain amounts -> (n,n,3) RGB optical density
    od += rng.uniform(0.0, 0.08)  # faint grey absorbance of glass and mountant
    rgb = cv2.resize(np.exp(-od, out=od), (size, size), interpolation=cv2.INTER_AREA)
    rgb = cv2.GaussianBlur(rgb, (0, 0), rng.uniform(0.2, 0.4 + 0.8 * difficulty) * size / _BASE)
    rgb = rgb * 255 + (1.5 + 4 * difficulty) * rng.standard_normal(rgb.shape, np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def generate_tile(
    rng: np.random.Generator, label: int, size: int, difficulty: float, shift: StainShift = NO_SHIFT
) -> np.ndarray:
    """One HxWx3 uint8 H&E-like tile of class ``label`` (an index into ``SYNTHETIC_CLASSES``), stained as
    ``shift`` says."""
    canvas = _Canvas(rng, size, sample_latents(rng, label, difficulty))
    z = canvas.z
    if rng.random() < 0.1 + 0.45 * (1 - z[GLANDS]) * (1 - z[ATYPIA]):  # fat: any class, most in normal breast
        canvas.fat()
    glands = canvas.place_glands()
    canvas.stromal_cells()
    canvas.infiltrate()
    for gland in glands:
        canvas.gland(*gland)
    return _to_rgb(rng, *canvas.optical_density(), size, difficulty, shift)


def generate_split(
    n_per_class: int, size: int, difficulty: float, seed: int, shift: StainShift = NO_SHIFT
) -> tuple[np.ndarray, np.ndarray]:
    """``n_per_class`` tiles per class in seeded, shuffled order: images (N,H,W,3) uint8, labels int64."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(SYNTHETIC_CLASSES), dtype=np.int64), n_per_class))
    images = np.empty((len(labels), size, size, 3), np.uint8)
    with Progress(f"synthetic {size}-px tiles", len(labels), "tiles") as progress:
        for i, label in enumerate(labels):
            images[i] = generate_tile(rng, int(label), size, difficulty, shift)
            progress.advance()
    return images, labels


# ------------------------------------------------------------------------------------------- cache
def split_seed(seed: int, split: str) -> int:
    """A seed per split derived from the dataset seed, so splits never share tiles."""
    return int(np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(1)[0])


def cache_path(
    cache_dir: Path,
    split: str,
    n_per_class: int,
    size: int,
    difficulty: float,
    seed: int,
    shift: StainShift = NO_SHIFT,
) -> Path:
    """The split's cache file, named by a hash of everything that determines its tiles."""
    key = [GENERATOR_VERSION, split, n_per_class, size, round(float(difficulty), 6), seed]
    if not shift.neutral:  # unshifted splits keep the names they always had
        key.append([round(v, 6) for v in (shift.rotate_deg, shift.scale_h, shift.scale_e)])
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    return cache_dir / f"synthetic-{split}-{digest}.npz"


def _read_cache(path: Path, n: int, size: int, warn: bool) -> ImageSet | None:
    """The cached split, or None when the file is missing or does not hold what it should."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            images, labels = data["images"], data["labels"]
        if images.shape != (n, size, size, 3) or images.dtype != np.uint8 or labels.shape != (n,):
            raise ValueError(f"it holds images {images.dtype}{images.shape}, labels {labels.shape}")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        if warn:
            log.warning("synthetic tile cache %s is unreadable (%s); generating it again", path, err)
        return None
    return ImageSet(images=images, labels=labels)


def load_or_generate(
    cache_dir: Path,
    split: str,
    n_per_class: int,
    size: int,
    difficulty: float,
    seed: int,
    shift: StainShift = NO_SHIFT,
) -> ImageSet:
    """The split from the cache, generated (once, under a file lock shared by parallel jobs) if absent."""
    path = cache_path(cache_dir, split, n_per_class, size, difficulty, seed, shift)
    n = n_per_class * len(SYNTHETIC_CLASSES)
    cached = _read_cache(path, n, size, warn=False)  # the common case: no lock needed, writes are atomic
    if cached is not None:
        return cached
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            cached = _read_cache(path, n, size, warn=True)  # another job may have written it meanwhile
            if cached is not None:
                return cached
            log.info("generating %d synthetic %s tiles into %s", n, split, path)
            images, labels = generate_split(n_per_class, size, difficulty, split_seed(seed, split), shift)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, images=images, labels=labels)  # uncompressed: loads in a blink, tiles are small
    except OSError as err:
        raise DatasetError(
            f"dataset=synthetic: cannot write the tile cache {path} ({err}); "
            "set dataset.cache_dir=<a writable folder>"
        ) from err
    return ImageSet(images=images, labels=labels)


class SyntheticDataModule(HistologyDataModule):
    """Procedural H&E-like tiles of the four BACH classes, generated once per configuration into a cache."""

    def default_class_names(self) -> list[str]:
        return list(SYNTHETIC_CLASSES)

    def tile_geometry(self) -> dict[str, float | int | None]:
        return {"mpp": self.cfg.mpp or TILE_FIELD_UM / self.cfg.tile_size, "tile_size": self.cfg.tile_size}

    def per_class(self, split: str) -> int:
        """Tiles per class of ``split``; a ``max_samples_per_split`` cap generates only what it keeps."""
        n = int(getattr(self.cfg, f"{split}_per_class"))
        if self.cfg.max_samples_per_split:
            n = min(n, math.ceil(self.cfg.max_samples_per_split / len(SYNTHETIC_CLASSES)))
        return n

    def read_splits(self) -> dict[str, ImageSet]:
        cfg = self.cfg
        if not 0.0 <= cfg.difficulty <= 1.0:
            raise ConfigError(f"dataset.difficulty={cfg.difficulty} must lie in [0, 1]")
        if cfg.tile_size < 16:
            raise ConfigError(
                f"dataset.tile_size={cfg.tile_size} is too small to draw tissue; use 16 or more"
            )
        shift = StainShift.from_config(cfg.stain_shift)
        splits = {}
        for split in SPLITS:
            if self.per_class(split) < 1:
                raise ConfigError(f"dataset.{split}_per_class={self.per_class(split)} must be at least 1")
            cache_dir = Path(cfg.cache_dir).expanduser()
            splits[split] = load_or_generate(
                cache_dir,
                split,
                self.per_class(split),
                cfg.tile_size,
                cfg.difficulty,
                cfg.seed,
                shift if split == "test" else NO_SHIFT,  # another lab's staining: the test split only
            )
        return splits
