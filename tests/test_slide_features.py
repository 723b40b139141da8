"""``mode=features``: every tissue tile's embedding into one h5 per slide (encoders of every artifact kind, a
classifier's pre-logits), the artifacts it refuses before work, and MIL trained on the feature files."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from patholite import artifacts as art
from patholite.config.options import load_model_option
from patholite.config.slide_schema import SlideRunConfig
from patholite.data.synthetic.slides import write_synthetic_slide
from patholite.data.synthetic.spec import LesionSpec, SlideSpec
from patholite.errors import CheckpointError, ConfigError, SlideError
from patholite.mil import main as mil_main
from patholite.models.factory import create_network
from patholite.pipelines.stages.ptq import save_dynamic, save_dynamic_ort
from patholite.slide import run_slide
from patholite.slides.engine import Normalise, SlideTiles, TileSpec
from patholite.slides.features import FEATURES_FILE, mil_on_features, read_bag, write_features
from patholite.slides.run import run_slides, slide_mode

from .conftest import job_config
from .helpers import csv_rows, one_thread

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CLASSES = ["Normal", "Tumor"]


def _model_cfg(depth: int = 2) -> dict:
    cfg = OmegaConf.to_container(load_model_option("vit_micro"), resolve=True)
    return {**cfg, "kwargs": {**cfg["kwargs"], "depth": depth}, "checkpoint": None}


def _meta(**extra) -> dict:
    # 32-px tiles at 2 um/px: 128 level-0 px of a synthetic slide at 0.5 um/px
    return {"model": _model_cfg(), "class_names": CLASSES, "image_size": 32, "mean": MEAN, "std": STD,
            "mpp": 2.0, "tile_size": 32, **extra}  # fmt: skip


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """A tiny ViT encoder (width 64, depth 2) as float, torch dynamic INT8 and ONNX Runtime INT8 artifacts."""
    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    net = create_network(_model_cfg(), 0, 32).eval()
    meta = _meta(encoder={"embed_dim": 64})
    art.save_float_artifact(net, root / "fp32", meta)
    save_dynamic(net, root / "int8", meta, "x86")
    art.save_onnx_artifact(net, root / "onnx_fp32", meta)
    save_dynamic_ort(root / "onnx_fp32" / "model.onnx", root / "onnx_int8", meta)
    return net, root


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A micro ViT tile classifier (two classes) as a float and an ONNX artifact."""
    root = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(1)
    net = create_network(_model_cfg(), len(CLASSES), 32).eval()
    art.save_float_artifact(net, root / "fp32", _meta())
    art.save_onnx_artifact(net, root / "onnx", _meta())
    return net, root


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    for i, seed in enumerate((3, 6)):
        lesions = [LesionSpec("InSitu", 1, (100.0, 150.0))] if i == 0 else []  # the second: lesion-free
        spec = SlideSpec(1024, 1024, seed=seed, texture_px=128, lesions=lesions)
        write_synthetic_slide(root / f"s{i}.svs", spec)
    return sorted(root.glob("*.svs"))


def _cfg(tmp_path, artifact, **overrides):
    cfg = OmegaConf.structured(SlideRunConfig)
    cfg.artifact = str(artifact)
    cfg.mode = "features"
    cfg.paths.cache_dir = str(tmp_path / "cache")
    cfg.engine.workers = 0
    cfg.engine.threads = 1
    cfg.engine.batch_size = 8
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def _features(directory, slides, tmp_path, **overrides):
    """``mode=features`` over ``slides``: the rows, and each slide's bag."""
    cfg = _cfg(tmp_path, directory, slides=str(slides[0].parent), **overrides)
    with one_thread():
        rows = run_slides(slides, cfg, tmp_path / "out")
    assert [r["status"] for r in rows] == ["ok"] * len(slides), rows
    return rows, [read_bag(tmp_path / "out" / p.stem / FEATURES_FILE, slide=p.stem) for p in slides]


