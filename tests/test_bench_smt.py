"""SMT against full tiling: the slide-free statistics (``measure.stats``: AUROC, binary quality, the paired
bootstrap), the comparison's pieces (``slides.comparison_runs``, ``slides.comparison``: focusing precision,
the rotation, the cost summary, the records) on hand-made values, the comparison end to end on tiny
synthetic slides with untrained micro models, and ``scripts/bench_smt.py`` (its help; the whole script after
two trainings is slow)."""

from __future__ import annotations

import json
import math
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from patholite.data.synthetic.slides import Truth, write_synthetic_slide
from patholite.data.synthetic.spec import LesionSpec, SlideSpec
from patholite.errors import ConfigError
from patholite.measure.compare import find_records
from patholite.measure.evaluate import bootstrap_accuracy_ci
from patholite.measure.stats import auroc, binary_quality, bootstrap, paired_bootstrap
from patholite.records import read_record
from patholite.slides.comparison import (
    BASELINES,
    RECORDED,
    SMT_NAME,
    comparison_results,
    markdown,
    slide_scores,
    summarise,
    with_dataset_overrides,
    write_records,
)
from patholite.slides.comparison_runs import (
    METHODS,
    SlideCase,
    compare_slides,
    focusing_precision,
    mil_scores,
    negative_index,
    overlaps_lesion,
    rotate,
)

from .conftest import REPO, run_cli


# ------------------------------------------------------------------------------------------ statistics
def test_auroc_counts_a_tie_as_half_a_pair():
    # positives 0.4 and 0.8 against negatives 0.1 and 0.4: (0.4>0.1) + (0.4=0.4: 1/2) + 2 -> 3.5 of 4 pairs
    assert auroc([0.1, 0.4, 0.4, 0.8], [0, 0, 1, 1]) == pytest.approx(0.875)
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0  # every pair the wrong way round
    assert auroc([0.5] * 4, [0, 1, 0, 1]) == pytest.approx(0.5)


def test_binary_quality_at_the_threshold():
    # calls at 0.5: [0, 0, 1, 0, 1] against [0, 0, 0, 1, 1]: 3 of 5 right; recalls 2/3 (negatives), 1/2
    # (positives); AUROC: positive 0.4 beats 0.1, ties 0.4, loses to 0.6 (1.5), positive 0.8 beats all (3)
    q = binary_quality([0.1, 0.4, 0.6, 0.4, 0.8], [0, 0, 0, 1, 1])
    assert q["n_slides"] == 5 and q["n_positive"] == 2
    assert q["accuracy"] == pytest.approx(3 / 5)
    assert q["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert q["auroc"] == pytest.approx(4.5 / 6)
    assert binary_quality([0.5], [1])["accuracy"] == 1.0  # 0.5 itself is called positive
    one_class = binary_quality([0.2, 0.7, 0.9], [1, 1, 1])  # no AUROC; balanced = the one recall, 2/3
    assert one_class["auroc"] is None and one_class["balanced_accuracy"] == pytest.approx(2 / 3)


def test_bootstrap_of_a_constant_and_of_no_units():
    flat = bootstrap(lambda idx: torch.full((len(idx),), 0.25), 5, resamples=50)
    assert flat == {"value": 0.25, "ci": [0.25, 0.25], "draws": 50}
    none = bootstrap(lambda idx: idx.float().mean(1), 0)
    assert none["draws"] == 0 and all(math.isnan(v) for v in [none["value"], *none["ci"]])


def test_bootstrap_accuracy_ci_is_unchanged():
    """The image-level interval of the run records, now through ``bootstrap``: the values it gave before."""
    correct = torch.tensor([True] * 8 + [False] * 2)
    assert bootstrap_accuracy_ci(correct) == [0.5, 1.0]
    assert bootstrap_accuracy_ci(correct, 200, 0.9, seed=3) == [0.6000000238418579, 1.0]
    assert all(math.isnan(v) for v in bootstrap_accuracy_ci(torch.tensor([], dtype=torch.bool)))


LABELS = [0, 0, 0, 1, 1, 1] * 4
GOOD = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9] * 4


