"""SMT in the slide CLI: 1 + K + K^2 reads per slide, report.json and focus.png, the summary, the mode
dispatch and its refusals (tile classifier as SMT, SMT as tiles, MIL), a slide too small for the chain,
an INT8 SMT."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import pytest
import torch
from omegaconf import OmegaConf

from patholite import artifacts as art
from patholite.artifacts.mil import save_mil
from patholite.compress.quantize import quantize_dynamic_int8
from patholite.config.options import load_model_option
from patholite.config.slide_schema import SlideRunConfig
from patholite.data.synthetic.slides import write_synthetic_slide
from patholite.data.synthetic.spec import LesionSpec, SlideSpec
from patholite.errors import CheckpointError, ConfigError
from patholite.models.factory import create_network
from patholite.models.mil import GatedAttentionMIL
from patholite.records import read_record
from patholite.slides.inference import load_classifier
from patholite.slides.run import run_slides

from .helpers import csv_rows

CLASSES = ["Normal", "Tumor"]
K = 2
READS = 1 + K + K * K
SMT = {"image_size": 32, "grid": 4, "top_k": K, "layers": 3, "aggregate": "mean", "too_small": "upsample"}
MODEL = {"name": "smt", "family": "smt", "timm_name": "vit_tiny_patch16_224", "checkpoint": None,
         "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}, "smt": SMT}  # fmt: skip


def _meta(**smt):
    return {"model": {**MODEL, "smt": {**SMT, **smt}}, "class_names": CLASSES, "image_size": 32,
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "slide_model": True,
            "negative_class": "Normal"}  # fmt: skip


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Two synthetic slides (2048 px with a lesion; 384 px, too small for 32 px x 4^2 at level 0) and
    the artifacts: SMT float, SMT float refusing small slides, SMT INT8, a tile classifier, a MIL model."""
    root = tmp_path_factory.mktemp("smt")
    big, small = root / "slides" / "big.svs", root / "small" / "small.svs"
    write_synthetic_slide(
        big, SlideSpec(2048, 2048, seed=1, lesions=[LesionSpec("Invasive", 1, (150.0, 250.0))])
    )
    write_synthetic_slide(small, SlideSpec(384, 384, seed=2))
    torch.manual_seed(0)
    net = create_network(MODEL, len(CLASSES), 32).eval()
    art.save_float_artifact(net, root / "smt", _meta())
    art.save_float_artifact(net, root / "smt_refuse", _meta(too_small="refuse"))
    art.save_int8_dynamic_artifact(quantize_dynamic_int8(net), root / "smt_int8", _meta(), "x86")
    tile_model = OmegaConf.to_container(load_model_option("vit_micro"), resolve=True)
    tile_meta = {"model": {**tile_model, "checkpoint": None}, "class_names": CLASSES, "image_size": 32,
                 "mean": [0.5] * 3, "std": [0.25] * 3, "mpp": 2.0, "tile_size": 32}  # fmt: skip
    art.save_float_artifact(create_network(tile_model, 2, 32), root / "tiles", tile_meta)
    save_mil(GatedAttentionMIL(8, 2), root / "mil", {"class_names": CLASSES})
    return {"root": root, "big": big, "small": small}


def _cfg(work, artifact, tmp_path, **overrides):
    cfg = OmegaConf.structured(SlideRunConfig)
    cfg.artifact = str(work["root"] / artifact)
    cfg.paths.cache_dir = str(work["root"] / "cache")  # shared: the tissue mask is detected once
    cfg.engine.threads = 1
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def _inside(child, parent):
    return (
        parent[0] - 1e-6 <= child[0]
        and parent[1] - 1e-6 <= child[1]
        and child[0] + child[2] <= parent[0] + parent[2] + 1e-6
        and child[1] + child[2] <= parent[1] + parent[2] + 1e-6
    )


