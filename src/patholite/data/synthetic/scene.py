"""Scene and rendering of synthetic whole-slide images (the files and truth: ``data.synthetic.slides``).

A scene is vector geometry in level-0 pixels: tissue pieces, lesions placed inside them, and the nuisances
(faint fat, folds, air bubbles, pen strokes, uneven illumination). The renderer draws any region of it at any
power-of-two downsample from a small per-slide bank of synthetic tissue tiles per class
(``data.synthetic.tiles.generate_tile``), pre-downsampled per level, so no level is ever held whole. Each
part of the scene draws from its own random stream, so switching a nuisance off leaves the rest unchanged."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np
from numpy.typing import ArrayLike

from patholite.data.synthetic.spec import SlideSpec
from patholite.data.synthetic.tiles import SYNTHETIC_CLASSES, generate_tile
from patholite.errors import ConfigError
from patholite.wsi.annotations import Annotation, rasterize

_INKS = ((0.30, 0.42, 0.85), (0.32, 0.68, 0.42), (0.20, 0.20, 0.24))  # blue, green, black transmission
_FAT_PALENESS = 0.8  # share of the absorbance fat removes: very pale, still tissue
_SHIFT = 4  # cv2 drawing: fractional bits of the vertices (1/16 px)


# ------------------------------------------------------------------------------------------------ geometry
def polygon_area(poly: np.ndarray) -> float:
    """Area of a closed polygon (shoelace formula)."""
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _blob(rng: np.random.Generator, elong: float, angle: float, wobble: float, n: int) -> np.ndarray:
    """A smooth irregular closed outline around (0, 0), radius about 1: an ellipse with radial harmonics."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    for k in range(2, 8):
        r += wobble * rng.uniform(0, 1) / k**0.8 * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    x, y = r * np.cos(t) * elong, r * np.sin(t) / elong
    ca, sa = math.cos(angle), math.sin(angle)
    return np.stack([x * ca - y * sa, x * sa + y * ca], axis=1)


def _with_area(poly: np.ndarray, area: float) -> np.ndarray:
    return poly * math.sqrt(area / polygon_area(poly))


def _curve(rng: np.random.Generator, start, angle: float, length: float, bend: float, n: int = 24):
    """A smooth open polyline from ``start``: a heading that drifts by up to ``bend`` radians overall."""
    turns = np.cumsum(rng.normal(0, bend / math.sqrt(n), n))
    step = length / n
    pts = np.cumsum(np.stack([np.cos(angle + turns), np.sin(angle + turns)], 1) * step, axis=0)
    return np.vstack([[0.0, 0.0], pts]) + np.asarray(start, np.float64)


def _tissue_pieces(spec: SlideSpec, rng: np.random.Generator) -> list[np.ndarray]:
    """Irregular tissue pieces, one per grid cell (so they never overlap), totalling the target area."""
    w, h, k = spec.width, spec.height, spec.tissue_pieces
    cols = max(1, min(k, round(math.sqrt(k * w / h))))
    rows = math.ceil(k / cols)
    cw, ch = w / cols, h / rows
    area = spec.tissue_fraction * w * h / k
    pieces = []
    for cell in sorted(rng.permutation(rows * cols)[:k]):
        r, c = divmod(int(cell), cols)
        for attempt in range(40):  # calmer shapes on each retry: a big share needs a plain ellipse
            calm = 1 - attempt / 40
            elong = math.sqrt(cw / ch) * rng.uniform(1 - 0.1 * calm, 1 + 0.1 * calm)
            poly = _with_area(_blob(rng, elong, rng.normal(0, 0.2 * calm), 0.45 * calm, 720), area)
            lo, hi = poly.min(0), poly.max(0)
            slack = np.array([cw, ch]) * 0.96 - (hi - lo)
            if (slack >= 0).all():
                origin = np.array([c * cw, r * ch]) + 0.02 * np.array([cw, ch]) + rng.uniform(0, 1, 2) * slack
                pieces.append(poly - lo + origin)
                break
        else:
            most = 0.96**2 * math.pi / 4 * k / (rows * cols)
            raise ConfigError(
                f"synthetic slide: tissue_fraction={spec.tissue_fraction} does not fit in tissue_pieces={k} "
                f"on a {w}x{h} slide; use tissue_fraction <= {most:.2f} or change tissue_pieces"
            )
    return pieces


def _rasterize(polys: list[np.ndarray], groups: list[str], spec: SlideSpec, background: int | None):
    anns = [Annotation(f"r{i}", g, p) for i, (g, p) in enumerate(zip(groups, polys, strict=True))]
    dims = (spec.width, spec.height)
    return rasterize(anns, SYNTHETIC_CLASSES, dims, spec.truth_downsample, background=background)[0]