def test_paired_bootstrap_of_identical_methods_is_exactly_zero():
    same = paired_bootstrap(GOOD, GOOD, LABELS, n=200)
    assert same["accuracy"] == {"difference": 0.0, "ci95": [0.0, 0.0], "draws": 200}
    # a resample of 24 slides is one class with probability 2 / 2^24: every draw has an AUROC
    assert same["auroc"] == {"difference": 0.0, "ci95": [0.0, 0.0], "draws": 200}


def test_paired_bootstrap_of_a_method_better_on_every_slide_excludes_zero():
    # the baseline ranks every pair backwards and calls every slide wrongly: each resample (with both
    # classes) has accuracy 1 - 0 and AUROC 1 - 0, so the interval is the single point 1
    worse = [1 - p for p in GOOD]
    better = paired_bootstrap(GOOD, worse, LABELS, n=200)
    assert better["accuracy"] == {"difference": 1.0, "ci95": [1.0, 1.0], "draws": 200}
    assert better["auroc"]["difference"] == 1.0 and better["auroc"]["ci95"] == [1.0, 1.0]
    mixed = paired_bootstrap(GOOD, [0.1, 0.2, 0.8, 0.7, 0.8, 0.4] * 4, LABELS, n=500)
    low, high = mixed["auroc"]["ci95"]  # a baseline wrong on some slides: a real interval around the gap
    assert 0 < low < mixed["auroc"]["difference"] < high <= 1


def test_paired_bootstrap_leaves_one_class_resamples_out_of_the_auroc():
    # two slides, one of each class: a resample draws (0, 0), (1, 1) (one class: no AUROC) or (0, 1), (1, 0)
    res = paired_bootstrap([0.2, 0.8], [0.8, 0.2], [0, 1], n=500, seed=0)
    idx = torch.randint(0, 2, (500, 2), generator=torch.Generator().manual_seed(0))  # the same resamples
    mixed = int((idx[:, 0] != idx[:, 1]).sum())
    assert 0 < mixed < 500
    assert res["auroc"] == {"difference": 1.0, "ci95": [1.0, 1.0], "draws": mixed}
    assert res["accuracy"]["draws"] == 500 and res["accuracy"]["difference"] == 1.0
    one_class = paired_bootstrap(GOOD, [0.0] * len(GOOD), [1] * len(GOOD), n=50)  # no AUROC at all
    assert one_class["auroc"]["draws"] == 0 and math.isnan(one_class["auroc"]["difference"])
    assert all(math.isnan(v) for v in one_class["auroc"]["ci95"])
    # the accuracy still has one: GOOD calls 12 of 24 positives right, all-zero scores none
    assert one_class["accuracy"]["difference"] == 0.5 and one_class["accuracy"]["draws"] == 50


# -------------------------------------------------------------------------------------------- focusing
def _truth() -> Truth:
    """An 80 x 80 px slide at 10 level-0 px per truth pixel: a lesion (class 2) in x, y < 20, off-tissue
    (255) in the last truth row, normal tissue (0) elsewhere."""
    labels = np.zeros((8, 8), dtype=np.uint8)
    labels[:2, :2] = 2
    labels[7, :] = 255
    tissue = labels != 255
    return Truth(tissue, labels, 10, ["Normal", "Benign", "InSitu", "Invasive"], (80, 80), 0.5, [])


def test_a_box_overlaps_a_lesion_only_where_truth_says_so():
    truth = _truth()
    assert overlaps_lesion([0, 0, 10], truth) and overlaps_lesion([15, 15, 30], truth)
    assert not overlaps_lesion([20, 0, 20], truth)  # starts where the lesion ends
    assert not overlaps_lesion([0, 70, 10], truth)  # off tissue is no lesion


