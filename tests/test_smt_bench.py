"""The SMT benchmark's measurement side (``slides.smt_selection``): lesion-size buckets on known lesions,
settings chosen on validation slides only (triage band, thresholds, walk), localisation hit rates and the
FROC on known masks and regions, the balanced-accuracy bootstrap, bad knobs refused, and the pieces end to
end on tiny synthetic slides with untrained micro models."""

from __future__ import annotations

import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from patholite.data.synthetic.slides import Lesion, Truth, read_truth, write_synthetic_slide
from patholite.data.synthetic.spec import LesionSpec, SlideSpec, lesions_of_size, size_category
from patholite.errors import ConfigError
from patholite.measure.stats import auroc
from patholite.slides.comparison import check_held_out
from patholite.slides.comparison_runs import SlideCase, compare_slides
from patholite.slides.smt_selection import (
    Knobs,
    Selection,
    boxes_hitting,
    check_knobs,
    check_validation_set,
    choose_threshold,
    composite_scores,
    fast_auroc,
    froc,
    greatest_diameter_um,
    lesion_records,
    localisation,
    paired_balanced_accuracy,
    select,
    select_then_test,
    selection_markdown,
    size_set_cases,
    size_set_spec,
    size_table,
    triage_results,
    validation_rows,
)

CLASSES = ["Normal", "Tumor"]


# ------------------------------------------------------------------------------------------ sizes
def _rect(x: float, y: float, w: float, h: float) -> np.ndarray:
    return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.float64)


def _truth(lesions: list[tuple[str, np.ndarray]], mpp: float = 0.5) -> Truth:
    """A 20,000-px slide's truth holding ``lesions`` (class, level-0 outline); maps are not used here."""
    items = [Lesion(c, tuple(p.mean(0)), 0.0, 0.0, p) for c, p in lesions]
    labels = np.zeros((4, 4), np.uint8)
    return Truth(labels == 0, labels, 5000, ["Normal", "Tumor"], (20000, 20000), mpp, items)


# greatest diameters at 0.5 um/px: 300 x 400 px -> 500 px = 250 um (micro); 120 x 160 px -> 200 px = 100 um
# (itc); 3000 x 4000 px -> 5000 px = 2500 um (macro)
MICRO, ITC, MACRO = _rect(1000, 1000, 300, 400), _rect(5000, 5000, 120, 160), _rect(10000, 10000, 3000, 4000)


def test_size_categories_follow_camelyon_and_the_greatest_diameter():
    assert [size_category(d) for d in (1.0, 199.9, 200.0, 1999.0, 2000.0, 5000.0)] == [
        "itc", "itc", "micro", "micro", "macro", "macro",
    ]  # fmt: skip
    assert greatest_diameter_um(MICRO, 0.5) == pytest.approx(250.0)
    assert greatest_diameter_um(ITC, 0.5) == pytest.approx(100.0)
    assert greatest_diameter_um(MACRO, 0.5) == pytest.approx(2500.0)
    with pytest.raises(ValueError):
        size_category(-1.0)


def _row(name: str, regions, region_pos, tiles, tile_pos, smt_score, tiling_max, size0=100) -> dict:
    """A test row as ``compare_slides`` makes it, with only what localisation reads."""
    probs = [[1 - p, p] for p in region_pos]
    return {
        "slide": name, "label": 1,
        "smt": {"positive": smt_score, "negative": 0, "last_probs": probs,
                "layers": [{"boxes": []}, {"boxes": regions}]},
        "tiling": {"max": tiling_max, "coords": np.asarray(tiles, np.float64).reshape(-1, 2),
                   "tile_positive": np.asarray(tile_pos, np.float64), "size0": size0},
    }  # fmt: skip


SEL = Selection(top_k=2, aggregate="max", smt_threshold=0.5, tiling_threshold=0.6, band=(0.3, 0.7))


