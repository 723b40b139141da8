"""scripts/bench_smt.py end to end on tiny slides: a tiny SMT and a tiny tile classifier on the same slides,
then SMT against full tiling, MIL and the records compare reads (slow: three trainings)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from .conftest import REPO, run_cli

SLIDES = [
    "dataset=smt_synthetic",
    "dataset.width=2048",
    "dataset.height=2048",
    "dataset.slides_per_split=[4,2,2]",
]


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_smt", REPO / "scripts" / "bench_smt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_other_test_slides_take_dataset_keys_only():
    with pytest.raises(SystemExit, match="give dataset.<key>=<value>"):
        _bench_module().datamodule_with(None, ["dataset.seed=1", "model.smt.top_k=8"])


def test_paired_bootstrap_of_smt_against_a_baseline():
    paired_bootstrap = _bench_module().paired_bootstrap
    labels = [0, 0, 0, 1, 1, 1] * 4
    good = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9] * 4
    same = paired_bootstrap(good, good, labels, n=200)
    assert same["auroc"] == {"difference": 0.0, "ci95": [0.0, 0.0], "draws": 200} == same["accuracy"]
    worse = paired_bootstrap(good, [1 - p for p in good], labels, n=200)  # every slide ranked backwards
    assert worse["auroc"]["difference"] == pytest.approx(1.0) and worse["accuracy"]["difference"] == 1.0
    mixed = paired_bootstrap(good, [0.1, 0.2, 0.8, 0.7, 0.8, 0.4] * 4, labels, n=500)
    low, high = mixed["auroc"]["ci95"]
    assert mixed["auroc"]["difference"] > 0 and low <= mixed["auroc"]["difference"] <= high and low < high
    one_class = paired_bootstrap(
        good, good, [1] * len(good), n=50
    )  # no AUROC anywhere: no interval, no crash
    assert one_class["auroc"]["draws"] == 0 and all(math.isnan(v) for v in one_class["auroc"]["ci95"])


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
         "--mil-epochs", "2", "--test-set", "dataset.seed=1"],  # fresh test slides; MIL on the run's
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
