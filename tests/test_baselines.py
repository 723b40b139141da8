"""The slide-level baselines: full tiling through the slide engine with pooled tile scores, and
gated-attention MIL over the tiles' embeddings."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from patholite import artifacts as art
from patholite.artifacts.mil import load_mil, save_mil
from patholite.config.options import load_model_option
from patholite.config.slide_schema import EngineConfig, TileConfig
from patholite.errors import CheckpointError, ConfigError
from patholite.models.factory import create_network
from patholite.models.mil import GatedAttentionMIL, predict_mil, train_mil
from patholite.slides.baselines import EmbeddingTap, pool_scores, tile_outputs
from patholite.slides.engine import Normalise, SlideTiles, TileSpec
from patholite.slides.inference import TileGeometry, load_classifier
from patholite.wsi.reader import open_slide
from patholite.wsi.tiling import tile_grid
from patholite.wsi.tissue import detect_tissue

CLASSES = ["Normal", "Benign", "InSitu", "Invasive"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A micro ViT tile classifier as an artifact: 32-px tiles at 2 um/px (128 level-0 px at 0.5 um/px)."""
    torch.manual_seed(0)
    model_cfg = OmegaConf.to_container(load_model_option("vit_micro"), resolve=True)
    net = create_network(model_cfg, len(CLASSES), 32).eval()
    directory = tmp_path_factory.mktemp("artifact") / "fp32"
    meta = {"model": {**model_cfg, "checkpoint": None}, "class_names": CLASSES, "image_size": 32,
            "mean": list(MEAN), "std": list(STD), "mpp": 2.0, "tile_size": 32}  # fmt: skip
    art.save_float_artifact(net, directory, meta)
    return (*load_classifier(directory), directory)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    from patholite.data.synthetic.slides import write_synthetic_slide
    from patholite.data.synthetic.spec import LesionSpec, SlideSpec

    spec = SlideSpec(1024, 1024, seed=3, texture_px=128, lesions=[LesionSpec("InSitu", 1, (100.0, 150.0))])
    return write_synthetic_slide(tmp_path_factory.mktemp("slide") / "s.svs", spec).path


def test_tile_outputs_streams_every_tissue_tile_with_embeddings(classifier, slide, tmp_path):
    model, meta, _ = classifier
    out = tile_outputs(slide, model, meta, engine=EngineConfig(batch_size=8, workers=1))
    with open_slide(slide) as s:
        grid = tile_grid(s, 32, mpp=2.0, tissue=detect_tissue(s))
    assert out.n_tiles == len(grid) > 5
    assert np.array_equal(out.coords, grid.coords) and out.size0 == 128
    assert out.probabilities.shape == (len(grid), len(CLASSES))
    assert np.allclose(out.probabilities.sum(1), 1.0, atol=1e-5)
    assert out.embeddings.shape == (len(grid), 64)  # vit_micro's width
    assert out.read_pixels_level0 == len(grid) * 128**2
    assert out.read_seconds > 0 and out.model_seconds > 0
    assert out.wall_seconds >= out.model_seconds and out.timings["workers"] == 1
    assert out.tile["size0"] == 128 and out.tile["mpp"] == 2.0
    # the embeddings are timm's pre-logits features; the head turns them into the very probabilities
    head_probs = torch.softmax(model.get_classifier()(torch.from_numpy(out.embeddings)), 1).detach()
    assert np.allclose(head_probs.numpy(), out.probabilities, atol=1e-5)
    spec = TileSpec(str(slide), out.coords, 128, 32, 32, MEAN, STD)
    first = torch.from_numpy(SlideTiles(spec).read(3).transpose(2, 0, 1).copy())[None]
    with torch.inference_mode():
        x = Normalise(MEAN, STD, "cpu")(first)
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
    assert np.allclose(pre.numpy()[0], out.embeddings[3], atol=1e-5)

    # without embeddings, through the engine's cache, with its CSV: the same tiles and scores
    again = tile_outputs(
        slide, model, meta, TileConfig(), engine={"batch_size": 16, "workers": 0}, embeddings=False,
        cache_dir=tmp_path / "cache", csv_path=tmp_path / "tiles.csv",
    )  # fmt: skip
    assert again.embeddings is None
    assert np.array_equal(again.coords, out.coords)
    assert np.allclose(again.probabilities, out.probabilities, atol=1e-6)
    assert len(list((tmp_path / "cache").glob("s-*/tiles-*.h5"))) == 1
    with open(tmp_path / "tiles.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == out.n_tiles
    # a geometry given directly: 64-px tiles at 1 um/px cover the same 128 level-0 px
    geo = tile_outputs(slide, model, meta, TileGeometry(64, 1.0, None), engine={"workers": 0})
    assert np.array_equal(geo.coords, out.coords) and geo.read_pixels_level0 == out.read_pixels_level0


def test_embeddings_need_a_classifier_head():
    with pytest.raises(CheckpointError, match="no classifier head"):
        EmbeddingTap(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)))