def test_focusing_precision_against_chance():
    # layer 0: the whole slide; grid 2 -> 4 candidate patches of 40 px, only (0, 0) over the lesion
    # layer 1 (K = 2): (0, 0) and (40, 40): 1 of 2 over the lesion; chance 1/4
    # layer 2: 8 candidates of 20 px in those two, only (0, 0) over the lesion (chance 1/8); of the
    # K^2 = 4 focused regions, only (0, 0): precision 1/4
    walk = {
        "layers": [
            {"boxes": [[0, 0, 80]]},
            {"boxes": [[0, 0, 40], [40, 40, 40]]},
            {"boxes": [[0, 0, 20], [20, 0, 20], [0, 20, 20], [40, 40, 20]]},
        ]
    }
    assert focusing_precision(walk, _truth(), grid=2) == {
        "layer1": {"precision": 0.5, "chance": 0.25},
        "layer2": {"precision": 0.25, "chance": 0.125},
    }


# ---------------------------------------------------------------------------------- comparison pieces
def test_every_method_takes_its_turn_first():
    assert [rotate(METHODS, n)[0] for n in range(4)] == ["smt", "smt_tiler_mask", "tiling", "smt"]
    assert rotate(("a", "b", "c"), 1) == ["b", "c", "a"]


def test_the_negative_class_of_a_tile_classifier():
    assert negative_index(["Benign", "InSitu", "Invasive", "Normal"], "tile classifier") == 3
    assert negative_index(["Benign", "Malignant"], "tile classifier") == 0  # PANDA-like
    with pytest.raises(ConfigError, match="no Normal/Benign"):
        negative_index(["A", "B"], "tile classifier")


def test_other_test_slides_take_dataset_keys_only():
    cfg = OmegaConf.create({"dataset": {"seed": 0, "slides_per_split": [4, 2, 2]}, "model": {"name": "smt"}})
    with pytest.raises(ConfigError, match="give dataset.<key>=<value>"):
        with_dataset_overrides(cfg, ["dataset.seed=1", "model.smt.top_k=8"])
    other = with_dataset_overrides(cfg, ["dataset.seed=1", "dataset.slides_per_split=[2,2,24]"])
    assert other.dataset.seed == 1 and list(other.dataset.slides_per_split) == [2, 2, 24]
    assert cfg.dataset.seed == 0  # a copy


def _run(wall: float, tissue: float, pixels: float, **extra) -> dict:
    return {"wall_s": wall, "tissue_s": tissue, "file_pixels": pixels, "model_pixels": 2 * pixels,
            "area_level0": 4 * pixels, **extra}  # fmt: skip


def _rows() -> list[dict]:
    """Two slides: SMT 1 s and 3 s (0.5 s tissue), tiling 10 s and 12 s (2 s tissue and tiling)."""
    smt = {
        "reads": 7,
        "layer3_level0_px_per_px": 1.0,
        "box": [0, 0, 100],
        "positive": 0.9,
        "positive_max": 0.9,
    }
    return [
        {"slide": "a", "label": 1, "smt": _run(1.0, 0.5, 100.0, **smt),
         "smt_tiler_mask": _run(2.0, 1.0, 100.0, **{**smt, "box": [10, 0, 100]}),
         "tiling": _run(10.0, 2.0, 1000.0, tiles=50, level0_px_per_px=4.0, max=0.8, mean=0.3)},
        {"slide": "b", "label": 0, "smt": _run(3.0, 0.5, 300.0, **{**smt, "positive": 0.2}),
         "smt_tiler_mask": _run(4.0, 1.0, 300.0, **{**smt, "positive": 0.6}),
         "tiling": _run(12.0, 2.0, 1200.0, tiles=70, level0_px_per_px=4.0, max=0.7, mean=0.1)},
    ]  # fmt: skip


