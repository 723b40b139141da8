"""The whole-slide engine: the real CMU slide end to end, every artifact kind, many slides with bad ones,
failures inside loader workers, and the bad inputs the issue lists."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from patholite import artifacts as art
from patholite.artifacts.resolve import resolve_artifact
from patholite.compress.quantize import quantize_dynamic_int8
from patholite.config.options import load_model_option
from patholite.config.slide_schema import SlideRunConfig
from patholite.errors import CheckpointError, ConfigError, SlideError
from patholite.models.factory import create_network
from patholite.slides.engine import TileSpec, stream_tiles
from patholite.slides.inference import load_classifier
from patholite.slides.run import run_slides

from .conftest import REPO, job_config
from .helpers import csv_rows, one_thread

CLASSES = ["Normal", "Benign", "InSitu", "Invasive"]
OUTPUTS = ("tiles.csv", "heatmap.png", "overlay.png", "report.json", "report.png")


def _meta(**extra):
    model = OmegaConf.to_container(load_model_option("vit_micro"), resolve=True)
    return {
        "model": {**model, "checkpoint": None},
        "class_names": list(CLASSES),
        "image_size": 32,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "mpp": 2.0,  # 64-px tiles at 2 um/px: 256 level-0 px of the 0.499 um/px CMU slide
        "tile_size": 64,
        **extra,
    }


@pytest.fixture(scope="module")
def float_artifact(tmp_path_factory):
    torch.manual_seed(0)
    net = create_network(load_model_option("vit_micro"), len(CLASSES), 32).eval()
    directory = tmp_path_factory.mktemp("artifact") / "fp32"
    art.save_float_artifact(net, directory, _meta())
    return directory


def _cfg(tmp_path, artifact, **overrides):
    cfg = OmegaConf.structured(SlideRunConfig)
    cfg.artifact = str(artifact)
    cfg.paths.cache_dir = str(tmp_path / "cache")
    cfg.engine.workers = 0
    cfg.engine.threads = 1
    cfg.report.thumbnail_px = 256
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "patholite.slide", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATHOLITE_ROOT": str(cwd), "PATH": "/usr/bin:/bin", "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"},
    )


@pytest.mark.slow  # 33 s: make test stays under its 8 minutes
def test_real_slide_end_to_end_through_the_cli(slides, float_artifact, tmp_path):
    result = _cli(
        f"slide={slides / 'CMU-1-Small-Region.svs'}", f"artifact={float_artifact}", "engine.workers=2",
        "engine.batch_size=8", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = next((tmp_path / "outputs" / "slides").glob("*/*"))
    out = run / "CMU-1-Small-Region"
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    rows = csv_rows(out / "tiles.csv")
    assert report["n_tiles"] == len(rows) > 10
    assert report["call"]["label"] in CLASSES
    assert sum(report["fractions"].values()) == pytest.approx(1.0, abs=1e-6)
    # the tiles cover tissue at 2 um/px: 2 / 0.499 = 4.008 level-0 px per tile px, 256.5 per tile
    xs, ys = np.array([int(r["x"]) for r in rows]), np.array([int(r["y"]) for r in rows])
    steps = np.diff(np.unique(xs))
    assert ((steps >= 256) & (steps <= 257)).all()
    assert xs.max() + 256 <= 2220 and ys.max() + 256 <= 2967
    probs = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    assert np.allclose(probs.sum(1), 1.0, atol=1e-3)
    assert [r["label"] for r in rows] == [CLASSES[int(r["prediction"])] for r in rows]
    timings = report["timings"]
    for key in ("load_busy_s", "process_s", "save_busy_s", "wall_s", "tissue_s", "tiling_s"):
        assert timings[key] > 0, key  # every stage did work and was timed where it ran
    assert timings["tiles"] == report["n_tiles"] and timings["workers"] == 2
    assert timings["wall_s"] >= timings["process_s"]
    assert report["extra"]["tile"]["size0"] in (256, 257)
    summary = csv_rows(run / "summary.csv")
    assert [r["status"] for r in summary] == ["ok"]
    assert "CMU-1-Small-Region" in result.stdout and "tiles/s" in result.stdout
    # a second run reuses the cached tissue mask and tile coordinates
    cache = tmp_path / "outputs" / "cache" / "slides"
    files = [*cache.glob("CMU-1-Small-Region-*/*.h5"), *cache.glob("CMU-1-Small-Region-*/tissue.npz")]
    assert len(files) == 2
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = _cli(f"slide={slides / 'CMU-1-Small-Region.svs'}", f"artifact={float_artifact}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # reused, not rewritten
    second = max((tmp_path / "outputs" / "slides").glob("*/*"))
    assert csv_rows(second / "CMU-1-Small-Region" / "tiles.csv") == rows  # same tiles, same predictions


def _float(directory):
    """The network and the sidecar facts a new artifact of it would share (not its kind or files)."""
    net, meta = art.load_float_artifact(directory)
    return net, {k: v for k, v in meta.items() if k not in ("kind", "weights")}


# A 256-px grid over the CMU slide (2220 x 2967 level-0 px): 88 tiles, tissue and background
CMU_GRID = np.array([[x, y] for y in range(0, 2967 - 256, 256) for x in range(0, 2220 - 256, 256)])


def _cmu_spec(slides, meta) -> TileSpec:
    return TileSpec(str(slides / "CMU-1-Small-Region.svs"), CMU_GRID, 256, 64, 32, tuple(meta["mean"]),
                    tuple(meta["std"]))  # fmt: skip


@pytest.fixture(scope="module")
def trained_artifact(slides, tmp_path_factory):
    """A vit_micro that learned something about the CMU slide's tiles: trained end to end (40 AdamW steps
    of 16 tiles, 1-2 s on one thread) to tell four brightness bands of the grid's tiles apart, a stand-in
    task whose classes are decided by the image. Its probabilities on those tiles are far from uniform, unlike
    a random network's, so INT8 parity on them means something."""
    from patholite.slides.engine import SlideTiles

    meta = _meta()
    tiles = SlideTiles(_cmu_spec(slides, meta))
    images = torch.stack([tiles[i][0] for i in range(len(tiles))]).float() / 255
    labels = torch.bucketize(images.mean((1, 2, 3)), torch.tensor([0.6, 0.8, 0.94]))  # 15/20/17/36 tiles
    x = (images - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with one_thread():
        torch.manual_seed(0)
        net = create_network(load_model_option("vit_micro"), len(CLASSES), 32).train()
        optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
        for _ in range(40):
            batch = torch.randperm(len(x))[:16]
            loss = torch.nn.functional.cross_entropy(net(x[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    directory = tmp_path_factory.mktemp("trained") / "fp32"
    art.save_float_artifact(net.eval(), directory, meta)
    return directory, labels.numpy()


def test_every_artifact_kind_streams_the_same_tiles(slides, trained_artifact, tmp_path):
    float_dir, labels = trained_artifact
    net, meta = _float(float_dir)
    art.save_int8_dynamic_artifact(quantize_dynamic_int8(net), tmp_path / "int8", meta, "x86")
    art.save_onnx_artifact(net, tmp_path / "onnx", meta)
    spec = _cmu_spec(slides, meta)
    probs = {}
    for kind, directory in (("fp32", float_dir), ("int8", tmp_path / "int8"), ("onnx", tmp_path / "onnx")):
        model, _ = load_classifier(directory)
        with one_thread():
            result = stream_tiles(model, spec, CLASSES, tmp_path / f"{kind}.csv", batch_size=8, workers=1)
        probs[kind] = result.probs
        assert result.timings["tiles"] == len(CMU_GRID)
    p32, p8 = probs["fp32"], probs["int8"]
    # the float model learned its task and is far from uniform on these tiles (a random vit_micro: mean top
    # probability 0.31, probabilities' spread 0.04), with every class predicted somewhere
    top = p32.argmax(1)
    assert (top == labels).mean() >= 0.75
    assert p32.max(1).mean() >= 0.6
    spread = p32.std()  # over tiles and classes: 0 for a constant model
    assert spread >= 0.2
    assert len(set(top.tolist())) == len(CLASSES)
    # ONNX is the same float model; INT8 is faithful: the same call on (nearly) every tile and probabilities
    # that move by a small fraction of their spread
    assert np.abs(probs["onnx"] - p32).max() < 1e-4
    assert (p8.argmax(1) == top).mean() >= 0.95
    gap = np.abs(p8 - p32)
    assert gap.max() < 0.1 * spread and gap.mean() < 0.01 * spread, (gap.max(), gap.mean(), spread)


def test_many_slides_bad_ones_reported_others_go_on(slides, float_artifact, tmp_path):
    listing = tmp_path / "slides.txt"
    names = ["CMU-1-Small-Region.svs", "unreadable.svs", "unopenable.tiff", "small.svs"]
    listing.write_text("\n".join(str(slides / n) for n in names))
    result = _cli(f"slides={listing}", f"artifact={float_artifact}", cwd=tmp_path)
    assert result.returncode == 1
    assert "3 of 4 slides failed" in result.stderr
    run = next((tmp_path / "outputs" / "slides").glob("*/*"))
    rows = {r["slide"].split("/")[-1]: r for r in csv_rows(run / "summary.csv")}
    assert rows["CMU-1-Small-Region.svs"]["status"] == "ok"
    assert "Bogus marker length" in rows["unreadable.svs"]["error"]  # opens, fails when read
    assert "cannot open" in rows["unopenable.tiff"]["error"]
    assert "the slide is 16x16" in rows["small.svs"]["error"]  # a tile larger than the slide
    assert "tile.size" in rows["small.svs"]["error"]
    assert (run / "CMU-1-Small-Region" / "report.png").is_file()


def test_annotations_beside_a_slide_are_drawn_with_known_dialect_groups(tmp_path, float_artifact):
    """A synthetic slide with its ASAP XML beside it, and a BACH-style ImageScope XML naming the classes
    as BACH does ('Carcinoma in situ'): both map onto the artifact's classes without a setting."""
    from patholite.data.synthetic.slides import write_synthetic_slide
    from patholite.data.synthetic.spec import LesionSpec, SlideSpec
    from patholite.wsi.annotations import read_annotations

    slide = tmp_path / "s.svs"
    spec = SlideSpec(width=2048, height=2048, seed=3, lesions=[LesionSpec("InSitu", 1, (150.0, 200.0))])
    write_synthetic_slide(slide, spec)
    net, meta = _float(float_artifact)
    art.save_float_artifact(net, tmp_path / "a", {**meta, "mpp": 1.0})
    cfg = _cfg(tmp_path, tmp_path / "a")
    rows = run_slides([slide], cfg, tmp_path / "out")
    assert rows[0]["status"] == "ok"
    lesion = read_annotations(slide.with_suffix(".xml"))[0]
    region = "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in lesion.polygon)
    slide.with_suffix(".xml").write_text(
        '<Annotations><Annotation Id="1"><Regions><Region Id="1" Text="Carcinoma in situ" NegativeROA="0">'
        f"<Vertices>{region}</Vertices></Region></Regions></Annotation></Annotations>"
    )
    from patholite.slides.inference import annotation_map
    from patholite.wsi.reader import open_slide

    with open_slide(slide) as s:
        labels = annotation_map(cfg, s, CLASSES, 16.0)
    assert labels is not None and (labels == CLASSES.index("InSitu")).sum() > 0
    slide.with_suffix(".xml").write_text("not xml at all")  # beside the slide: left out, with a warning
    with open_slide(slide) as s:
        assert annotation_map(cfg, s, CLASSES, 16.0) is None
    cfg.annotations = str(slide.with_suffix(".xml"))  # named explicitly, it must be usable
    with open_slide(slide) as s, pytest.raises(SlideError):
        annotation_map(cfg, s, CLASSES, 16.0)


def test_any_failure_of_one_slide_is_a_row_when_many(slides, float_artifact, tmp_path, monkeypatch):
    from patholite.slides import inference

    real = inference.process_slide

    def flaky(path, *args):
        if path.name == "boxes.tiff":
            raise ValueError("a bug in one slide's processing")
        return real(path, *args)

    monkeypatch.setattr(inference, "process_slide", flaky)
    cfg = _cfg(tmp_path, float_artifact, slides=str(slides))
    paths = [slides / "boxes.tiff", slides / "CMU-1-Small-Region.svs"]
    rows = run_slides(paths, cfg, tmp_path / "out")
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert rows[0]["error"] == "ValueError: a bug in one slide's processing"
    assert (tmp_path / "out" / "summary.csv").is_file()
    cfg.slides, cfg.slide = None, str(paths[0])  # one slide: its error is raised
    with pytest.raises(ValueError):
        run_slides(paths[:1], cfg, tmp_path / "out1")


def test_model_threads_are_restored(slides, float_artifact, tmp_path):
    before = torch.get_num_threads()
    run_slides([slides / "CMU-1-Small-Region.svs"], _cfg(tmp_path, float_artifact), tmp_path / "out")
    assert torch.get_num_threads() == before


def test_read_failure_inside_a_loader_worker_names_slide_and_region(slides, float_artifact, tmp_path):
    model, meta = load_classifier(float_artifact)
    spec = TileSpec(str(slides / "unreadable.svs"), np.array([[0, 0]]), 16, 16, 32, tuple(meta["mean"]),
                    tuple(meta["std"]))  # fmt: skip
    with pytest.raises(SlideError) as err:
        stream_tiles(model, spec, CLASSES, tmp_path / "tiles.csv", batch_size=1, workers=1)
    assert "unreadable.svs" in str(err.value) and "(0, 0)" in str(err.value)
    assert "Traceback" not in str(err.value)
    assert not (tmp_path / "tiles.csv").exists()  # nothing half-written
    assert not list(tmp_path.glob(".tiles.csv*"))


def test_artifact_with_wrong_class_count_is_refused(float_artifact, tmp_path):
    net, meta = _float(float_artifact)
    # an ONNX file carries its own head: nothing but the engine's check sees the sidecar disagree
    art.save_onnx_artifact(net, tmp_path / "bad", {**meta, "class_names": ["a", "b"]})
    with pytest.raises(CheckpointError, match="names 2 classes"):
        load_classifier(tmp_path / "bad")


def test_artifact_without_resolution_needs_tile_mpp(slides, float_artifact, tmp_path):
    net, meta = _float(float_artifact)
    art.save_float_artifact(net, tmp_path / "nompp", {**meta, "mpp": None})
    cfg = _cfg(tmp_path, tmp_path / "nompp")
    with pytest.raises(ConfigError, match="tile.mpp"):
        run_slides([slides / "CMU-1-Small-Region.svs"], cfg, tmp_path / "out")
    cfg.tile.mpp = 2.0  # given explicitly, it runs
    rows = run_slides([slides / "CMU-1-Small-Region.svs"], cfg, tmp_path / "out")
    assert rows[0]["status"] == "ok"


def test_slide_without_usable_mpp_and_its_override(slides, float_artifact, tmp_path):
    cfg = _cfg(tmp_path, float_artifact, **{"tile.size": 8, "tile.mpp": 2.0, "tile.theta": 0.0})
    cfg.slide = str(slides / "boxes.tiff")  # one slide: its error is raised, not a summary row
    with pytest.raises(SlideError, match=r"reader\.mpp="):
        run_slides([slides / "boxes.tiff"], cfg, tmp_path / "out")
    cfg.reader.mpp = 0.25
    rows = run_slides([slides / "boxes.tiff"], cfg, tmp_path / "out2")
    assert rows[0]["status"] == "ok" and rows[0]["n_tiles"] > 0


def test_bad_settings_fail_before_work(float_artifact, tmp_path, slides, capsys):
    from patholite.slide import run_slide

    result = _cli(f"artifact={float_artifact}", cwd=tmp_path)  # as a user meets it: one line, exit 1
    assert result.returncode == 1 and "one of them" in result.stderr, result.stderr[-1500:]
    assert "Traceback" not in result.stderr
    for i, (args, needle) in enumerate(
        (
            (["tile.theta=2"], "tile.theta"),
            (["report.severity=[Invasive]"], "exactly once"),
            (["engine.batch_size=0"], "batch"),
            (["engine.device=tpu"], "engine.device"),
        )
    ):
        run = tmp_path / f"run{i}"
        overrides = [f"slide={slides / 'small.svs'}", f"artifact={float_artifact}", *args]
        cfg = job_config(overrides, run, run, "slide")
        with pytest.raises(SystemExit) as failed:
            run_slide(cfg)
        assert failed.value.code == 1 and needle in capsys.readouterr().err, args
        assert not (run / "summary.csv").exists(), args  # refused before any slide was read


def test_artifact_folder_run_folder_and_missing(float_artifact, tmp_path):
    assert resolve_artifact(float_artifact) == float_artifact
    assert resolve_artifact(float_artifact / "artifact.json") == float_artifact
    with pytest.raises(CheckpointError, match="neither an artifact"):
        resolve_artifact(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_artifact(tmp_path / "nothing")


def test_repo_config_composes(tmp_path):
    """conf/slide.yaml composes onto its schema (unknown keys fail at compose time)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("slide", overrides=["slide=x.svs", "artifact=a"])
        assert cfg.engine.workers == 2 and cfg.tile.theta == 0.5
        with pytest.raises(Exception, match="nonsense"):
            compose("slide", overrides=["engine.nonsense=1"])