def test_pool_scores_max_and_mean():
    binary = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    assert np.allclose(pool_scores(binary, "max"), [0.3, 0.7])  # the most positive tile; 1 - it
    assert np.allclose(pool_scores(binary, "mean"), [0.6, 0.4])
    three = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.2, 0.3]])
    # lesion classes: their most convinced tile; the negative class: its least convinced tile; renormalised
    assert np.allclose(pool_scores(three, "max"), np.array([0.2, 0.7, 0.3]) / 1.2)
    assert np.allclose(pool_scores(three, "max", negative_class=None), np.array([0.8, 0.7, 0.3]) / 1.8)
    assert np.allclose(pool_scores(three, "max", negative_class=2), np.array([0.8, 0.7, 0.1]) / 1.6)
    assert np.allclose(pool_scores(three[:1], "max"), three[0])  # one tile: its own scores
    with pytest.raises(ConfigError, match="how="):
        pool_scores(three, "median")
    with pytest.raises(ConfigError, match="negative_class"):
        pool_scores(three, negative_class=3)
    with pytest.raises(ValueError, match="tiles, classes"):
        pool_scores(np.zeros((0, 2)))


def _toy_bags(n: int = 16, d: int = 8, seed: int = 0):
    """Bags of noise tiles; positive bags (odd index) hold one or two tiles shifted along feature 0."""
    rng = np.random.default_rng(seed)
    bags, labels = [], []
    for i in range(n):
        bag = rng.normal(size=(int(rng.integers(5, 16)), d)).astype(np.float32)
        label = i % 2
        if label:
            bag[: int(rng.integers(1, 3)), 0] += 6.0
            rng.shuffle(bag)
        bags.append(torch.from_numpy(bag))
        labels.append(label)
    return bags, labels


@torch.no_grad()
def test_gated_attention_sums_to_one_and_ignores_tile_order():
    torch.manual_seed(0)
    model = GatedAttentionMIL(8, 3, hidden_dim=16, attention_dim=8).eval()
    bag = torch.randn(11, 8)
    logits, attention = model(bag)
    assert logits.shape == (3,) and attention.shape == (11,)
    assert float(attention.sum()) == pytest.approx(1.0, abs=1e-6) and (attention > 0).all()
    perm = torch.randperm(11)
    logits_p, attention_p = model(bag[perm])
    assert torch.allclose(logits_p, logits, atol=1e-6)
    assert torch.allclose(attention_p, attention[perm], atol=1e-6)
    assert torch.allclose(model(bag[None])[0], logits)  # a batch of one bag
    with pytest.raises(ValueError, match="bag"):
        model(torch.randn(0, 8))
    assert GatedAttentionMIL.from_config(model.config()).config() == model.config()


def test_train_mil_separates_a_toy_problem_deterministically():
    bags, labels = _toy_bags()
    state = torch.random.get_rng_state()
    model = train_mil(bags, labels, 2, epochs=25, lr=2e-3, seed=1, hidden_dim=16, attention_dim=8)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    preds = [int(predict_mil(model, b).argmax()) for b in bags]
    assert preds == labels
    # the attention of a positive bag goes to its shifted tiles
    probs, attention = predict_mil(model, bags[1], return_attention=True)
    assert probs.shape == (2,) and bags[1][int(attention.argmax()), 0] > 3
    twin = train_mil(bags, labels, 2, epochs=25, lr=2e-3, seed=1, hidden_dim=16, attention_dim=8)
    pairs = zip(model.state_dict().values(), twin.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    with pytest.raises(ConfigError, match="two"):
        train_mil(bags, [1] * len(bags), 2, epochs=1)
    with pytest.raises(ConfigError, match="labels"):
        train_mil(bags, [5] * len(bags), 2, epochs=1)


def test_mil_artifact_round_trip(tmp_path, classifier):
    bags, labels = _toy_bags(n=4)
    model = train_mil(bags, labels, 2, epochs=2, seed=0, hidden_dim=16, attention_dim=8, class_weights=None)
    files = save_mil(model, tmp_path / "mil", {"class_names": ["negative", "positive"], "tile_artifact": "x"})
    assert sorted(files) == sorted(["model.safetensors", "artifact.json"])
    loaded, meta = load_mil(tmp_path / "mil")
    assert meta["kind"] == "mil" and meta["slide_model"] is True and meta["tile_artifact"] == "x"
    assert meta["model"] == model.config()
    for bag in bags:
        assert np.array_equal(predict_mil(loaded, bag), predict_mil(model, bag))
    with pytest.raises(CheckpointError):  # the tile engine refuses a slide model
        load_classifier(tmp_path / "mil")
    with pytest.raises(CheckpointError, match="not a MIL"):  # and the MIL loader a tile classifier
        load_mil(classifier[2])