def test_summary_takes_medians_of_per_slide_ratios():
    s = summarise(_rows())
    assert s["n_slides"] == 2 and s["tiles"] == 60 and s["smt_reads"] == 7
    assert s["smt_wall_s"] == 2.0 and s["tiling_wall_s"] == 11.0
    assert s["smt_wall_s_tissue_excluded"] == 1.5  # 0.5 and 2.5
    assert s["smt_wall_ratio"] == 7.0  # 10 / 1 and 12 / 3: the median of the ratios, not of the times
    assert s["smt_wall_ratio_tissue_excluded"] == pytest.approx((8 / 0.5 + 10 / 2.5) / 2)  # 16 and 4
    assert s["smt_file_pixels"] == 200.0 and s["tiling_area_level0"] == 4400.0  # medians of 100, 300; 4x
    assert s["smt_file_pixels_ratio"] == 7.0 and s["smt_tiler_mask_model_pixels_ratio"] == 7.0  # 10 and 4


def test_records_of_the_comparison_carry_its_declared_names(tmp_path):
    rows = _rows()
    scores = slide_scores(rows)
    assert set(scores) == {SMT_NAME, "tiling_max", "tiling_mean"} and set(RECORDED) == {SMT_NAME, *BASELINES}
    smt_meta = {"model": {"smt": {"image_size": 32, "grid": 4, "top_k": 2, "layers": 3, "aggregate": "mean"}}}
    results = comparison_results(rows, scores, smt_meta, {"mpp": 2.0}, 2048, resamples=50)
    assert results["quality"][SMT_NAME]["accuracy"] == 1.0  # 0.9 on the lesion, 0.2 without
    assert results["quality"][f"{SMT_NAME} (box from the tiler's mask)"]["accuracy"] == 0.5
    assert results["quality"]["tiling_max"]["accuracy"] == 0.5  # 0.7 calls the lesion-free slide positive
    assert results["box_shift"] == {"median": 0.05, "max": 0.1}  # 0 and 10 px of a 100-px box
    assert results["focus"] is None and "# SMT against full tiling" in markdown(results)
    cfg = OmegaConf.create({"model": {"name": "smt_micro", "smt": smt_meta["model"]["smt"]}, "dataset": {}})
    write_records(tmp_path, cfg, results["quality"], rows, {"top_k": 3, "aggregate": None})
    records = find_records([tmp_path / "records"])
    assert sorted(a["name"] for r in records for a in r["artifacts"]) == sorted(scores)  # no MIL: none
    smt = read_record(tmp_path / "records" / SMT_NAME)
    assert smt["entry"] == "bench" and smt["config"]["compression"]["name"] == "bench:smt_fp32 (top_k=3)"
    assert smt["artifacts"][0]["cost"]["latency_ms"]["slide"] == {"p50": 2000.0, "p90": 3000.0}
    with pytest.raises(ConfigError, match="give smt_fp32"):
        comparison_results(rows, {**scores, "tiling_median": [0.5, 0.5]}, smt_meta, {}, None)


# ------------------------------------------------------------------------------------------ end to end
CLASSES = ["Normal", "Tumor"]


def test_comparison_on_tiny_synthetic_slides(micro_slide_models, tmp_path):
    smt, tile = micro_slide_models
    lesion = [LesionSpec("Invasive", 1, (50.0, 90.0))]
    cases = [  # a slide with a lesion, one without
        SlideCase(
            write_synthetic_slide(tmp_path / f"s{i}.svs", SlideSpec(1024, 1024, seed=i, lesions=les)).path, y
        )
        for i, (les, y) in enumerate([(lesion, 1), ([], 0)])
    ]
    rows = compare_slides(cases, smt, tile, None)
    for row in rows:
        walked = [b for layer in row["smt"]["layers"] for b in layer["boxes"]]
        assert row["smt"]["reads"] == 1 + 2 + 4 == len(walked)
        assert row["smt"]["model_pixels"] == 7 * 32 * 32  # 7 reads shown at 32 px
        assert row["tiling"]["tiles"] > 0 and row["tiling"]["embeddings"].shape[0] == row["tiling"]["tiles"]
        assert row["tiling"]["model_pixels"] == row["tiling"]["tiles"] * 32 * 32
        assert ("focus" in row) == (row["label"] == 1)
    # MIL on the test slides' own bags: the plumbing only (the script trains on the training slides')
    bags = [torch.as_tensor(r["tiling"]["embeddings"]) for r in rows]
    mil = mil_scores(bags, [c.label for c in cases], rows, 1, tmp_path, {"class_names": CLASSES})
    assert (tmp_path / "mil_artifact").is_dir() and all(0 <= p <= 1 for p in mil)
    scores = {**slide_scores(rows), "mil_gated": mil}
    results = comparison_results(rows, scores, smt[1], tile[1], 1024, resamples=20)
    assert set(results["smt_minus_baseline"]) == set(BASELINES)
    json.dumps(results)  # embeddings left out: the results are plain JSON
    assert "mil_gated" in markdown(results)