def _tiles(slide, coords) -> torch.Tensor:
    """Tiles at ``coords`` read afresh (128 level-0 px to 32 px) and normalised: the network's input."""
    tiles = SlideTiles(TileSpec(str(slide), coords, 128, 32, 32, tuple(MEAN), tuple(STD)))
    images = [torch.from_numpy(tiles.read(i).transpose(2, 0, 1).copy()) for i in range(len(coords))]
    return Normalise(MEAN, STD, "cpu")(torch.stack(images))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_float_encoder_writes_the_feature_layout_in_tiles_csv_order(encoders, slides, tmp_path):
    net, root = encoders
    rows, bags = _features(root / "fp32", slides, tmp_path, **{"engine.workers": 1})
    for path, row, bag in zip(slides, rows, bags, strict=True):
        out = tmp_path / "out" / path.stem
        with h5py.File(out / FEATURES_FILE, "r") as f:
            assert set(f) == {"features", "coords"}
            assert f["features"].dtype == np.float32 and f["coords"].dtype == np.int64
            n = f["features"].shape[0]
            assert f["features"].shape == (n, 64) and f["coords"].shape == (n, 2) and n > 5
            attrs = dict(f.attrs)
        assert attrs["slide"] == path.stem and attrs["slide_path"] == str(path)
        assert attrs["patch_size"] == 128 and attrs["patch_level"] == 0 and attrs["mpp"] == 2.0
        assert attrs["tile_px"] == 32 and attrs["embed_dim"] == 64 and attrs["format_version"] == 1
        assert attrs["artifact"] == str(root / "fp32") and attrs["artifact_kind"] == "torch_float"
        assert attrs["model"] == "vit_micro" and bool(attrs["encoder"]) is True
        # tiles.csv: the tiles (with their tissue fraction) and no class columns; its rows are the coords'
        tiles = csv_rows(out / "tiles.csv")
        assert list(tiles[0]) == ["tile", "x", "y", "tissue_fraction"]
        assert np.array_equal(np.array([[int(t["x"]), int(t["y"])] for t in tiles]), bag.coords)
        assert [int(t["tile"]) for t in tiles] == list(range(n))
        report = json.loads((out / "report.json").read_text())
        assert report["embed_dim"] == 64 and report["n_tiles"] == n and report["tiles_per_s"] > 0
        assert report["tiles_per_s"] == pytest.approx(n / report["timings"]["wall_s"])
        assert report["timings"]["save_busy_s"] > 0  # the writer thread listed the tiles, and was timed
        assert row["mode"] == "features" and row["embed_dim"] == 64
        assert not (out / "heatmap.png").exists()  # no classes, no class maps
    summary = csv_rows(tmp_path / "out" / "summary.csv")
    assert [int(r["embed_dim"]) for r in summary] == [64, 64]
    assert all(float(r["tiles_per_s"]) > 0 for r in summary)
    # the features are the network's own embeddings of those tiles, read and normalised independently
    bag = bags[0]
    pick = [0, len(bag.coords) // 2, len(bag.coords) - 1]
    with torch.inference_mode():
        own = net(_tiles(slides[0], bag.coords[pick])).numpy()
    assert np.allclose(own, bag.features[pick], atol=1e-5)
    # mode=auto runs an encoder artifact this way; mode=tiles refuses it (no classes)
    assert slide_mode("auto", art.read_sidecar(root / "fp32"), root / "fp32") == "features"
    with pytest.raises(CheckpointError, match="mode=features"):
        slide_mode("tiles", art.read_sidecar(root / "fp32"), root / "fp32")


@pytest.mark.parametrize("kind", ["int8", "onnx_int8"])
def test_int8_encoders_run_in_feature_mode_close_to_float(encoders, slides, tmp_path, kind):
    _, root = encoders
    _, (reference,) = _features(root / "fp32", slides[:1], tmp_path / "fp32")
    _, (bag,) = _features(root / kind, slides[:1], tmp_path / kind)
    assert bag.attrs["artifact_kind"] == ("torch_int8_dynamic" if kind == "int8" else "onnx")
    assert np.array_equal(bag.coords, reference.coords) and bag.features.shape == reference.features.shape
    assert _cosine(bag.features, reference.features).min() > 0.99


def test_a_classifier_gives_its_pre_logits(classifier, slides, tmp_path):
    net, root = classifier
    _, (bag,) = _features(root / "fp32", slides[:1], tmp_path)
    assert bag.features.shape[1] == 64 and bool(bag.attrs["encoder"]) is False
    # the head turns those features into the classifier's own logits on the same tiles
    with torch.inference_mode():
        x = _tiles(slides[0], bag.coords[:4])
        pre = net.forward_head(net.forward_features(x), pre_logits=True).numpy()
        from_head = net.get_classifier()(torch.from_numpy(bag.features[:4]))
        assert torch.allclose(from_head, net(x), atol=1e-5)
    assert np.allclose(pre, bag.features[:4], atol=1e-5)


def test_an_onnx_classifier_is_refused_before_any_slide_is_read(classifier, slides, tmp_path, capsys):
    _, root = classifier
    missing = tmp_path / "not-a-slide.svs"  # were a slide read, this would fail first
    cfg = _cfg(tmp_path, root / "onnx", slide=str(missing))
    with pytest.raises(CheckpointError, match="torch float or dynamic-INT8 artifact of it, or an encoder"):
        run_slides([missing], cfg, tmp_path / "out")
    # as a user meets it: one line, exit 1, no slide output
    run = tmp_path / "run"
    overrides = ["mode=features", f"slides={slides[0].parent}", f"artifact={root / 'onnx'}", "logger=none"]
    with pytest.raises(SystemExit) as failed:
        run_slide(job_config(overrides, run, tmp_path / "cache", "slide"))
    err = capsys.readouterr().err
    assert failed.value.code == 1 and "dynamic-INT8 artifact of it, or an encoder" in err
    assert not (run / "summary.csv").exists()
    smt = {"kind": "torch_float", "model": {"name": "smt", "family": "smt"}}
    with pytest.raises(CheckpointError, match="no tile features"):
        slide_mode("features", smt, tmp_path)


def test_read_bag_refuses_other_slides_other_geometry_and_other_files(encoders, slides, tmp_path):
    _, root = encoders
    _, (bag, other) = _features(root / "fp32", slides, tmp_path)
    with pytest.raises(SlideError, match=f"of slide {slides[1].stem}"):
        read_bag(other.path, slide=slides[0].stem)
    assert read_bag(other.path, slide=str(slides[1])).attrs["slide"] == slides[1].stem  # by path too
    assert read_bag(other.path, geometry=bag.geometry).geometry == bag.geometry
    with pytest.raises(ConfigError, match="mpp=2.0 where the other bags have 1.0"):
        read_bag(other.path, geometry={**bag.geometry, "mpp": 1.0})
    with pytest.raises(ConfigError, match="embed_dim"):
        read_bag(other.path, geometry={**bag.geometry, "embed_dim": 128})
    # the engine's tile-coordinate cache is an h5 with coords, but no features: not a feature file
    cached = next((tmp_path / "cache" / "slides").glob("*/tiles-*.h5"))
    with pytest.raises(SlideError, match="not a patholite feature file"):
        read_bag(cached)
    (tmp_path / "junk.h5").write_text("not h5")
    with pytest.raises(SlideError, match="not a readable h5"):
        read_bag(tmp_path / "junk.h5")


def _synthetic_bag(path, rng, positive: bool, mpp: float = 2.0):
    """A bag of 40 tiles of N(0, 1) features; a positive slide has a cluster of 6 tiles shifted by 3."""
    features = rng.normal(size=(40, 16)).astype(np.float32)
    if positive:
        features[:6, :4] += 3.0
    coords = np.stack([np.arange(40) * 128, np.zeros(40)], 1)
    attrs = {"slide": path.stem, "slide_path": str(path), "patch_size": 128, "patch_level": 0, "mpp": mpp,
             "tile_px": 32, "artifact": "/a/encoder", "artifact_kind": "torch_float", "model": "m",
             "encoder": True}  # fmt: skip
    return write_features(path, features, coords, attrs)


def test_mil_on_feature_files_learns_a_shifted_cluster(tmp_path):
    rng = np.random.default_rng(0)
    labels = [i % 2 for i in range(20)]
    bags = [(_synthetic_bag(tmp_path / f"slide{i}.h5", rng, bool(y)), y) for i, y in enumerate(labels)]
    small = {"lr": 2e-3, "hidden_dim": 32, "attention_dim": 16}  # train_mil's own arguments, passed on
    result = mil_on_features(bags[:12], bags[12:], epochs=10, seed=0, **small)
    assert result["auroc"] == 1.0
    assert [r["slide"] for r in result["slides"]] == [f"slide{i}" for i in range(12, 20)]
    assert all(0.0 <= r["score"] <= 1.0 for r in result["slides"])
    assert result["geometry"]["embed_dim"] == 16 and result["n_train"] == 12
    # a bag of another geometry among them: refused, naming the file and the key
    odd = _synthetic_bag(tmp_path / "odd.h5", rng, True, mpp=0.5)
    with pytest.raises(ConfigError, match=r"odd\.h5 has mpp=0\.5"):
        mil_on_features(bags[:12], [*bags[12:], (odd, 1)], epochs=1)


def test_the_entry_point_runs_an_encoder_by_itself(encoders, slides, tmp_path, capsys):
    """``python -m patholite.slide artifact=<encoder> slide=...`` (mode=auto): features, summary, record."""
    _, root = encoders
    overrides = [f"slide={slides[0]}", f"artifact={root / 'int8'}", "logger=none", "engine.workers=0"]
    assert run_slide(job_config(overrides, tmp_path / "run", tmp_path / "cache", "slide")) == 0
    out = capsys.readouterr().out
    assert "64-d features" in out and "tiles/s" in out and FEATURES_FILE in out
    bag = read_bag(tmp_path / "run" / slides[0].stem / FEATURES_FILE, slide=str(slides[0]))
    assert bag.attrs["artifact_kind"] == "torch_int8_dynamic"
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "ok" and record["artifacts"][0]["cost"]["tiles_per_s"] > 0


def test_the_mil_entry_point_learns_from_a_cohorts_feature_folder(tmp_path, capsys):
    rng = np.random.default_rng(0)
    feats = tmp_path / "feats"
    rows = ["slide,label,split"]
    for i in range(16):
        positive = i % 2 == 1
        (feats / f"s{i:02d}").mkdir(parents=True)
        _synthetic_bag(feats / f"s{i:02d}" / FEATURES_FILE, rng, positive)
        rows.append(f"s{i:02d},{'tumour' if positive else 'normal'},{'train' if i < 10 else 'test'}")
    labels = tmp_path / "slides.csv"
    labels.write_text("\n".join(rows) + "\n")
    mil_main([str(feats), "--labels", str(labels), "--out", str(tmp_path / "mil"), "--epochs", "15"])
    assert "AUROC 1.000" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "mil" / "metrics.json").read_text())
    assert metrics["classes"] == ["normal", "tumour"] and metrics["n_train"] == 10 and metrics["n_test"] == 6
    scores = (tmp_path / "mil" / "scores.csv").read_text().splitlines()
    assert scores[0] == "slide,label,predicted,p_normal,p_tumour" and len(scores) == 7
    assert json.loads((tmp_path / "mil" / "model" / "artifact.json").read_text())["kind"] == "mil"
    # a slide without features, a missing column: one message each, exit 2, before training
    labels.write_text("slide,label,split\nnope,normal,train\n")
    with pytest.raises(SystemExit) as exit_:
        mil_main([str(feats), "--labels", str(labels), "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2 and "have no features.h5" in capsys.readouterr().err
    labels.write_text("slide,label\ns00,normal\n")
    with pytest.raises(SystemExit):
        mil_main([str(feats), "--labels", str(labels), "--out", str(tmp_path / "x")])
    assert "lacks the columns ['split']" in capsys.readouterr().err