def _place_lesions(
    spec: SlideSpec, rng: np.random.Generator, tissue: np.ndarray
) -> list[tuple[str, float, np.ndarray]]:
    """Lesion outlines inside the tissue, apart from each other, largest first (they need the most room)."""
    ds, um = spec.truth_downsample, spec.mpp
    free = tissue.astype(np.uint8)
    widest = 2 * float(cv2.distanceTransform(free, cv2.DIST_L2, 5).max()) * ds * um
    items = []
    for i, les in enumerate(spec.lesions):
        if les.count and les.diameter_um[1] > widest:
            raise ConfigError(
                f"synthetic slide: lesions[{i}].diameter_um={tuple(les.diameter_um)} reaches "
                f"{les.diameter_um[1]} um but the widest tissue piece is about {widest:.0f} um across; lower "
                "diameter_um, or raise tissue_fraction / width / height, or lower tissue_pieces"
            )
        items += [(i, les.cls, float(rng.uniform(*les.diameter_um))) for _ in range(les.count)]
    placed = []
    for i, cls, d_um in sorted(items, key=lambda item: -item[2]):
        d_px = d_um / um
        poly = _with_area(
            _blob(rng, rng.uniform(1, 1.35), rng.uniform(0, np.pi), 0.3, 160), math.pi * d_px**2 / 4
        )
        reach = float(np.hypot(*poly.T).max()) / ds + 1.5  # keep a margin of map pixels to glass and others
        room = np.flatnonzero(cv2.distanceTransform(free, cv2.DIST_L2, 5) > reach)
        if not len(room):
            raise ConfigError(
                f"synthetic slide: lesions[{i}] ({cls}, {d_um:.0f} um) does not fit in the tissue left after "
                f"the other lesions; lower lesions[*].count or diameter_um, or raise tissue_fraction"
            )
        y, x = divmod(int(room[rng.integers(len(room))]), free.shape[1])
        poly = poly + ((x + 0.5) * ds, (y + 0.5) * ds)
        cv2.fillPoly(free, [np.round(poly / ds - 0.5).astype(np.int32)], 0)
        placed.append((cls, d_um, poly))
    return placed


def _rng(spec: SlideSpec, stream: int) -> np.random.Generator:
    """One random stream per part of the scene: switching a nuisance off leaves the rest unchanged."""
    return np.random.default_rng(np.random.SeedSequence([spec.seed, stream]))


@dataclass
class Scene:
    """Everything drawn on a slide, as vector geometry in level-0 pixels."""

    tissue: list[np.ndarray]
    lesions: list[tuple[str, float, np.ndarray]]  # class, diameter (um), polygon
    fat: list[np.ndarray] = field(default_factory=list)
    folds: list[tuple[np.ndarray, float]] = field(default_factory=list)  # polyline, width
    bubbles: list[tuple[float, float, float]] = field(default_factory=list)  # x, y, radius
    # line, width, ink, opacity
    pens: list[tuple[np.ndarray, float, tuple, float]] = field(default_factory=list)
    glass: np.ndarray = field(default_factory=lambda: np.full(3, 0.95, np.float32))  # lit glass, 0..1
    light: tuple = (0.0, 0.5, 0.5, 0.0, 0.0)  # vignetting, its centre u, v, and gradients along u, v