def test_cli_reads_one_plus_k_plus_k_squared_and_reports(work, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "patholite.slide", f"slide={work['big']}", f"artifact={work['root'] / 'smt'}",
         "engine.threads=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PATHOLITE_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin", "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"SMT read {READS} regions" in result.stdout
    run = next((tmp_path / "outputs" / "slides").glob("*/*"))
    report = json.loads((run / "big" / "report.json").read_text())
    assert report["mode"] == "smt" and report["reads"] == report["expected_reads"] == READS
    assert report["call"]["label"] in CLASSES
    assert report["call"]["confidence"] == pytest.approx(max(report["probs"].values()))
    assert sum(report["probs"].values()) == pytest.approx(1.0, abs=1e-5)
    layers = report["layers"]
    assert [len(layer["regions"]) for layer in layers] == [1, K, K * K]
    assert layers[0]["regions"][0]["box"] == report["tissue_box"] and layers[0]["regions"][0]["score"] is None
    for depth in (1, 2):
        for region in layers[depth]["regions"]:
            parent = layers[depth - 1]["regions"][region["parent"]]["box"]
            assert _inside(region["box"], parent) and region["box"][2] == pytest.approx(parent[2] / 4)
            assert 0 < region["score"] < 1 and 0 <= region["patch"] < 16
    last = layers[-1]["regions"]
    top = max(r["positive"] for r in last)
    assert [r["index"] for r in last if r["drove_call"]] == report["call"]["driven_by"]
    assert all(r["positive"] == top for r in last if r["drove_call"]) and report["call"]["driven_by"]
    sides = [r["box"][2] for layer in layers for r in layer["regions"]]
    assert report["area_level0"] == round(sum(s * s for s in sides))
    assert 0 < report["pixels_read"] <= report["area_level0"]  # coarse levels decode fewer pixels
    for key in ("tissue_s", "read_s", "model_s", "total_s"):
        assert report["timings"][key] > 0, key
    assert report["timings"]["total_s"] >= report["timings"]["read_s"] + report["timings"]["model_s"]
    png = run / "big" / "focus.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imread(str(png))
    assert image is not None and min(image.shape[:2]) > 300
    summary = csv_rows(run / "summary.csv")
    assert len(summary) == 1 and summary[0]["status"] == "ok"
    assert summary[0]["call"] == report["call"]["label"] and int(summary[0]["reads"]) == READS
    assert int(summary[0]["pixels_read"]) == report["pixels_read"]
    # the slide run's record: the same schema as training and bench runs
    record = read_record(run)
    assert (record["entry"], record["status"], record["slides"]["n"], record["slides"]["failed"]) == (
        "slide", "ok", 1, 0)  # fmt: skip
    used = record["artifacts"][0]
    assert used["name"] == "smt" and used["path"] == str(work["root"] / "smt")
    assert used["cost"]["reads_per_slide"] == READS and used["cost"]["seconds_per_slide"] > 0
    assert "| reads | pixels_read |" in (run / "summary.md").read_text()


def test_reads_counted_at_the_slide(work, tmp_path, monkeypatch):
    """Every level-0 read the walk makes is one Slide.read_region (a box wholly outside the slide, in the
    white padding of a non-square tissue box, reads nothing)."""
    from patholite.wsi.reader import Slide

    cfg = _cfg(work, "smt", tmp_path)
    run_slides([work["big"]], cfg, tmp_path / "warm")  # the tissue mask is cached now
    calls = []
    real = Slide.read_region

    def counting(self, location, level, size):
        calls.append((location, level, size))
        return real(self, location, level, size)

    monkeypatch.setattr(Slide, "read_region", counting)
    rows = run_slides([work["big"]], cfg, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "big" / "report.json").read_text())
    assert rows[0]["reads"] == report["reads"] == READS
    w, h = report["extra"]["slide"]["dimensions"]
    boxes = [r["box"] for layer in report["layers"] for r in layer["regions"]]
    touching = [b for b in boxes if b[0] < w and b[1] < h and b[0] + b[2] > 0 and b[1] + b[2] > 0]
    assert len(calls) == len(touching) >= 1 + K


