"""Synthetic whole-slide images: real pyramidal Aperio TIFFs that OpenSlide reads, with matching truth."""

from __future__ import annotations

import json
import math
import tracemalloc
from dataclasses import replace

import cv2
import numpy as np
import openslide
import pytest

from patholite.data.synthetic.slides import (
    generate_slides,
    needs_bigtiff,
    pyramid_levels,
    read_truth,
    write_synthetic_slide,
)
from patholite.data.synthetic.spec import LesionSpec, SlideSpec
from patholite.data.synthetic.tiles import SYNTHETIC_CLASSES
from patholite.errors import ConfigError, SlideError
from patholite.wsi.annotations import rasterize, read_annotations

SPEC = SlideSpec(
    4096,
    3072,
    seed=7,
    lesions=[LesionSpec("Invasive", 2, (150.0, 250.0)), LesionSpec("InSitu", 1, (100.0, 200.0))],
)
CLEAN = dict(pen_marks=False, folds=False, bubbles=False, faint_fat=False, gradient=False, noise=False)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return write_synthetic_slide(tmp_path_factory.mktemp("synthetic") / "s.svs", SPEC)


def _rgb(osr: openslide.OpenSlide, level: int) -> np.ndarray:
    return np.asarray(osr.read_region((0, 0), level, osr.level_dimensions[level]).convert("RGB"), np.float32)


def test_openslide_reads_an_aperio_pyramid(slide):
    assert slide.level_count == 3 and slide.dimensions == (4096, 3072)
    with openslide.OpenSlide(slide.path) as osr:
        assert osr.level_dimensions == ((4096, 3072), (1024, 768), (256, 192))
        assert np.allclose(osr.level_downsamples, [1, 4, 16])
        assert osr.properties["openslide.vendor"] == "aperio"
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(osr.properties["openslide.objective-power"]) == 20
        assert osr.properties["tiff.ImageDescription"].startswith("Aperio Image Library")
        assert list(osr.associated_images) == ["thumbnail"]
        assert max(osr.associated_images["thumbnail"].size) == 768


def test_tiffslide_agrees_on_levels(slide):
    tiffslide = pytest.importorskip("tiffslide")
    with tiffslide.TiffSlide(slide.path) as ts:
        assert ts.level_dimensions == ((4096, 3072), (1024, 768), (256, 192))
        assert float(ts.properties["tiffslide.mpp-x"]) == pytest.approx(0.5)


def test_levels_show_the_same_scene(slide):
    with openslide.OpenSlide(slide.path) as osr:
        level0, level1, level2 = (_rgb(osr, i) for i in range(3))
        thumb = np.asarray(osr.associated_images["thumbnail"].convert("RGB"), np.float32)
    for level in (level1, level2, thumb):
        h, w = level.shape[:2]
        shrunk = cv2.resize(level0, (w, h), interpolation=cv2.INTER_AREA)
        aligned = np.abs(shrunk - level).mean()
        shifted = np.abs(shrunk[:, 2:] - level[:, :-2]).mean()
        assert aligned < 4.0, aligned
        assert shifted > 1.3 * aligned  # the match is pixel-aligned, not just similar colours
    assert level0.std() > 20  # tissue on glass, not a blank page


def test_truth_maps_fit_the_image(slide):
    truth = read_truth(slide.path)
    assert truth.downsample == 16 and truth.classes == SYNTHETIC_CLASSES and truth.mpp == 0.5
    assert truth.tissue.shape == truth.labels.shape == (192, 256) and truth.tissue.dtype == bool
    assert ((truth.labels == 255) == ~truth.tissue).all()
    assert truth.tissue.mean() == pytest.approx(SPEC.tissue_fraction, abs=0.03)
    with openslide.OpenSlide(slide.path) as osr:
        grey = _rgb(osr, 2).mean(axis=2)  # level 2 is at the truth's downsample, pixel for pixel
    inner = cv2.erode(truth.tissue.astype(np.uint8), np.ones((5, 5))).astype(bool)
    glass = ~cv2.dilate(truth.tissue.astype(np.uint8), np.ones((5, 5))).astype(bool)
    assert np.median(grey[inner]) < np.median(grey[glass]) - 30