def _add_nuisances(spec: SlideSpec, s: Scene, tissue: np.ndarray) -> None:
    """Faint fat at tissue edges, folds across tissue, bubbles anywhere, pen arcs on glass round tissue."""
    w, h, short = spec.width, spec.height, min(spec.width, spec.height)
    centres = [p.mean(0) for p in s.tissue]
    reach = [float(np.hypot(*(p - c).T).max()) for p, c in zip(s.tissue, centres, strict=True)]
    rng = _rng(spec, 3)
    for p, c, e in zip(s.tissue, centres, reach, strict=True):
        for _ in range(rng.integers(1, 3) if spec.faint_fat else 0):
            edge = p[rng.integers(len(p))]
            blob = (
                _blob(rng, rng.uniform(1, 1.5), rng.uniform(0, np.pi), 0.4, 96) * e * rng.uniform(0.1, 0.25)
            )
            s.fat.append(blob + edge + (c - edge) * rng.uniform(0.05, 0.3))
    rng = _rng(spec, 4)
    for _ in range(rng.integers(1, 3) if spec.folds else 0):
        k = rng.integers(len(s.tissue))
        start = centres[k] + rng.uniform(-0.3, 0.3, 2) * reach[k]
        line = _curve(rng, start, rng.uniform(0, 2 * np.pi), reach[k] * rng.uniform(0.4, 0.9), 0.6)
        s.folds.append((line, reach[k] * rng.uniform(0.02, 0.05)))
    rng = _rng(spec, 5)
    for _ in range(rng.integers(1, 4) if spec.bubbles else 0):
        s.bubbles.append((rng.uniform(0, w), rng.uniform(0, h), short * rng.uniform(0.03, 0.08)))
    rng = _rng(spec, 6)
    for _ in range(rng.integers(1, 3) if spec.pen_marks else 0):
        for _try in range(10):  # an arc round one piece; redrawn while it runs over another
            k = rng.integers(len(s.tissue))
            theta = rng.uniform(0, 2 * np.pi) + np.linspace(0, rng.uniform(0.8, 2.2), 120)
            wobble = sum(rng.uniform(0, 0.04) * np.sin(f * theta + rng.uniform(0, 7)) for f in (2, 5, 9))
            radius = reach[k] * rng.uniform(1.08, 1.25) * (1 + wobble)
            line = centres[k] + np.stack([np.cos(theta), np.sin(theta)], 1) * radius[:, None]
            ij = np.clip((line / spec.truth_downsample).astype(int), 0, np.array(tissue.shape[::-1]) - 1)
            if tissue[ij[:, 1], ij[:, 0]].mean() < 0.1:
                break
        s.pens.append(
            (line, short * rng.uniform(0.006, 0.014), _INKS[rng.integers(3)], rng.uniform(0.55, 0.85))
        )
    rng = _rng(spec, 7)
    s.glass = (rng.uniform(0.935, 0.965) + rng.uniform(-0.012, 0.012, 3)).astype(np.float32)
    if spec.gradient:
        s.light = (rng.uniform(0.04, 0.12), *rng.uniform(0.3, 0.7, 2), *rng.uniform(-0.04, 0.04, 2))


def build_scene(spec: SlideSpec) -> tuple[Scene, np.ndarray, np.ndarray]:
    """The scene and its truth maps (tissue bool, labels uint8) at ``spec.truth_downsample``."""
    pieces = _tissue_pieces(spec, _rng(spec, 1))
    tissue = _rasterize(pieces, ["Normal"] * len(pieces), spec, None) != 255
    lesions = _place_lesions(spec, _rng(spec, 2), tissue)
    labels = _rasterize([p for *_, p in lesions], [c for c, *_ in lesions], spec, 0)
    labels[~tissue] = 255
    scene = Scene(pieces, lesions)
    _add_nuisances(spec, scene, tissue)
    return scene, tissue, labels