# --------------------------------------------------------------------------------------------- scripts
def test_bench_smt_script_help():
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_smt.py"), "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--smt-run" in result.stdout and "--tile-run" in result.stdout


def test_bench_smt_int8_script_help(capsys, monkeypatch):
    """The INT8 script stands alone (it no longer imports bench_smt.py); in this process, to save a start."""
    script = str(REPO / "scripts" / "bench_smt_int8.py")
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(script, run_name="__main__")
    assert exit_.value.code == 0 and "--artifacts" in capsys.readouterr().out


SLIDES = [
    "dataset=smt_synthetic",
    "dataset.width=2048",
    "dataset.height=2048",
    "dataset.slides_per_split=[4,2,2]",
]


@pytest.mark.slow
def test_bench_smt_compares_smt_with_full_tiling_on_the_same_slides(tmp_path):
    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    runs = {"smt": ["model=smt_micro"], "tile": ["model=vit_micro"]}
    for name, model in runs.items():
        run = f"hydra.run.dir={tmp_path / name}"
        result = run_cli([*model, *SLIDES, "debug=fast", "logger=csv", cache, run], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_smt.py"), "--smt-run", str(tmp_path / "smt"),
         "--tile-run", str(tmp_path / "tile"), "--out", str(out), "--sizes", "3072", "--scale-slides", "1",
         "--mil-epochs", "2", "--test-set", "dataset.seed=1",  # fresh test slides; MIL on the run's
         "--min-val-slides", "2"],  # settings chosen on the run's 2 validation slides
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["quality"]) == {
        "smt_fp32", "smt_fp32 (max over layer-3 images)", "smt_fp32 (box from the tiler's mask)",
        "tiling_max", "tiling_mean", "mil_gated",
    }  # fmt: skip
    assert set(results["smt_minus_baseline"]) == {"tiling_max", "tiling_mean", "mil_gated"}
    assert all(q["n_slides"] == 2 and q["n_positive"] == 1 for q in results["quality"].values())
    summary = results["summary"]
    assert summary["smt_reads"] == 1 + 2 + 4  # smt_micro: K = 2
    assert summary["tiles"] > 0 and summary["smt_file_pixels_ratio"] > 0 and summary["smt_wall_ratio"] > 0
    assert list((tmp_path / "cache" / "synthetic_slides").glob("*-s1-*/test/*.svs"))  # the fresh test slides
    for slide in results["slides"]:  # level-0 pixels as the definitions say
        assert slide["smt"]["reads"] == len([b for layer in slide["smt"]["layers"] for b in layer["boxes"]])
        assert (
            slide["tiling"]["file_pixels"] > 0 and slide["smt"]["file_pixels"] < slide["smt"]["area_level0"]
        )
    assert set(results["focus"]) == {"layer1", "layer2"} and results["focus"]["layer1"]["n_slides"] == 1
    assert list(results["scaling"]) == ["3072"]
    compare = run_cli([str(out / "records")], cwd=tmp_path, module="patholite.compare")
    assert compare.returncode == 0, compare.stderr[-2000:]
    assert "tiling_max" in compare.stdout and "mil_gated" in compare.stdout
