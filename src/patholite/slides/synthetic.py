"""Synthetic whole-slide images: pyramidal Aperio-style TIFFs of procedural H&E tissue, with ground truth.

A slide is a scene of vector geometry in level-0 pixels (tissue pieces, lesions, faint fat, folds, air
bubbles, pen strokes, uneven illumination) plus a small bank of synthetic tissue tiles per class
(``patholite.data.synthetic.generate_tile``); ``patholite.slides.synthetic_scene`` builds and renders it.
Every pyramid level is rendered tile by tile straight from the scene at its own downsample (the bank is
pre-downsampled), so memory stays flat in the slide's size: no level is ever held whole, nor read back. The
ground truth (tissue mask and class labels at a coarse downsample, lesion polygons) is rasterised from the
same geometry with the annotation module's rule.

Files beside ``<stem>.svs``: ``<stem>.xml`` (ASAP, one polygon per lesion, PartOfGroup = class),
``<stem>.json`` (spec, levels, lesions) and ``<stem>.truth.npz`` (written last: a slide is complete when its
truth exists). Truth: ``tissue`` (bool) and ``labels`` (uint8 index into SYNTHETIC_CLASSES, 255 off tissue)
at ``downsample`` level-0 px per pixel. Pen marks, bubbles and the glass gradient are not tissue; faint fat
and folds are."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from patholite.data.synthetic import SYNTHETIC_CLASSES
from patholite.errors import ConfigError, SlideError
from patholite.measure.io import atomic_path, write_json
from patholite.slides.annotations import Annotation, write_asap_xml
from patholite.slides.synthetic_scene import Renderer, build_scene, polygon_area

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
LESION_CLASSES = SYNTHETIC_CLASSES[1:]  # Normal is the background tissue, never a lesion
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff")
_APERIO = "Aperio Image Library v12.0.15 \r\n"
_BIGTIFF_BYTES = 2**32 - 2**26  # classic TIFF offsets are 32-bit; keep room for tags, thumbnail, levels
_THUMB_SIDE = 768


# ------------------------------------------------------------------------------------------------ spec
@dataclass(frozen=True)
class LesionSpec:
    """``count`` lesions of class ``cls`` with equivalent-circle diameters drawn from ``diameter_um``."""

    cls: str
    count: int
    diameter_um: tuple[float, float]


@dataclass
class SlideSpec:
    """What one synthetic slide looks like. Sizes in level-0 pixels unless named ``_um``."""

    width: int
    height: int
    mpp: float = 0.5
    magnification: float = 20.0
    tile: int = 256
    quality: int = 85  # JPEG
    level_downsample: int = 4  # between pyramid levels
    min_level_side: int = 1000  # add levels until the long side is below this
    seed: int = 0
    difficulty: float = 0.5  # of the synthetic tissue, as in generate_tile
    texture_px: int = 256  # level-0 size of one synthetic tissue tile
    bank_size: int = 4  # texture tiles per class
    lesions: list[LesionSpec] = field(default_factory=list)
    tissue_fraction: float = 0.35  # target share of the slide covered by tissue
    tissue_pieces: int = 3
    truth_downsample: int = 16
    pen_marks: bool = True
    folds: bool = True
    bubbles: bool = True
    faint_fat: bool = True  # very pale fat: tissue in the truth
    gradient: bool = True
    noise: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlideSpec:
        """A spec from plain containers (a config or the JSON sidecar); lesions may be dicts."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown slide spec field(s) {unknown}; known fields: {sorted(known)}")
        data = dict(data)
        lesions = []
        for i, item in enumerate(data.get("lesions") or []):
            if isinstance(item, LesionSpec):
                lesions.append(item)
                continue
            try:
                lesions.append(LesionSpec(str(item["cls"]), int(item["count"]), tuple(item["diameter_um"])))
            except (KeyError, TypeError, ValueError) as err:
                raise ConfigError(
                    f"lesions[{i}]={item!r} must have cls, count and diameter_um: [min, max] ({err})"
                ) from err
        data["lesions"] = lesions
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready containers (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"synthetic slide: {message}")