# ------------------------------------------------------------------------------------------------ rendering
def _cell_hash(seed: int, cls: int, ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
    """A stable pseudo-random 64-bit number per texture cell (splitmix64 finaliser)."""
    ii, jj = np.atleast_1d(ii), np.atleast_1d(jj)  # arrays wrap silently on overflow, as hashing wants
    x = ii.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x ^= jj.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
    x ^= np.uint64((seed * 16 + cls) % 2**64)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _misses(lo: ArrayLike, hi: ArrayLike, org: np.ndarray, end: np.ndarray) -> bool:
    """Whether the level-0 box ``lo``..``hi`` lies wholly outside the region ``org``..``end``."""
    return bool((np.asarray(hi) < org).any() or (np.asarray(lo) > end).any())


def _orient(a: np.ndarray, o: int) -> np.ndarray:
    """One of the 8 flips/rotations of a square cell."""
    a = np.rot90(a, o % 4)
    return a.transpose(1, 0, 2) if o >= 4 else a


class Renderer:
    """Renders any region of the scene at any power-of-two downsample, from a per-slide texture bank."""

    def __init__(self, spec: SlideSpec, scene: Scene) -> None:
        self.spec, self.s = spec, scene
        self._base: dict[int, np.ndarray] = {}
        self._banks: dict[tuple[int, int], np.ndarray] = {}
        noise = _rng(spec, 8).normal(0, 1.6, (4, spec.tile, spec.tile, 3))
        self._noise = np.round(noise).astype(np.int8)  # sensor noise, picked per tile

    def base(self, k: int) -> np.ndarray:
        """``bank_size`` tiles of class ``k`` as transmission (B, tp, tp, 3), their mean colours matched so
        the mosaic shows no patchwork of stain shades."""
        if k not in self._base:
            spec, tp = self.spec, self.spec.texture_px
            rng = _rng(spec, 100 + k)
            tiles = np.stack([generate_tile(rng, k, tp, spec.difficulty) for _ in range(spec.bank_size)])
            tiles = tiles.astype(np.float32) / 255
            means = tiles.mean(axis=(1, 2), keepdims=True)
            self._base[k] = np.clip(tiles * (means.mean(0) / np.maximum(means, 1e-3)), 0.0, 1.0)
        return self._base[k]

    def bank(self, k: int, d: int) -> np.ndarray:
        """The bank at downsample ``d``: cells (B, c, c, 3), pre-oriented (B, 8, c, c, 3) when small, or mean
        colours (B, 3) once a cell is under a pixel."""
        if (k, d) not in self._banks:
            tp, base = self.spec.texture_px, self.base(k)
            if d > tp:
                bank = base.mean(axis=(1, 2))
            else:
                c = tp // d
                bank = np.stack([cv2.resize(t, (c, c), interpolation=cv2.INTER_AREA) for t in base])
                if c <= 32:  # many cells per tile: gather them vectorised from all 8 orientations
                    bank = np.stack([np.stack([_orient(t, o) for o in range(8)]) for t in bank])
            self._banks[k, d] = np.ascontiguousarray(bank, np.float32)
        return self._banks[k, d]

    def mosaic(self, k: int, x0: int, y0: int, w: int, h: int, d: int) -> np.ndarray:
        """Texture of class ``k`` over the region: level-0 cells of texture_px, each a bank tile, flipped."""
        tp, n = self.spec.texture_px, self.spec.bank_size
        bank = self.bank(k, d)
        if d > tp:  # a pixel averages f x f cells
            f = d // tp
            ii, jj = np.mgrid[y0 * f : (y0 + h) * f, x0 * f : (x0 + w) * f]
            cells = bank[(_cell_hash(self.spec.seed, k, ii, jj) % np.uint64(n)).astype(np.intp)]
            return cells.reshape(h, f, w, f, 3).mean(axis=(1, 3))
        c = tp // d
        i0, j0 = y0 // c, x0 // c
        ii, jj = np.mgrid[i0 : -(-(y0 + h) // c), j0 : -(-(x0 + w) // c)]
        hsh = _cell_hash(self.spec.seed, k, ii, jj)
        pick, orient = (
            (hsh % np.uint64(n)).astype(np.intp),
            ((hsh >> np.uint64(32)) % np.uint64(8)).astype(np.intp),
        )
        ni, nj = ii.shape
        if bank.ndim == 5:
            out = bank[pick, orient].transpose(0, 2, 1, 3, 4).reshape(ni * c, nj * c, 3)
        else:
            out = np.empty((ni * c, nj * c, 3), np.float32)
            for a in range(ni):
                for b in range(nj):
                    out[a * c : (a + 1) * c, b * c : (b + 1) * c] = _orient(bank[pick[a, b]], orient[a, b])
        return out[y0 - i0 * c : y0 - i0 * c + h, x0 - j0 * c : x0 - j0 * c + w]

    @staticmethod
    def _pts(poly: np.ndarray, org: np.ndarray, d: int) -> np.ndarray:
        # level-0 position p lands at pixel coordinate (p - org) / d - 0.5: pixel j's centre is (j + 0.5) * d
        return np.round(((poly - org) / d - 0.5) * (1 << _SHIFT)).astype(np.int32)

    def _area_mask(self, polys: list[np.ndarray], org: np.ndarray, d: int, w: int, h: int):
        """Anti-aliased coverage (h, w) float32 of the union of ``polys``; None when none reach the region."""
        mask, end = None, org + (w * d, h * d)
        for p in polys:
            if _misses(p.min(0), p.max(0), org, end):
                continue
            mask = np.zeros((h, w), np.uint8) if mask is None else mask
            cv2.fillPoly(mask, [self._pts(p, org, d)], 255, cv2.LINE_AA, _SHIFT)  # one call each: a union
        return None if mask is None else mask.astype(np.float32) / 255

    def _line_mask(self, line: np.ndarray, width: float, org: np.ndarray, d: int, w: int, h: int):
        """Coverage of a stroke ``width`` level-0 px wide; thinner than a pixel it fades instead."""
        if _misses(line.min(0) - width, line.max(0) + width, org, org + (w * d, h * d)):
            return None
        mask = np.zeros((h, w), np.uint8)
        cv2.polylines(
            mask, [self._pts(line, org, d)], False, 255, max(1, round(width / d)), cv2.LINE_AA, _SHIFT
        )
        return mask.astype(np.float32) * (min(1.0, width / d) / 255)

    def _bubbles(self, trans: np.ndarray, org: np.ndarray, d: int) -> None:
        """Air bubbles: a slight darkening inside a dark refractive ring."""
        h, w = trans.shape[:2]
        end = org + (w * d, h * d)
        for x, y, r in self.s.bubbles:
            if _misses((x - r, y - r), (x + r, y + r), org, end):
                continue
            c, rad, ring = tuple(self._pts(np.array([x, y]), org, d)), round(r / d * 16), 0.04 * r
            disc, edge = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
            cv2.circle(disc, c, rad, 255, -1, cv2.LINE_AA, _SHIFT)
            cv2.circle(edge, c, rad, 255, max(1, round(ring / d)), cv2.LINE_AA, _SHIFT)
            dark = 0.03 * disc.astype(np.float32) + 0.45 * min(1.0, ring / d) * edge.astype(np.float32)
            trans *= (1 - dark / 255)[..., None]

    def _light(self, x0: int, y0: int, w: int, h: int, d: int) -> np.ndarray:
        """Lit glass: its colour under a smooth vignetting and gradient (uneven illumination)."""
        a, cu, cv, gu, gv = self.s.light
        u = (x0 + np.arange(w, dtype=np.float32) + 0.5) * d / self.spec.width
        v = (y0 + np.arange(h, dtype=np.float32) + 0.5) * d / self.spec.height
        along_u = 1 - a * (u - cu) ** 2 + gu * (u - 0.5)
        along_v = -a * (v - cv) ** 2 + gv * (v - 0.5)
        return (along_u[None, :] + along_v[:, None])[..., None] * self.s.glass

    def render(self, x0: int, y0: int, w: int, h: int, d: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of the region whose top-left pixel is (x0, y0) at downsample ``d``."""
        s, org = self.s, np.array([x0 * d, y0 * d], np.float64)
        trans = np.ones((h, w, 3), np.float32)  # transmission of the slide: 1 on clean glass
        tissue = self._area_mask(s.tissue, org, d, w, h)
        if tissue is not None:
            tex = self.mosaic(0, x0, y0, w, h, d)
            fat = self._area_mask(s.fat, org, d, w, h)
            if fat is not None:  # fat removes most absorbance: pale, yet tissue
                tex += (1 - tex) * (_FAT_PALENESS * fat)[..., None]
            for k, cls in enumerate(SYNTHETIC_CLASSES[1:], start=1):  # Normal is the background texture
                lesion = self._area_mask([p for c, _, p in s.lesions if c == cls], org, d, w, h)
                if lesion is not None:
                    tex += (self.mosaic(k, x0, y0, w, h, d) - tex) * lesion[..., None]
            trans = 1 + (tex - 1) * tissue[..., None]
            for line, width in s.folds:  # tissue folded over itself: absorbance doubled
                fold = self._line_mask(line, width, org, d, w, h)
                if fold is not None:
                    trans *= 1 - (fold * tissue)[..., None] * (1 - trans)
        self._bubbles(trans, org, d)
        for line, width, ink, opacity in s.pens:
            pen = self._line_mask(line, width, org, d, w, h)
            if pen is not None:
                trans *= 1 - (pen * opacity)[..., None] * (1 - np.asarray(ink, np.float32))
        rgb = trans * self._light(x0, y0, w, h, d) * 255 + 0.5
        if self.spec.noise:
            pick = int(_cell_hash(self.spec.seed, 15, np.array(x0 * d), np.array(y0 * d))[0] % np.uint64(4))
            rgb += self._noise[pick, :h, :w]
        return np.clip(rgb, 0, 255).astype(np.uint8)

    def tiles(self, d: int, w: int, h: int, *, clip: bool = False) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(x, y, tile)`` row by row over a ``w`` x ``h`` level at downsample ``d``. Edge tiles are full
        ``spec.tile`` squares unless ``clip``: the scene goes on, so JPEG has no seam to smear."""
        t = self.spec.tile
        for y in range(0, h, t):
            for x in range(0, w, t):
                yield x, y, self.render(x, y, min(t, w - x) if clip else t, min(t, h - y) if clip else t, d)

    def thumbnail(self, side: int) -> np.ndarray:
        """The whole slide, long side at most ``side``, rendered at a power-of-two downsample and resized."""
        spec, d = self.spec, 1
        while max(spec.width, spec.height) / d > 4 * side / 3:
            d *= 2
        w, h = -(-spec.width // d), -(-spec.height // d)
        img = np.empty((h, w, 3), np.uint8)
        for x, y, tile in self.tiles(d, w, h, clip=True):
            img[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
        scale = side / max(w, h)
        if scale < 1:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        return img
