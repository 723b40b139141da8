"""Synthetic whole-slide images: pyramidal Aperio-style TIFFs of procedural H&E tissue, with ground truth.

A slide is a scene of vector geometry in level-0 pixels (tissue pieces, lesions, faint fat, folds, air
bubbles, pen strokes, uneven illumination) plus a small bank of synthetic tissue tiles per class
(``patholite.data.synthetic.tiles.generate_tile``); ``patholite.data.synthetic.scene`` builds and renders it.
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

import argparse
import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tifffile

from patholite.data.synthetic.scene import Renderer, build_scene, polygon_area
from patholite.data.synthetic.spec import LESION_CLASSES, LesionSpec, SlideSpec, validate_spec
from patholite.data.synthetic.tiles import SYNTHETIC_CLASSES
from patholite.errors import ConfigError, SlideError
from patholite.io import atomic_path, write_json
from patholite.progress import Progress
from patholite.wsi.annotations import Annotation, write_asap_xml

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff")
_APERIO = "Aperio Image Library v12.0.15 \r\n"
_BIGTIFF_BYTES = 2**32 - 2**26  # classic TIFF offsets are 32-bit; keep room for tags, thumbnail, levels
_THUMB_SIDE = 768


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


def _write_tiff(path: Path, r: Renderer, levels: list[tuple[int, int, int]], name: str) -> None:
    """Aperio layout: level 0 (tiled), the thumbnail (stripped), then the lower levels (tiled); ``name``:
    the slide's, in the progress display."""
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
            # level 0 is most of a slide's time (minutes for a 100k-px slide): its tiles are counted
            count = (
                Progress(f"rendering {name} level 0", -(-w // t) * -(-h // t), "tiles") if i == 0 else None
            )
            with count or contextlib.nullcontext():
                tiles = (tile for *_, tile in r.tiles(d, w, h))
                tif.write(_counted(tiles, count) if count else tiles, shape=(h, w, 3), dtype=np.uint8,
                          tile=(t, t), description=desc, **opts,
                          resolution=res, resolutionunit="CENTIMETER")  # fmt: skip
            if i == 0:
                thumb = r.thumbnail(_THUMB_SIDE)
                desc = f"{_APERIO}{w0}x{h0} -> {thumb.shape[1]}x{thumb.shape[0]} - {props}"
                tif.write(thumb, description=desc, rowsperstrip=16, **opts)


def _counted(tiles: Iterator[np.ndarray], progress: Progress) -> Iterator[np.ndarray]:
    for tile in tiles:
        progress.advance()  # rendered: counted before it is handed over (the writer never asks past the last)
        yield tile


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
            "patholite.data.synthetic.slides.write_synthetic_slide or generate_slides"
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
        _write_tiff(tmp, Renderer(spec, scene), levels, path.name)
    write_asap_xml(
        xml_path, [Annotation(f"lesion_{i}", les.cls, les.polygon) for i, les in enumerate(lesions)]
    )
    write_json(json_path, {
        "generator": "patholite.data.synthetic.slides", "version": GENERATOR_VERSION, "spec": spec.to_dict(),
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
    with Progress(f"synthetic slides in {folder}", n, "slides") as progress:
        for i in range(n):
            rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
            lesions = []
            if rng.random() >= normal_share:
                kinds = rng.choice(len(menu), size=int(rng.integers(1, min(2, len(menu)) + 1)), replace=False)
                lesions = [
                    replace(menu[k], count=int(rng.integers(1, menu[k].count + 1))) for k in sorted(kinds)
                ]
            spec = replace(spec_template, seed=int(rng.integers(2**31)), lesions=lesions)
            path = Path(folder) / f"{prefix}_{i:04d}.svs"
            slide = _existing(path, spec)
            if slide is None:
                log.info("writing synthetic slide %s (%dx%d, %d lesions)", path, spec.width, spec.height,
                         sum(x.count for x in lesions))  # fmt: skip
                slide = write_synthetic_slide(path, spec)
            slides.append(slide)
            progress.advance()
    return slides


def main(argv: list[str] | None = None) -> None:
    """``python -m patholite.data.synthetic.slides --out <folder> --n 4 --size 8192``: slides to try."""
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