def test_lesions_follow_the_spec(slide):
    truth = read_truth(slide.path)
    assert sorted(x.cls for x in slide.lesions) == ["InSitu", "Invasive", "Invasive"]
    tissue_um2 = truth.tissue.sum() * (truth.downsample * truth.mpp) ** 2
    for les in truth.lesions:
        lo, hi = (150, 250) if les.cls == "Invasive" else (100, 200)
        assert lo <= les.diameter_um <= hi
        assert les.area_share == pytest.approx(math.pi * (les.diameter_um / 2) ** 2 / tissue_um2, rel=0.05)
        x, y = (np.asarray(les.centre) / truth.downsample).astype(int)
        assert truth.labels[y, x] == SYNTHETIC_CLASSES.index(les.cls)
    for k, cls in enumerate(SYNTHETIC_CLASSES[1:], 1):
        share = sum(x.area_share for x in truth.lesions if x.cls == cls)
        assert (truth.labels == k).sum() / truth.tissue.sum() == pytest.approx(share, rel=0.25, abs=1e-9)


def test_xml_polygons_are_the_truth(slide):
    truth = read_truth(slide.path)
    anns = read_annotations(slide.xml_path)
    assert [a.group for a in anns] == [x.cls for x in truth.lesions]
    for ann, les in zip(anns, truth.lesions, strict=True):
        assert np.allclose(ann.polygon, les.polygon)
    labels, _ = rasterize(anns, SYNTHETIC_CLASSES, truth.dimensions, truth.downsample, background=0)
    labels[~truth.tissue] = 255
    assert (labels == truth.labels).all()
    meta = json.loads(slide.json_path.read_text())
    assert SlideSpec.from_dict(meta["spec"]) == SPEC
    assert [x["class"] for x in meta["lesions"]] == [x.cls for x in truth.lesions]