def validate_spec(spec: SlideSpec) -> None:
    """Raise ConfigError naming the field when ``spec`` cannot make a slide."""
    t = spec.tile
    _check(t >= 16 and t % 16 == 0, f"tile={t} must be a multiple of 16 (TIFF tiles), e.g. 256")
    for name in ("width", "height"):
        v = getattr(spec, name)
        _check(isinstance(v, int | np.integer), f"{name}={v!r} must be a whole number of level-0 pixels")
        _check(v >= t, f"{name}={v} is smaller than one tile ({t} px); use at least {t}")
    _check(spec.mpp > 0, f"mpp={spec.mpp} must be positive (micrometres per level-0 pixel)")
    _check(spec.magnification > 0, f"magnification={spec.magnification} must be positive")
    _check(1 <= spec.quality <= 100, f"quality={spec.quality} must lie in 1..100")
    _check(spec.level_downsample in (2, 4, 8), f"level_downsample={spec.level_downsample} must be 2, 4 or 8")
    _check(spec.min_level_side >= 16, f"min_level_side={spec.min_level_side} must be at least 16")
    _check(0.0 <= spec.difficulty <= 1.0, f"difficulty={spec.difficulty} must lie in [0, 1]")
    tp = spec.texture_px
    _check(32 <= tp <= 2048 and tp & (tp - 1) == 0, f"texture_px={tp} must be a power of two in 32..2048")
    _check(spec.bank_size >= 1, f"bank_size={spec.bank_size} must be at least 1")
    _check(spec.truth_downsample >= 1, f"truth_downsample={spec.truth_downsample} must be at least 1")
    _check(spec.tissue_pieces >= 1, f"tissue_pieces={spec.tissue_pieces} must be at least 1")
    _check(0 < spec.tissue_fraction <= 0.6, f"tissue_fraction={spec.tissue_fraction} must lie in (0, 0.6]")
    for i, les in enumerate(spec.lesions):
        _check(
            les.cls in LESION_CLASSES,
            f"lesions[{i}].cls={les.cls!r} is not a lesion class; use one of {LESION_CLASSES} "
            "(Normal is the background tissue)",
        )
        _check(les.count >= 0, f"lesions[{i}].count={les.count} must be 0 or more")
        lo_hi = tuple(les.diameter_um)
        _check(
            len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1],
            f"lesions[{i}].diameter_um={lo_hi} must be (min, max) micrometres with 0 < min <= max",
        )


# ------------------------------------------------------------------------------------------------ results
@dataclass
class Lesion:
    """One lesion as drawn: its polygon (level-0 x, y) is the XML annotation and the truth label region."""

    cls: str
    centre: tuple[float, float]
    diameter_um: float  # equivalent-circle diameter: the polygon's area is pi * (d / 2)^2
    area_share: float  # of the slide's tissue area
    polygon: np.ndarray


@dataclass
class SyntheticSlide:
    """A written slide: its files and its lesions."""

    path: Path
    truth_path: Path
    xml_path: Path
    json_path: Path
    dimensions: tuple[int, int]
    level_count: int
    lesions: list[Lesion]

    @property
    def slide_class(self) -> str:
        """The most severe class on the slide ("Normal" without lesions)."""
        return SYNTHETIC_CLASSES[max((SYNTHETIC_CLASSES.index(x.cls) for x in self.lesions), default=0)]


@dataclass
class Truth:
    """Ground truth of a synthetic slide at ``downsample`` level-0 px per map pixel."""

    tissue: np.ndarray  # bool (ceil(h / ds), ceil(w / ds))
    labels: np.ndarray  # uint8 class index into ``classes``; 255 off tissue
    downsample: int
    classes: list[str]
    dimensions: tuple[int, int]
    mpp: float
    lesions: list[Lesion]


def sidecar_paths(slide_path: str | Path) -> tuple[Path, Path, Path]:
    """``(truth .npz, ASAP .xml, spec .json)`` beside a synthetic slide."""
    p = Path(slide_path)
    return p.with_name(p.stem + ".truth.npz"), p.with_suffix(".xml"), p.with_suffix(".json")


