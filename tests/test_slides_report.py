"""Per-slide outputs (heatmap, fractions, call, files) and the slides summary, on small synthetic arrays."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest

from patholite.errors import ConfigError
from patholite.slides.report import (
    CallRule,
    SlideResult,
    area_fractions,
    check_rule,
    class_colors,
    class_heatmap,
    failed_row,
    slide_call,
    write_slide_outputs,
    write_summary,
)

CLASSES = ["normal", "benign", "in_situ", "invasive"]
SIZE0 = 32  # level-0 tile side; with thumb_downsample 32 every tile is exactly one thumbnail pixel


def one_hot(labels: list[int], n: int = len(CLASSES), p: float = 0.7) -> np.ndarray:
    """Probabilities with p on the labelled class and the rest spread evenly."""
    probs = np.full((len(labels), n), (1 - p) / (n - 1), np.float32)
    probs[np.arange(len(labels)), labels] = p
    return probs


def grid_result(labels: np.ndarray, **kw) -> SlideResult:
    """A slide whose tiles sit on a grid of one-pixel tiles; labels (H, W), -1 where no tile."""
    ys, xs = np.nonzero(labels >= 0)
    h, w = labels.shape
    fields = dict(
        slide="/slides/case-01.svs",
        class_names=list(CLASSES),
        coords=np.stack([xs, ys], 1) * SIZE0,
        size0=SIZE0,
        probs=one_hot(labels[ys, xs].tolist()),
        thumbnail=np.full((h, w, 3), 200, np.uint8),
        thumb_downsample=float(SIZE0),
    )
    fields.update(kw)
    return SlideResult(**fields)


LABELS = np.array(
    [
        [0, 0, 1, -1, -1, 3],
        [0, 2, 1, -1, 3, 3],
        [-1, -1, -1, -1, -1, -1],
        [0, 0, 0, 0, 1, -1],
    ]
)


def test_heatmap_paints_each_tile_with_its_class():
    probs, argmax = class_heatmap(grid_result(LABELS))
    assert probs.shape == (4, 4, 6) and probs.dtype == np.float32
    assert argmax.shape == (4, 6) and argmax.dtype == np.int16
    np.testing.assert_array_equal(argmax, LABELS)
    tile = LABELS >= 0
    assert np.allclose(probs.max(0)[tile], 0.7) and np.allclose(probs.sum(0)[tile], 1.0)
    assert (probs[:, ~tile] == 0).all()


def test_heatmap_at_a_finer_downsample_paints_whole_footprints():
    _, argmax = class_heatmap(grid_result(LABELS), downsample=SIZE0 / 2)
    assert argmax.shape == (8, 12)
    np.testing.assert_array_equal(argmax, np.kron(LABELS, np.ones((2, 2), int)))


def test_overlapping_tiles_are_averaged():
    # Two 64-px tiles 32 px apart at downsample 32: columns 0, 1 | 1, 2 -> column 1 is their mean.
    probs = np.array([[0.9, 0.1], [0.3, 0.7]], np.float32)
    result = SlideResult(
        slide="s.svs",
        class_names=["a", "b"],
        coords=np.array([[0, 0], [32, 0]]),
        size0=64,
        probs=probs,
        thumbnail=np.zeros((2, 4, 3), np.uint8),
        thumb_downsample=32.0,
    )
    maps, argmax = class_heatmap(result)
    np.testing.assert_allclose(maps[0, 0], [0.9, 0.6, 0.3, 0.0], atol=1e-6)
    np.testing.assert_allclose(maps[1, 1], [0.1, 0.4, 0.7, 0.0], atol=1e-6)
    np.testing.assert_array_equal(argmax[0], [0, 0, 1, -1])


def test_tiles_outside_the_thumbnail_are_an_engine_bug():
    result = grid_result(LABELS)
    result.coords[0] = (100 * SIZE0, 0)
    with pytest.raises(ValueError, match="outside the thumbnail"):
        class_heatmap(result)


def test_area_fractions_with_and_without_tissue_weighting():
    labels = np.array([[0, 0, 1, 3]])
    plain = area_fractions(grid_result(labels))
    assert list(plain) == CLASSES
    assert plain == pytest.approx({"normal": 0.5, "benign": 0.25, "in_situ": 0.0, "invasive": 0.25})
    weighted = area_fractions(grid_result(labels, tissue_fraction=np.array([1.0, 1.0, 0.5, 0.5])))
    assert weighted == pytest.approx({"normal": 2 / 3, "benign": 1 / 6, "in_situ": 0.0, "invasive": 1 / 6})
    assert sum(weighted.values()) == pytest.approx(1.0)


def fractions_and_probs(shares: dict[str, float], n: int = 100) -> tuple[dict[str, float], np.ndarray]:
    labels = [CLASSES.index(c) for c, s in shares.items() for _ in range(round(s * n))]
    probs = one_hot(labels)
    return area_fractions(grid_result(np.array([labels]), probs=probs)), probs


def test_call_is_the_most_severe_class_over_five_percent():
    shares = {"normal": 0.80, "benign": 0.10, "in_situ": 0.04, "invasive": 0.06}
    fractions, probs = fractions_and_probs(shares)
    call = slide_call(fractions, probs)
    assert call["label"] == "invasive" and call["by"] == "severity"
    assert call["share"] == pytest.approx(0.06) and call["confidence"] == pytest.approx(0.7)
    assert "5%" in call["rule"] and "normal < benign < in_situ < invasive" in call["rule"]


def test_classes_below_five_percent_are_ignored():
    fractions, probs = fractions_and_probs({"normal": 0.60, "benign": 0.36, "in_situ": 0.0, "invasive": 0.04})
    assert slide_call(fractions, probs)["label"] == "benign"
    assert slide_call(fractions, probs, CallRule(min_share=0.04))["label"] == "invasive"


def test_custom_severity_order():
    fractions, probs = fractions_and_probs({"normal": 0.50, "benign": 0.2, "in_situ": 0.0, "invasive": 0.3})
    rule = CallRule(severity=["invasive", "normal", "in_situ", "benign"])
    call = slide_call(fractions, probs, rule)
    assert call["label"] == "benign" and "invasive < normal < in_situ < benign" in call["rule"]


def test_confidence_is_the_mean_probability_over_tiles_predicted_as_the_call():
    fractions, probs = fractions_and_probs({"normal": 0.5, "invasive": 0.5}, n=4)
    probs[2:, 3] = [0.9, 0.5]
    probs[2:, 0] = [0.05, 0.3]
    assert slide_call(fractions, probs)["confidence"] == pytest.approx(0.7)


def test_no_tissue_gives_no_call():
    fractions = dict.fromkeys(CLASSES, 0.0)
    call = slide_call(fractions, np.zeros((0, 4), np.float32))
    assert call["label"] is None and call["confidence"] is None and call["by"] == "no tissue"


def test_unknown_severity_class_is_a_config_error_naming_both():
    with pytest.raises(ConfigError, match="tumour") as info:
        check_rule(CallRule(severity=["normal", "tumour"]), CLASSES)
    assert all(c in str(info.value) for c in CLASSES)
    with pytest.raises(ConfigError, match="exactly once"):
        check_rule(CallRule(severity=["normal", "benign", "invasive"]), CLASSES)
    with pytest.raises(ConfigError, match="min_share"):
        check_rule(CallRule(min_share=0.0), CLASSES)


def test_inconsistent_engine_arrays_raise_value_error():
    with pytest.raises(ValueError, match="probs shape"):
        area_fractions(grid_result(LABELS, class_names=CLASSES[:3]))
    with pytest.raises(ValueError, match="tissue_fraction"):
        area_fractions(grid_result(LABELS, tissue_fraction=np.ones(3)))
    with pytest.raises(ValueError, match="annotation_map"):
        area_fractions(grid_result(LABELS, annotation_map=np.zeros((4, 6), np.uint8)))


def test_palette_is_fixed_per_class_index():
    eight = class_colors(8)
    assert eight.shape == (8, 3) and eight.dtype == np.uint8
    assert len({tuple(c) for c in eight}) == 8
    np.testing.assert_array_equal(class_colors(3), eight[:3])
    np.testing.assert_array_equal(eight[0], [31, 119, 180])  # tab10 blue


@pytest.mark.parametrize("shape", [(4, 6), (3, 60), (60, 3)])
def test_write_slide_outputs_writes_every_file(tmp_path, shape):
    labels = np.resize(LABELS, shape)
    amap = np.where(labels >= 0, labels, 255).astype(np.uint8)
    result = grid_result(
        labels,
        annotation_map=amap,
        annotation_downsample=float(SIZE0),
        timings={"load": 0.5, "process": 1.5, "total": 2.0},
        extra={"artifact": "deit_tiny-int8", "mpp": np.float32(0.5)},
    )
    out = tmp_path / "case-01"
    report = write_slide_outputs(result, out, CallRule())
    written = sorted(p.name for p in out.iterdir())
    assert written == ["heatmap.png", "overlay.png", "report.json", "report.png"]
    heat = cv2.cvtColor(cv2.imread(str(out / "heatmap.png")), cv2.COLOR_BGR2RGB)
    assert heat.shape == (*shape, 3)
    colours = class_colors(4)
    ys, xs = np.nonzero(labels >= 0)
    np.testing.assert_array_equal(heat[ys, xs], colours[labels[ys, xs]])
    assert (heat[labels < 0] == 255).all()
    over = cv2.imread(str(out / "overlay.png"))
    assert over.shape == (*shape, 3)
    assert (over[labels < 0] == 200).all() and (over[labels >= 0] != 200).any()
    page = cv2.imread(str(out / "report.png"))
    assert page is not None and min(page.shape[:2]) >= 300

    saved = json.loads((out / "report.json").read_text())
    assert saved == report
    n = int((labels >= 0).sum())
    assert saved["n_tiles"] == n and saved["class_names"] == CLASSES and saved["status"] == "ok"
    assert saved["fractions"] == pytest.approx(area_fractions(result))
    assert saved["call"]["label"] == slide_call(area_fractions(result), result.probs)["label"]
    assert saved["timings"] == {"load": 0.5, "process": 1.5, "total": 2.0}
    assert saved["seconds"] == 2.0 and saved["tiles_per_s"] == pytest.approx(n / 2.0)
    assert saved["extra"] == {"artifact": "deit_tiny-int8", "mpp": 0.5}
    assert saved["colors"]["normal"] == "#1f77b4"
    assert saved["files"] == {"heatmap": "heatmap.png", "overlay": "overlay.png", "report": "report.png"}
    assert not list(out.glob(".*.tmp"))


def test_write_slide_outputs_checks_the_rule(tmp_path):
    with pytest.raises(ConfigError, match="tumour"):
        write_slide_outputs(grid_result(LABELS), tmp_path, CallRule(severity=["tumour"]))
    assert not list(tmp_path.iterdir())


def test_summary_lists_ok_and_failed_slides(tmp_path):
    tissue = np.ones((4, 6), bool)
    ok = write_slide_outputs(
        grid_result(LABELS, tissue_mask=tissue, mask_downsample=32.0, timings={"total": 4.0}), tmp_path / "a"
    )
    failed = failed_row("/slides/broken.svs", ValueError("Bogus marker length | at (0, 0)"), seconds=0.1)
    timed_outside = {**ok, "slide": "/slides/case-02.svs", "tiles_per_s": None, "seconds": 7.0}
    path = write_summary([ok, failed, timed_outside], tmp_path)
    assert path == tmp_path / "summary.csv"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        frame, columns = list(reader), reader.fieldnames
    assert [r["slide"] for r in frame] == ["/slides/case-01.svs", "/slides/broken.svs", "/slides/case-02.svs"]
    assert [r["status"] for r in frame] == ["ok", "failed", "ok"]
    assert float(frame[2]["tiles_per_s"]) == pytest.approx(2.0) and float(frame[2]["seconds"]) == 7.0
    assert frame[0]["call"] == ok["call"]["label"]
    assert frame[0]["n_tiles"] == "14" and float(frame[0]["tiles_per_s"]) == pytest.approx(3.5)
    assert float(frame[0]["frac_normal"]) == pytest.approx(ok["fractions"]["normal"])
    assert "Bogus marker length" in frame[1]["error"] and frame[1]["call"] == frame[1]["n_tiles"] == ""
    assert {f"frac_{c}" for c in CLASSES} <= set(columns)
    md = (tmp_path / "summary.md").read_text()
    assert "3 slides: 2 ok, 1 failed." in md
    assert "ValueError: Bogus marker length \\| at (0, 0)" in md
    assert md.count("\n| ") == 4  # header and three slides


def test_a_slide_without_tiles_still_gets_its_outputs(tmp_path):
    empty = grid_result(np.full((3, 5), -1), probs=np.zeros((0, 4), np.float32), coords=np.zeros((0, 2), int))
    report = write_slide_outputs(empty, tmp_path)
    assert report["n_tiles"] == 0 and report["call"]["label"] is None
    assert report["fractions"] == dict.fromkeys(CLASSES, 0.0)
    assert (cv2.imread(str(tmp_path / "heatmap.png")) == 255).all()
    assert cv2.imread(str(tmp_path / "report.png")) is not None