def test_int8_smt_artifact_runs(work, tmp_path):
    rows = run_slides([work["big"]], _cfg(work, "smt_int8", tmp_path), tmp_path / "out")
    assert rows[0]["status"] == "ok" and rows[0]["reads"] == READS
    assert rows[0]["extra"]["artifact_kind"] == "torch_int8_dynamic"
    assert (tmp_path / "out" / "big" / "focus.png").is_file()


def test_walk_settings_can_be_changed_at_inference(work, tmp_path):
    """smt.top_k / smt.aggregate override the trained K and slide score: more regions, same weights."""
    cfg = _cfg(work, "smt", tmp_path, **{"smt.top_k": 3, "smt.aggregate": "max"})
    rows = run_slides([work["big"]], cfg, tmp_path / "out")
    assert rows[0]["status"] == "ok" and rows[0]["reads"] == 1 + 3 + 9
    report = json.loads((tmp_path / "out" / "big" / "report.json").read_text())
    assert report["smt"]["top_k"] == 3 and report["smt"]["aggregate"] == "max"
    positive = [r["positive"] for r in report["layers"][-1]["regions"]]
    assert 1 - report["probs"]["Normal"] == pytest.approx(max(positive), abs=1e-6)  # the most positive image
    for bad, match in (
        ({"smt.top_k": 17}, r"smt.top_k=17: .*4x4=16 patches"),
        ({"smt.top_k": 0}, "smt.top_k=0"),
        ({"smt.aggregate": "median"}, "'mean', 'max', 'attention'"),
    ):
        with pytest.raises(ConfigError, match=match):
            run_slides([work["big"]], _cfg(work, "smt", tmp_path, **bad), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # refused before any slide


def test_slide_too_small_with_refuse_is_a_failed_row_naming_the_fix(work, tmp_path):
    cfg = _cfg(work, "smt_refuse", tmp_path, slides=str(work["root"]))
    rows = run_slides([work["small"], work["big"]], cfg, tmp_path / "out")
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert "too small for the magnification chain" in rows[0]["error"]
    assert "model.smt.grid=8" in rows[0]["error"] and "model.smt.too_small=upsample" in rows[0]["error"]
    summary = csv_rows(tmp_path / "out" / "summary.csv")
    assert [r["status"] for r in summary] == ["failed", "ok"] and summary[0]["reads"] == ""
    # the default policy upsamples the small slide's last layer and still reads 1 + K + K^2 regions
    rows = run_slides([work["small"]], _cfg(work, "smt", tmp_path), tmp_path / "up")
    assert rows[0]["status"] == "ok" and rows[0]["reads"] == READS and rows[0]["smt"]["upsampled"]


def test_mode_dispatch_and_refusals(work, tmp_path):
    big = [work["big"]]
    with pytest.raises(CheckpointError, match="is a tile classifier, not an SMT slide model; use mode=tiles"):
        run_slides(big, _cfg(work, "tiles", tmp_path, mode="smt"), tmp_path / "a")
    with pytest.raises(CheckpointError, match="SMT slide-level model, not a tile classifier.*mode=smt"):
        run_slides(big, _cfg(work, "smt", tmp_path, mode="tiles"), tmp_path / "b")
    with pytest.raises(CheckpointError, match="mode=smt"):
        load_classifier(work["root"] / "smt")
    for mode in ("auto", "tiles", "smt"):
        with pytest.raises(CheckpointError, match="MIL.*tile classifier's embeddings.*scripts/bench_smt.py"):
            run_slides(big, _cfg(work, "mil", tmp_path, mode=mode), tmp_path / "c")
    with pytest.raises(ConfigError, match="mode='bogus'"):
        run_slides(big, _cfg(work, "smt", tmp_path, mode="bogus"), tmp_path / "d")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()  # refused before any slide


def test_slide_config_accepts_mode(tmp_path):
    from hydra import compose, initialize_config_dir

    from patholite.slide import check_slide_config

    from .conftest import REPO

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("slide", overrides=["slide=x.svs", "artifact=a"])
        assert cfg.mode == "auto"
        cfg = compose("slide", overrides=["slide=x.svs", "artifact=a", "mode=bogus"])
    with pytest.raises(ConfigError, match="mode="):
        check_slide_config(cfg)