def test_lesion_size_buckets_and_detections_on_known_lesions():
    # slide a: an ITC and a micro-metastasis. SMT's two regions: one over the micro (p 0.9), one over
    # nothing; tiling: a tile over the ITC at 0.7 (>= 0.6: detected) and one over the micro at 0.5 (missed)
    a = _row("a", [[1100, 1100, 50], [15000, 15000, 50]], [0.9, 0.2], [[5000, 5000], [1000, 1000]],
             [0.7, 0.5], smt_score=0.9, tiling_max=0.7)  # fmt: skip
    # slide b: a macro-metastasis, SMT's region over it but unconvinced (0.4), tiling finds nothing over it
    b = _row("b", [[12000, 12000, 100]], [0.4], [[0, 0]], [0.9], smt_score=0.4, tiling_max=0.9)
    truths = [_truth([("Tumor", ITC), ("Tumor", MICRO)]), _truth([("Tumor", MACRO)])]
    lesions, detections = lesion_records([a, b], truths, SEL)
    by = {(x["slide"], x["category"]): x for x in lesions}
    assert set(by) == {("a", "itc"), ("a", "micro"), ("b", "macro")}
    assert by["a", "itc"]["slide_category"] == "micro"  # a slide is as large as its largest lesion
    assert (by["a", "itc"]["smt_seen"], by["a", "itc"]["tiling_detected"]) == (False, True)
    assert (by["a", "micro"]["smt_seen"], by["a", "micro"]["smt_detected"]) == (True, True)
    assert by["a", "micro"]["tiling_detected"] is False
    assert (by["b", "macro"]["smt_seen"], by["b", "macro"]["smt_detected"]) == (True, False)
    assert by["b", "macro"]["smt_slide_call"] is False and by["b", "macro"]["tiling_slide_call"] is True
    table = size_table(lesions)
    assert table["itc"] == {
        "lesions": 1, "slides": 0, "smt_seen": 0.0, "smt_detected": 0.0, "tiling_detected": 1.0,
        "smt_slide_call": None, "tiling_slide_call": None,
    }  # fmt: skip
    assert table["micro"]["slides"] == 1 and table["micro"]["smt_slide_call"] == 1.0
    assert table["macro"]["tiling_slide_call"] == 1.0 and table["macro"]["smt_detected"] == 0.0
    assert len(detections["smt"]) == len(detections["tiling"]) == 2


def test_a_box_touching_a_lesion_only_at_its_edge_does_not_hit_it():
    hits = boxes_hitting([[900, 1000, 100], [900, 1000, 101], [0, 0, 10]], [shapely_box_lesion()])
    assert hits[:, 0].tolist() == [False, True, False]


def shapely_box_lesion():
    import shapely

    return shapely.Polygon(MICRO)


def test_the_size_set_holds_one_lesion_of_its_category_per_slide(tmp_path):
    cases = size_set_cases(tmp_path, SlideSpec(1024, 1024), ["itc"], 1)
    assert [c.label for c in cases] == [1] and cases[0].path.parent.name == "itc"
    (lesion,) = read_truth(cases[0].path).lesions
    assert lesion.cls == "Invasive" and size_category(greatest_diameter_um(lesion.polygon, 0.5)) == "itc"


# ---------------------------------------------------------------------------------------- localisation
def test_localisation_hit_rate_on_a_known_mask_and_regions(tmp_path):
    """A real synthetic slide with one lesion: a region over the lesion's centre hits, one far off does not;
    tiles likewise; a lesion-free slide adds false positives only."""
    lesion = [LesionSpec("Invasive", 1, (100.0, 100.0))]
    slide = write_synthetic_slide(tmp_path / "a.svs", SlideSpec(1024, 1024, seed=3, lesions=lesion))
    (cx, cy) = slide.lesions[0].centre
    on, off = [cx - 8, cy - 8, 16], [0, 0, 16]
    pos = _row("a.svs", [on, off], [0.8, 0.9], [[cx - 8, cy - 8], [0, 0]], [0.9, 0.3], 0.9, 0.9, size0=16)
    neg = _row("n.svs", [off], [0.9], [[0, 0]], [0.95], 0.9, 0.95, size0=16)
    neg["label"] = 0
    cases = [SlideCase(slide.path, 1), SlideCase(tmp_path / "n.svs", 0)]
    loc = localisation([pos, neg], cases, SEL)
    assert loc["lesions"] == 1
    assert loc["hit_rate"] == {"smt_seen": 1.0, "smt_detected": 1.0, "tiling_detected": 1.0}
    # SMT: the far region (0.9) on the lesion slide and the lesion-free slide's (0.9): 2 FPs over 2 slides
    # at 0.9; the lesion is found at 0.8, by which point 1 FP per slide has been paid
    assert loc["froc"]["smt"]["sensitivity_at"]["0.5"] == 0.0
    assert loc["froc"]["smt"]["sensitivity_at"]["1.0"] == 1.0
    assert loc["froc"]["tiling"]["sensitivity_at"]["0.5"] == 1.0  # tiling: 0.95 FP, then the lesion at 0.9