# ------------------------------------------------------------------------------------------------ writing
def pyramid_levels(spec: SlideSpec) -> list[tuple[int, int, int]]:
    """``(downsample, width, height)`` per level: divide by level_downsample until the long side is small."""
    levels = [(1, spec.width, spec.height)]
    while max(levels[-1][1:]) >= spec.min_level_side:
        d = levels[-1][0] * spec.level_downsample
        levels.append((d, -(-spec.width // d), -(-spec.height // d)))
    return levels


def needs_bigtiff(spec: SlideSpec) -> bool:
    """BigTIFF when uncompressed level 0 would pass classic TIFF's 4 GB offsets (as Aperio decides)."""
    return spec.width * spec.height * 3 > _BIGTIFF_BYTES


def _write_tiff(path: Path, r: Renderer, levels: list[tuple[int, int, int]]) -> None:
    """Aperio layout: level 0 (tiled), the thumbnail (stripped), then the lower levels (tiled)."""
    spec, t, q = r.spec, r.spec.tile, r.spec.quality
    w0, h0 = spec.width, spec.height
    head = f"{_APERIO}{w0}x{h0} [0,0 {w0}x{h0}] ({t}x{t})"
    props = (
        f"|AppMag = {spec.magnification:g}|MPP = {spec.mpp:g}|Title = patholite synthetic slide {spec.seed}"
    )
    # maxworkers=1: tifffile's threaded encoder buffers up to 512 MB of tiles, which would defeat flat memory
    opts = dict(
        photometric="rgb", compression="jpeg", compressionargs={"level": q}, metadata=None, maxworkers=1
    )
    with tifffile.TiffWriter(path, bigtiff=needs_bigtiff(spec)) as tif:
        for i, (d, w, h) in enumerate(levels):
            desc = f"{head} JPEG/RGB Q={q}{props}" if i == 0 else f"{head} -> {w}x{h} JPEG/RGB Q={q}"
            res = (1e4 / (spec.mpp * d), 1e4 / (spec.mpp * d))  # pixels per cm, for readers without Aperio
            tiles = (tile for *_, tile in r.tiles(d, w, h))
            tif.write(tiles, shape=(h, w, 3), dtype=np.uint8, tile=(t, t), description=desc, **opts,
                      resolution=res, resolutionunit="CENTIMETER")  # fmt: skip
            if i == 0:
                thumb = r.thumbnail(_THUMB_SIDE)
                desc = f"{_APERIO}{w0}x{h0} -> {thumb.shape[1]}x{thumb.shape[0]} - {props}"
                tif.write(thumb, description=desc, rowsperstrip=16, **opts)


def _save_truth(path: Path, spec: SlideSpec, tissue: np.ndarray, labels: np.ndarray, lesions: list[Lesion]):
    polys = [les.polygon for les in lesions]
    arrays = dict(
        version=np.int64(GENERATOR_VERSION),
        tissue=tissue,
        labels=labels,
        downsample=np.int64(spec.truth_downsample),
        classes=np.array(SYNTHETIC_CLASSES),
        dimensions=np.array([spec.width, spec.height], np.int64),
        mpp=np.float64(spec.mpp),
        lesion_cls=np.array([les.cls for les in lesions], dtype="<U16"),
        lesion_centre=np.array([les.centre for les in lesions], np.float64).reshape(-1, 2),
        lesion_diameter_um=np.array([les.diameter_um for les in lesions], np.float64),
        lesion_area_share=np.array([les.area_share for les in lesions], np.float64),
        lesion_vertices=np.concatenate(polys) if polys else np.zeros((0, 2)),
        lesion_offsets=np.cumsum([0] + [len(p) for p in polys]).astype(np.int64),
    )
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def read_truth(slide_path: str | Path) -> Truth:
    """The ground truth written beside a synthetic slide (``<stem>.truth.npz``)."""
    path = sidecar_paths(slide_path)[0]
    if not path.exists():
        raise SlideError(
            f"{slide_path} has no ground truth ({path} is missing); write the slide with "
            "patholite.slides.synthetic.write_synthetic_slide or generate_slides"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        off, verts = data["lesion_offsets"], data["lesion_vertices"]
        lesions = [
            Lesion(str(c), (float(x), float(y)), float(dia), float(share), verts[off[i] : off[i + 1]])
            for i, (c, (x, y), dia, share) in enumerate(
                zip(
                    data["lesion_cls"],
                    data["lesion_centre"],
                    data["lesion_diameter_um"],
                    data["lesion_area_share"],
                    strict=True,
                )  # fmt: skip
            )
        ]
        w, h = (int(v) for v in data["dimensions"])
        return Truth(data["tissue"].astype(bool), data["labels"], int(data["downsample"]),
                     [str(c) for c in data["classes"]], (w, h), float(data["mpp"]), lesions)  # fmt: skip
    except (OSError, ValueError, KeyError) as err:
        raise SlideError(
            f"ground truth {path} is unreadable ({err}); delete it and write the slide again"
        ) from err


def write_synthetic_slide(path: str | Path, spec: SlideSpec) -> SyntheticSlide:
    """Write a pyramidal Aperio-style slide of ``spec`` to ``path`` (.svs/.tif/.tiff) with its ground truth
    (``<stem>.truth.npz``, written last), ASAP lesion polygons (``<stem>.xml``) and ``<stem>.json``."""
    path = Path(path)
    if path.suffix.lower() not in SLIDE_SUFFIXES:
        raise ConfigError(f"synthetic slide path {path} must end in one of {SLIDE_SUFFIXES}")
    validate_spec(spec)
    truth_path, xml_path, json_path = sidecar_paths(path)
    truth_path.unlink(missing_ok=True)  # the slide is incomplete until the new truth lands
    scene, tissue, labels = build_scene(spec)
    tissue_area = sum(polygon_area(p) for p in scene.tissue)
    lesions = [
        Lesion(cls, tuple(float(v) for v in poly.mean(0)), d_um, polygon_area(poly) / tissue_area, poly)
        for cls, d_um, poly in scene.lesions
    ]
    levels = pyramid_levels(spec)
    with atomic_path(path) as tmp:
        _write_tiff(tmp, Renderer(spec, scene), levels)
    write_asap_xml(
        xml_path, [Annotation(f"lesion_{i}", les.cls, les.polygon) for i, les in enumerate(lesions)]
    )
    write_json(json_path, {
        "generator": "patholite.slides.synthetic", "version": GENERATOR_VERSION, "spec": spec.to_dict(),
        "levels": [{"downsample": d, "width": w, "height": h} for d, w, h in levels],
        "tissue_fraction": tissue_area / (spec.width * spec.height), "classes": SYNTHETIC_CLASSES,
        "truth_downsample": spec.truth_downsample,
        "lesions": [{"class": x.cls, "centre": list(x.centre), "diameter_um": x.diameter_um,
                     "area_share": x.area_share} for x in lesions],
    })  # fmt: skip
    _save_truth(truth_path, spec, tissue, labels, lesions)
    return SyntheticSlide(
        path, truth_path, xml_path, json_path, (spec.width, spec.height), len(levels), lesions
    )


# ------------------------------------------------------------------------------------------------ sets
def _existing(path: Path, spec: SlideSpec) -> SyntheticSlide | None:
    """The slide at ``path`` if it is complete and was written from ``spec`` by this generator version."""
    truth_path, xml_path, json_path = sidecar_paths(path)
    if not (path.exists() and truth_path.exists() and xml_path.exists() and json_path.exists()):
        return None
    try:
        meta = json.loads(json_path.read_text())
        if meta.get("version") != GENERATOR_VERSION or meta.get("spec") != spec.to_dict():
            return None
        truth = read_truth(path)
    except (OSError, ValueError, SlideError):
        return None
    return SyntheticSlide(
        path, truth_path, xml_path, json_path, truth.dimensions, len(meta["levels"]), truth.lesions
    )


def generate_slides(
    folder: str | Path, n: int, spec_template: SlideSpec, seed: int = 0, *, normal_share: float = 0.25,
    prefix: str = "synthetic",
) -> list[SyntheticSlide]:  # fmt: skip
    """``n`` slides ``<prefix>_0000.svs``... in ``folder`` from ``spec_template``, each with its own seed and
    a seeded mix of lesions: a ``normal_share`` of them lesion-free, the others with 1-2 of the template's
    lesion kinds (default: every lesion class, up to 3 each, 5-12% of the short side across), 1..count of
    each. Slide i depends only on (seed, i); complete slides written from the same spec are kept as they are.
    """
    if n < 0:
        raise ConfigError(f"generate_slides: n={n} must be 0 or more")
    if not 0.0 <= normal_share <= 1.0:
        raise ConfigError(f"generate_slides: normal_share={normal_share} must lie in [0, 1]")
    validate_spec(spec_template)
    short_um = min(spec_template.width, spec_template.height) * spec_template.mpp
    menu = [les for les in spec_template.lesions if les.count > 0] or [
        LesionSpec(cls, 3, (0.05 * short_um, 0.12 * short_um)) for cls in LESION_CLASSES
    ]
    slides = []
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        lesions = []
        if rng.random() >= normal_share:
            kinds = rng.choice(len(menu), size=int(rng.integers(1, min(2, len(menu)) + 1)), replace=False)
            lesions = [replace(menu[k], count=int(rng.integers(1, menu[k].count + 1))) for k in sorted(kinds)]
        spec = replace(spec_template, seed=int(rng.integers(2**31)), lesions=lesions)
        path = Path(folder) / f"{prefix}_{i:04d}.svs"
        slide = _existing(path, spec)
        if slide is None:
            log.info("writing synthetic slide %s (%dx%d, %d lesions)", path, spec.width, spec.height,
                     sum(x.count for x in lesions))  # fmt: skip
            slide = write_synthetic_slide(path, spec)
        slides.append(slide)
    return slides


def main(argv: list[str] | None = None) -> None:
    """``python -m patholite.slides.synthetic --out <folder> --n 4 --size 8192``: slides to try."""
    import argparse

    p = argparse.ArgumentParser(description="Write synthetic whole slides with truth masks and ASAP XML.")
    p.add_argument("--out", type=Path, required=True, help="folder the slides are written into")
    p.add_argument("--n", type=int, default=4, help="number of slides (a quarter of them lesion-free)")
    p.add_argument("--size", type=int, default=8192, help="level-0 side in pixels (0.5 um/px)")
    p.add_argument("--difficulty", type=float, default=0.5, help="of the tissue texture, 0-1")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = SlideSpec(width=args.size, height=args.size, difficulty=args.difficulty)
    try:
        slides = generate_slides(args.out, args.n, spec, seed=args.seed)
    except ConfigError as err:
        raise SystemExit(f"patholite: {err}") from err
    for s in slides:
        print(f"{s.path}  {s.slide_class:<8}  {len(s.lesions)} lesions")


if __name__ == "__main__":
    main()