def test_nuisances_are_not_tissue_and_faint_fat_is(tmp_path, slide):
    clean = write_synthetic_slide(tmp_path / "clean.svs", replace(SPEC, **CLEAN))
    inked, pale = [], []
    for s in (slide, clean):
        truth = read_truth(s.path)
        with openslide.OpenSlide(s.path) as osr:
            rgb = _rgb(osr, 1)
        tissue = cv2.resize(truth.tissue.astype(np.uint8), rgb.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        glass = cv2.dilate(tissue, np.ones((15, 15))) == 0  # away from tissue edges
        inner = cv2.erode(tissue, np.ones((15, 15))) == 1
        inked.append((rgb.max(axis=2) - rgb.min(axis=2) > 40)[glass].mean())  # pen strokes on glass
        regional = cv2.blur(rgb.mean(axis=2), (15, 15))  # fat is a region; lumens are small
        pale.append((regional > 215)[inner].mean())  # fat nearly as pale as glass, yet tissue
    assert inked[0] > 0.001 and inked[1] == 0, inked
    assert pale[0] > 0.03 and pale[0] > 4 * pale[1], pale
    assert (read_truth(clean.path).tissue == read_truth(slide.path).tissue).all()  # the same geometry


def test_deterministic_for_a_seed(tmp_path):
    spec = SlideSpec(1024, 768, seed=3, lesions=[LesionSpec("Benign", 2, (40.0, 60.0))])
    a, b = (write_synthetic_slide(tmp_path / f"{n}.svs", spec) for n in "ab")
    c = write_synthetic_slide(tmp_path / "c.svs", replace(spec, seed=4))
    with (
        openslide.OpenSlide(a.path) as sa,
        openslide.OpenSlide(b.path) as sb,
        openslide.OpenSlide(c.path) as sc,
    ):
        assert (_rgb(sa, 0) == _rgb(sb, 0)).all()
        assert not (_rgb(sa, 0) == _rgb(sc, 0)).all()
    ta, tb, tc = (read_truth(s.path) for s in (a, b, c))
    assert (ta.labels == tb.labels).all() and not (ta.labels == tc.labels).all()


def test_generate_slides_is_seeded_and_idempotent(tmp_path):
    template = SlideSpec(768, 768, texture_px=128)
    first = generate_slides(tmp_path, 3, template, seed=5)
    assert [s.path.name for s in first] == [f"synthetic_{i:04d}.svs" for i in range(3)]
    assert all(s.truth_path.exists() and s.xml_path.exists() for s in first)
    stamps = {s.path: s.path.stat().st_mtime_ns for s in first}
    first[1].truth_path.unlink()  # an interrupted slide: its truth (written last) is missing
    again = generate_slides(tmp_path, 4, template, seed=5)
    assert [s.path.stat().st_mtime_ns == stamps.get(s.path) for s in again] == [True, False, True, False]
    assert [[x.cls for x in s.lesions] for s in again[:3]] == [[x.cls for x in s.lesions] for s in first]
    normal = generate_slides(tmp_path / "n", 2, template, normal_share=1.0)
    assert all(not s.lesions and s.slide_class == "Normal" for s in normal)
    assert read_truth(normal[0].path).lesions == [] and (read_truth(normal[0].path).labels < 2).any()
    sick = generate_slides(tmp_path / "s", 3, template, normal_share=0.0)
    assert all(s.lesions and s.slide_class != "Normal" for s in sick)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(width=100), "width=100"),
        (dict(height=1000.5), "height=1000.5"),
        (dict(lesions=[LesionSpec("Tumour", 1, (50.0, 80.0))]), "lesions[0].cls"),
        (dict(lesions=[LesionSpec("Normal", 1, (50.0, 80.0))]), "lesions[0].cls"),
        (dict(lesions=[LesionSpec("Benign", -1, (50.0, 80.0))]), "lesions[0].count"),
        (dict(lesions=[LesionSpec("Benign", 1, (80.0, 50.0))]), "lesions[0].diameter_um"),
        (dict(lesions=[LesionSpec("Benign", 1, (50.0, 5000.0))]), "lesions[0].diameter_um"),
        (dict(lesions=[LesionSpec("Benign", 60, (150.0, 200.0))]), "lesions[0]"),
        (dict(tissue_fraction=0.9), "tissue_fraction"),
        (dict(texture_px=100), "texture_px"),
        (dict(mpp=0.0), "mpp"),
    ],
)
def test_impossible_specs_name_the_field(tmp_path, change, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        write_synthetic_slide(tmp_path / "x.svs", replace(SlideSpec(1024, 1024), **change))
    assert not (tmp_path / "x.svs").exists()


def test_other_mistakes(tmp_path):
    with pytest.raises(ConfigError, match="must end in"):
        write_synthetic_slide(tmp_path / "x.png", SlideSpec(1024, 1024))
    with pytest.raises(SlideError, match="no ground truth"):
        read_truth(tmp_path / "missing.svs")
    with pytest.raises(ConfigError, match="unknown slide spec field"):
        SlideSpec.from_dict({"width": 512, "height": 512, "colour": "red"})
    with pytest.raises(ConfigError, match=r"lesions\[0\]"):
        SlideSpec.from_dict({"width": 512, "height": 512, "lesions": [{"cls": "Benign"}]})


def test_plan_scales_to_large_slides():
    big = SlideSpec(50_000, 50_000)
    assert pyramid_levels(big) == [(1, 50_000, 50_000), (4, 12_500, 12_500), (16, 3125, 3125), (64, 782, 782)]
    assert needs_bigtiff(SlideSpec(40_000, 40_000)) and not needs_bigtiff(SlideSpec(8192, 8192))


def _peak_bytes(path, side: int) -> int:
    tracemalloc.start()
    try:
        write_synthetic_slide(path, SlideSpec(side, side, seed=1))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_stays_flat_in_slide_size(tmp_path):
    small, large = _peak_bytes(tmp_path / "s.svs", 2048), _peak_bytes(tmp_path / "l.svs", 6144)
    level0 = 6144 * 6144 * 3  # 113 MB that are never held
    assert large < level0 / 2.5
    assert large - small < 0.05 * (level0 - 2048 * 2048 * 3), (small, large)
    with openslide.OpenSlide(tmp_path / "l.svs") as osr:
        assert osr.level_dimensions[0] == (6144, 6144)
        assert np.asarray(osr.read_region((3000, 3000), 0, (256, 256))).std() > 0