def test_froc_counts_lesions_and_false_positives_per_slide():
    # two slides; slide 1: detections 0.9 (lesion 0), 0.8 (no lesion), 0.3 (lesion 1); slide 2: 0.7 (FP)
    d1 = (np.array([0.9, 0.8, 0.3]), np.array([[True, False], [False, False], [False, True]]))
    d2 = (np.array([0.7]), np.zeros((1, 0), bool))
    result = froc([d1, d2], rates=(0.25, 0.5, 1.0))
    # thresholds 0.9: sens 1/2, FP 0; 0.8: 1/2, 0.5/slide; 0.7: 1/2, 1; 0.3: 1, 1
    assert result["lesions"] == 2
    assert result["sensitivity_at"] == {"0.25": 0.5, "0.5": 0.5, "1.0": 1.0}
    assert result["score"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------- selection
def _val_rows(n: int = 48) -> list[dict]:
    """Validation rows where K=4 max ranks best; SMT is unsure (0.4-0.6) on a third of the slides."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        y = i % 2
        unsure = i % 3 == 0
        smt = rng.uniform(0.4, 0.6) if unsure else (rng.uniform(0.65, 1.0) if y else rng.uniform(0.0, 0.35))
        rows.append({
            "slide": f"v{i}", "label": y, "reads": {2: 7, 4: 21},
            "smt": {"K=2,mean": rng.uniform(0, 1), "K=2,max": rng.uniform(0, 1),
                    "K=4,mean": rng.uniform(0, 1), "K=4,max": smt},
            "tiling_max": 0.9 + 0.1 * y * rng.uniform(0.5, 1) + rng.uniform(0, 0.04),
        })  # fmt: skip
    return rows


def _test_rows(scale: float) -> list[dict]:
    """Test rows the selection must not depend on (``scale`` changes them entirely)."""
    return [
        {"slide": f"t{i}", "label": i % 2,
         "smt": {"positive": (scale * i) % 1.0, "wall_s": 0.2, "file_pixels": 1e6},
         "tiling": {"max": 0.5 + 0.5 * (i % 2), "wall_s": 8.0, "file_pixels": 1.5e8}}
        for i in range(12)
    ]  # fmt: skip


KNOBS = Knobs(top_ks=(2, 4), aggregates=("mean", "max"), gap=0.03, max_share=0.5, min_val_slides=48)


def test_selection_is_made_on_validation_slides_only():
    val = _val_rows()
    alone = select(val, KNOBS)
    assert (alone.top_k, alone.aggregate) == (4, "max")
    assert alone.band is not None and alone.band[0] < alone.smt_threshold <= alone.band[1]
    seen = []

    def tests(scale):
        def provide(selection: Selection) -> list[dict]:
            seen.append(selection)  # the choice is made and frozen before a test row exists
            return _test_rows(scale)

        return provide

    first, rows1 = select_then_test(val, KNOBS, tests(0.37))
    second, rows2 = select_then_test(val, KNOBS, tests(0.91))
    assert first == second == alone == seen[0] == seen[1]  # other test slides: the same choice
    assert rows1 != rows2
    # triage on the test rows applies the frozen band and thresholds; nothing is re-fitted there
    result = triage_results(rows1, first, resamples=50)
    smt = np.array([r["smt"]["positive"] for r in rows1])
    inside = (smt >= first.band[0]) & (smt <= first.band[1])
    assert result["n_triaged"] == int(inside.sum()) and result["band"] == first.band
    assert result["methods"]["smt"]["threshold"] == first.smt_threshold
    walls = [0.2 + 8.0 * x for x in inside]
    assert result["methods"]["triage"]["wall_s_mean"] == pytest.approx(np.mean(walls))
    assert result["methods"]["triage"]["wall_s_max"] == pytest.approx(max(walls))
    assert "Triage on the test slides" in selection_markdown(
        {"selection": first.as_dict(), "triage": result, "held_out": {"val_seed": 2, "test_seed": 3}}
    )


def test_triage_composite_keeps_tiling_calls_inside_the_band():
    smt = np.array([0.1, 0.45, 0.55, 0.9])
    tiling = np.array([0.99, 0.2, 0.95, 0.0])
    scores, inside = composite_scores(smt, tiling, (0.4, 0.6), 0.5, 0.9)
    assert inside.tolist() == [False, True, True, False]
    assert scores[0] == 0.1 and scores[3] == 0.9  # outside: SMT's own scores
    assert (scores[1:3] >= 0.5).tolist() == (tiling[1:3] >= 0.9).tolist()  # inside: tiling's calls
    assert 0.4 <= scores[1] < 0.5 <= scores[2] <= 0.6
    with pytest.raises(ValueError):
        composite_scores(smt, tiling, (0.5, 0.6), 0.5, 0.9)  # the band must hold SMT's threshold


def test_thresholds_auroc_and_balanced_accuracy_bootstrap():
    labels = [0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.2, 0.6, 0.7, 0.8, 0.9]
    assert 0.6 < choose_threshold(scores, labels) <= 0.7  # between the last negative and the first positive
    for s in ([0.1, 0.4, 0.4, 0.8], [0.5] * 4):
        assert fast_auroc(np.array(s), np.array([0, 0, 1, 1])) == pytest.approx(auroc(s, [0, 0, 1, 1]))
    same = paired_balanced_accuracy(scores, scores, labels, 0.65, 0.65, n=100)
    assert same["difference"] == 0.0 and same["ci95"] == [0.0, 0.0]
    # b at 0.0 calls everything positive: balanced accuracy 0.5; a at 0.65 is perfect: +0.5
    better = paired_balanced_accuracy(scores, scores, labels, 0.65, 0.0, n=100)
    assert better["difference"] == pytest.approx(0.5) and better["ci95"] == [0.5, 0.5]
    assert 0 < better["draws"] <= 100


# ---------------------------------------------------------------------------------------------- knobs
def test_bad_knobs_are_refused_with_the_knob_named():
    with pytest.raises(ConfigError, match="--top-k 17"):
        check_knobs(Knobs(top_ks=(4, 17)), grid=4)
    with pytest.raises(ConfigError, match="--aggregate"):
        check_knobs(Knobs(top_ks=(4,), aggregates=("median",)), grid=4)
    with pytest.raises(ConfigError, match="--triage-gap"):
        check_knobs(Knobs(top_ks=(4,), gap=1.5), grid=4)
    with pytest.raises(ConfigError, match="--triage-max-share"):
        check_knobs(Knobs(top_ks=(4,), max_share=-0.1), grid=4)
    with pytest.raises(ConfigError, match="at least 48"):
        check_validation_set([0, 1] * 20, 48)  # 40 slides
    with pytest.raises(ConfigError, match="half of each class"):
        check_validation_set([0] * 40 + [1] * 8, 48)
    check_validation_set([0, 1] * 24, 48)
    with pytest.raises(ConfigError, match="'huge' is unknown"):
        lesions_of_size("huge")
    same = OmegaConf.create({"dataset": {"seed": 1}})
    with pytest.raises(ConfigError, match="dataset.seed=2"):
        check_held_out(same, same)
    assert check_held_out(same, OmegaConf.create({"dataset": {"seed": 4}})) == {"val_seed": 1, "test_seed": 4}
    small = OmegaConf.create({"name": "smt_synthetic", "width": 4096, "height": 4096, "difficulty": 0.5})
    with pytest.raises(ConfigError, match="--size-set macro"):
        size_set_spec(small, ["itc", "macro"])  # 2.8-mm lesions on a 2-mm slide
    with pytest.raises(ConfigError, match="leave --size-set out"):
        size_set_spec(OmegaConf.create({"name": "camelyon16"}), ["itc"])


# ------------------------------------------------------------------------------------------ end to end
def test_selection_triage_and_localisation_on_tiny_slides(micro_slide_models, tmp_path):
    smt, tile = micro_slide_models
    lesion = [LesionSpec("Invasive", 1, (60.0, 90.0))]

    cases = [  # a slide with a lesion, one without; validation and test alike (the plumbing only: the
        # choice's independence from the test slides is the test above)
        SlideCase(write_synthetic_slide(tmp_path / f"s{i}.svs",
                                        SlideSpec(1024, 1024, seed=10 + i, lesions=les)).path, y)
        for i, (les, y) in enumerate([(lesion, 1), ([], 0)])
    ]  # fmt: skip
    knobs = check_knobs(Knobs(top_ks=(1, 2), min_val_slides=2), grid=4)
    val = validation_rows(cases, smt, tile, None, knobs)
    assert set(val[0]["smt"]) == {"K=1,mean", "K=1,max", "K=2,mean", "K=2,max"}
    assert val[0]["reads"] == {1: 3, 2: 7}
    test_cases = cases

    def provide(selection: Selection) -> list[dict]:
        smt[1]["model"]["smt"].update(top_k=selection.top_k, aggregate=selection.aggregate)
        return compare_slides(test_cases, smt, tile, None, methods=("smt", "tiling"))

    selection, rows = select_then_test(val, knobs, provide)
    assert all(r["smt"]["reads"] == 1 + selection.top_k + selection.top_k**2 for r in rows)
    result = triage_results(rows, selection, resamples=20)
    assert set(result["methods"]) == {"smt", "triage", "tiling_max"}
    assert not math.isnan(result["methods"]["triage"]["wall_s_mean"])
    loc = localisation(rows, test_cases, selection)
    assert loc["lesions"] == 1 and loc["froc"]["tiling"]["lesions"] == 1
    assert sum(v["lesions"] for v in loc["size_table"].values()) == 1
