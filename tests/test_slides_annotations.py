"""Slide annotations: ASAP / ImageScope parsing, ASAP writing, rasterizing and tile labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from patholite.errors import SlideError
from patholite.wsi.annotations import (
    BACH_CLASS_MAP,
    CAMELYON16_CLASS_MAP,
    UNLABELLED,
    Annotation,
    check_fits,
    rasterize,
    read_annotations,
    tile_labels,
    write_asap_xml,
)

DATA = Path(__file__).parent / "data" / "annotations"
ASAP = DATA / "camelyon16_tumor.xml"
IMAGESCOPE = DATA / "bach_A01.xml"


def square(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


# ------------------------------------------------------------------------------------------------ reading
def test_asap_parses_groups_exclusions_and_comma_decimals() -> None:
    anns = read_annotations(ASAP)
    # The Dot annotation marks a point, not a region, and is left out.
    assert [a.name for a in anns] == ["Annotation 0", "Annotation 1", "Annotation 2"]
    assert [a.group for a in anns] == ["_0", "_1", "_2"]
    assert [a.exclude for a in anns] == [False, False, True]
    assert [len(a.polygon) for a in anns] == [4, 5, 4]
    # "200,5" is 200.5: comma decimal separators as in some CAMELYON16 files.
    np.testing.assert_allclose(anns[1].polygon[0], [200.5, 300.25])
    np.testing.assert_allclose(anns[1].polygon[4], [190.125, 350.0])
    # Coordinates are put in their Order, whatever the order in the file.
    np.testing.assert_allclose(anns[2].polygon, square(60, 60, 100.5, 100))
    assert anns[0].polygon.dtype == np.float64 and anns[0].polygon.shape == (4, 2)


def test_asap_with_camelyon16_map_gives_tumor_and_keeps_exclusions() -> None:
    anns = read_annotations(ASAP, class_map=CAMELYON16_CLASS_MAP)
    assert [(a.group, a.exclude) for a in anns] == [("Tumor", False), ("Tumor", False), ("_2", True)]


def test_imagescope_parses_regions_shapes_and_negative_roa() -> None:
    anns = read_annotations(IMAGESCOPE)
    # The ruler (Type 4) is a measurement, not a region, and is left out.
    assert [a.name for a in anns] == [f"annotation 1 region {i}" for i in (1, 2, 3, 4, 6)]
    groups = ["Benign", "Exclusion", "Carcinoma in situ", "Invasive carcinoma", "in situ"]
    assert [a.group for a in anns] == groups
    assert [a.exclude for a in anns] == [False, True, False, False, False]
    assert [len(a.polygon) for a in anns[:3]] == [5, 4, 4]
    ellipse = anns[3].polygon  # two bounding-box corners become a sampled ellipse
    assert len(ellipse) == 64
    np.testing.assert_allclose(ellipse.min(axis=0), [500, 300], atol=1e-9)
    np.testing.assert_allclose(ellipse.max(axis=0), [620, 420], atol=1e-9)
    np.testing.assert_allclose(ellipse.mean(axis=0), [560, 360], atol=1e-9)


def test_bach_map_matches_case_insensitively() -> None:
    anns = read_annotations(IMAGESCOPE, class_map=BACH_CLASS_MAP)
    assert [a.group for a in anns] == ["Benign", "Exclusion", "InSitu", "Invasive", "InSitu"]
    assert set(BACH_CLASS_MAP.values()) == {"Normal", "Benign", "InSitu", "Invasive"}


def test_class_map_can_turn_a_group_into_exclusions() -> None:
    anns = read_annotations(ASAP, class_map={"_0": "Tumor", "_1": "Exclusion"})
    assert [(a.group, a.exclude) for a in anns] == [("Tumor", False), ("_1", True), ("_2", True)]


def test_unknown_group_names_groups_and_map_keys() -> None:
    with pytest.raises(SlideError) as err:
        read_annotations(IMAGESCOPE, class_map={"benign": "Benign"})
    message = str(err.value)
    assert str(IMAGESCOPE) in message
    assert "'Carcinoma in situ'" in message and "'Invasive carcinoma'" in message and "'in situ'" in message
    assert "keys ['benign']" in message and "class map" in message


def test_malformed_xml_is_a_slide_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.xml"
    bad.write_text("<ASAP_Annotations><Annotations><Annotation Name='a'>")
    with pytest.raises(SlideError, match="not readable XML") as err:
        read_annotations(bad)
    assert str(bad) in str(err.value)
    with pytest.raises(SlideError, match="does not exist"):
        read_annotations(tmp_path / "missing.xml")


def test_unknown_dialect_is_a_slide_error(tmp_path: Path) -> None:
    other = tmp_path / "geo.xml"
    other.write_text("<FeatureCollection><Feature/></FeatureCollection>")
    with pytest.raises(SlideError, match=r"<FeatureCollection>.*neither ASAP"):
        read_annotations(other)


def test_too_few_points_and_bad_numbers_name_the_annotation(tmp_path: Path) -> None:
    path = tmp_path / "two.xml"
    text = ASAP.read_text().replace('<Coordinate Order="3" X="40" Y="120" />', "")
    path.write_text(text.replace('<Coordinate Order="2" X="120" Y="120" />', ""))
    with pytest.raises(SlideError, match=r"'Annotation 0'.*2 point\(s\).*at least 3"):
        read_annotations(path)
    path.write_text(ASAP.read_text().replace('X="120" Y="40"', 'X="12a" Y="40"'))
    with pytest.raises(SlideError, match=r"'Annotation 0'.*'12a'.*not a number"):
        read_annotations(path)


# ------------------------------------------------------------------------------------------------ writing
def test_write_asap_xml_round_trips(tmp_path: Path) -> None:
    anns = [
        Annotation("tumour a", "Tumor", square(10.25, 20.5, 110, 120)),
        Annotation("hole", "Exclusion", square(30, 40, 50, 60), exclude=True),
        Annotation("tumour b", "_1", np.array([[5, 5], [9, 5], [7, 8.125]])),
    ]
    out = tmp_path / "sub" / "slide.xml"
    write_asap_xml(out, anns)
    assert [p.name for p in out.parent.iterdir()] == ["slide.xml"]  # no temporary file left behind
    back = read_annotations(out)
    assert [(a.name, a.group, a.exclude) for a in back] == [(a.name, a.group, a.exclude) for a in anns]
    for a, b in zip(anns, back, strict=True):
        np.testing.assert_array_equal(a.polygon, b.polygon)
    assert '<Group Name="Tumor" PartOfGroup="None"' in out.read_text()


def test_write_asap_xml_refuses_an_exclusion_that_would_read_back_as_a_class(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'Tumor' would read back as a class"):
        write_asap_xml(tmp_path / "x.xml", [Annotation("a", "Tumor", square(0, 0, 4, 4), exclude=True)])
    assert not (tmp_path / "x.xml").exists()


# --------------------------------------------------------------------------------------------- rasterizing
def test_rasterize_square_pixel_count_at_downsample_4() -> None:
    labels, excluded = rasterize(
        [Annotation("t", "Tumor", square(40, 40, 120, 120))], ["Normal", "Tumor"], (250, 203), 4.0
    )
    assert labels.shape == (51, 63) and labels.dtype == np.uint8  # ceil(203/4), ceil(250/4)
    assert not excluded.any()
    # fillPoly fills every map pixel the polygon reaches, boundary included: level-0 40..120 -> pixels 10..30.
    assert (labels == 1).sum() == 21 * 21
    rows, cols = np.nonzero(labels == 1)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (10, 30, 10, 30)
    assert (labels == 0).sum() == labels.size - 441


def test_rasterize_later_class_wins_and_exclusions_punch_holes() -> None:
    classes = ["Normal", "Benign", "Invasive"]
    anns = [
        Annotation("inv", "Invasive", square(0, 0, 40, 40)),  # listed first, painted last
        Annotation("ben", "Benign", square(20, 0, 80, 40)),
        Annotation("hole", "_2", square(60, 20, 72, 32), exclude=True),
    ]
    labels, excluded = rasterize(anns, classes, (100, 60), 4.0)
    assert labels[5, 7] == 2  # overlap of Invasive and Benign: the later class (Invasive) wins
    assert labels[2, 15] == 1 and labels[12, 5] == 0
    assert excluded[6, 16] and labels[6, 16] == 0 and not excluded[2, 16]
    assert excluded.sum() == 4 * 4  # level-0 60..72 at ds 4: pixels 15..18
    unlabelled, _ = rasterize(anns, classes, (100, 60), 4.0, background=None)
    assert unlabelled[12, 5] == UNLABELLED and unlabelled[6, 16] == UNLABELLED and unlabelled[5, 7] == 2


def test_rasterize_rejects_groups_outside_class_names() -> None:
    with pytest.raises(SlideError, match=r"\['_0'\] are not among the class names"):
        rasterize([Annotation("a", "_0", square(0, 0, 8, 8))], ["Normal", "Tumor"], (16, 16), 2.0)


def test_fixture_file_rasterizes_with_bach_classes() -> None:
    anns = read_annotations(IMAGESCOPE, class_map=BACH_CLASS_MAP)
    labels, excluded = rasterize(anns, ["Normal", "Benign", "InSitu", "Invasive"], (700, 500), 10.0)
    assert labels[20, 30] == 1 and labels[17, 55] == 2 and labels[36, 56] == 3 and labels[5, 5] == 0
    assert excluded[18, 18] and labels[18, 18] == 0


# --------------------------------------------------------------------------------------------- tile labels
def _reference_tile_labels(label_map, excluded, ds, coords, size0, min_fraction):
    out, fracs = [], []
    for x, y in coords:
        x0, x1 = int(np.ceil(x / ds - 0.5)), int(np.ceil((x + size0) / ds - 0.5))
        y0, y1 = int(np.ceil(y / ds - 0.5)), int(np.ceil((y + size0) / ds - 0.5))
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)  # at least one pixel, then clipped to the map
        window = np.s_[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)]
        lab, exc = label_map[window], excluded[window]
        kept = lab[~exc]
        counts = np.bincount(kept[kept != UNLABELLED], minlength=256)
        best = 255 - int(np.argmax(counts[::-1])) if counts.any() else -1
        frac = counts.max() / kept.size if kept.size else 0.0
        ok = lab.size and exc.sum() <= (1 - min_fraction) * lab.size and frac >= min_fraction
        out.append(best if ok else -1)
        fracs.append(frac)
    return np.array(out), np.array(fracs)


def test_tile_labels_majority_and_minus_one_cases() -> None:
    label_map = np.zeros((8, 12), dtype=np.uint8)
    excluded = np.zeros((8, 12), dtype=bool)
    label_map[0:4, 4:8] = [[1, 1, 1, 0]] * 4  # 75 % class 1
    label_map[0:4, 8:12] = [[1, 1, 2, 2]] * 4  # a 50/50 tie between 1 and 2
    excluded[4:8, 0:4] = True
    excluded[4:8, 4:6] = True  # half excluded, the rest class 0
    label_map[4:8, 8:12] = UNLABELLED
    label_map[4, 8] = 2  # 1 labelled pixel in 16
    coords = np.array([[0, 0], [16, 0], [32, 0], [0, 16], [16, 16], [32, 16], [64, 64]])
    labels, fraction = tile_labels(label_map, excluded, 4.0, coords, 16, min_fraction=0.5)
    assert labels.dtype == np.int64
    assert labels.tolist() == [0, 1, 2, -1, 0, -1, -1]
    np.testing.assert_allclose(fraction, [1.0, 0.75, 0.5, 0.0, 1.0, 1 / 16, 0.0])
    strict, _ = tile_labels(label_map, excluded, 4.0, coords, 16, min_fraction=0.8)
    assert strict.tolist() == [0, -1, -1, -1, -1, -1, -1]


def test_tile_labels_match_a_per_tile_reference() -> None:
    rng = np.random.default_rng(0)
    label_map = rng.integers(0, 3, size=(40, 50)).astype(np.uint8)
    label_map[rng.random((40, 50)) < 0.1] = UNLABELLED
    excluded = rng.random((40, 50)) < 0.2
    coords = rng.integers(-20, 420, size=(300, 2))
    for ds, size0 in ((8.0, 64), (8.0, 5), (6.5, 100)):
        labels, fraction = tile_labels(label_map, excluded, ds, coords, size0, min_fraction=0.4)
        want, want_frac = _reference_tile_labels(label_map, excluded, ds, coords, size0, 0.4)
        np.testing.assert_array_equal(labels, want)
        np.testing.assert_allclose(fraction, want_frac)


# ----------------------------------------------------------------------------------------------- fitting
def test_check_fits_raises_for_polygons_beyond_the_slide() -> None:
    anns = read_annotations(ASAP)
    check_fits(anns, (400, 400), ASAP)
    check_fits(anns, (278, 387), ASAP)  # a few pixels over the edge is drawing slack
    with pytest.raises(SlideError) as err:
        check_fits(anns, (200, 200), ASAP)
    message = str(err.value)
    assert str(ASAP) in message and "200x200" in message and "'Annotation 1'" in message
    assert "level-0 pixels" in message
