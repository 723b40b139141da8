"""Issue 19, inference side: SMT's adaptive reads (K per image between bounds), tissue-masked candidates, the
learned attention aggregation (trained on slide labels, saved in the artifact), and every new knob refused
before work, in a run's checks, at the slide CLI and through a sweep."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from patholite.artifacts.load import load_artifact
from patholite.artifacts.torch_float import save_float_artifact
from patholite.errors import ConfigError, SlideError
from patholite.models.smt import ReadPolicy, SMTNet, predict_slide
from patholite.models.smt_aggregate import AttentionAggregate, calibrate_threshold, fit_attention
from patholite.pipelines.preflight import check_run
from patholite.slides.run import run_slides
from patholite.slides.smt_inference import load_smt_model, smt_settings, with_attention_head
from patholite.wsi.region import Box
from patholite.wsi.tissue import TissueMask

from .conftest import compose_config, run_cli
from .test_smt_inference import _cfg, work  # noqa: F401 - the slides and SMT artifacts of the slide CLI tests

S, GRID = 32, 4
ENCODER = {"timm_name": "vit_tiny_patch16_224", "kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2}}
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
BOX = Box(0.0, 0.0, 1024.0)


def tiny_net(aggregate: str = "mean", seed: int = 0) -> SMTNet:
    torch.manual_seed(seed)
    return SMTNet(ENCODER, num_classes=2, image_size=S, grid=GRID, layers=3, aggregate=aggregate)


class CountingReader:
    """Counts reads at the reader and returns seeded random images of the requested size."""

    def __init__(self, seed: int = 0) -> None:
        self.boxes: list[Box] = []
        self.rng = np.random.default_rng(seed)

    @property
    def reads(self) -> int:
        return len(self.boxes)

    def read(self, box: Box, size: int) -> np.ndarray:
        self.boxes.append(box)
        return self.rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def children(out: dict) -> list[list[int]]:
    """Per layer after the first: how many images each image of the layer above sent down."""
    counts = []
    for above, layer in zip(out["layers"], out["layers"][1:], strict=False):
        counts.append([layer["parents"].count(j) for j in range(len(above["boxes"]))])
    return counts


def fixed_scores(net: SMTNet, scores: torch.Tensor) -> None:
    """Every image of every layer gets these focusing scores (grid^2,): the test decides what is flat."""
    net.focus = lambda layer, patches: scores.expand(patches.shape[0], -1).clone()


# ---------------------------------------------------------------------------------------- adaptive reads
@pytest.mark.parametrize("policy", [
    ReadPolicy(top_k=1, top_k_max=3, adaptive="spread", spread=0.02),
    ReadPolicy(top_k=1, top_k_max=3, adaptive="margin", margin=0.3),
    ReadPolicy(top_k=2, top_k_max=4, adaptive="spread", spread=1.0),
])  # fmt: skip
@pytest.mark.parametrize("seed", [0, 1])
def test_adaptive_k_stays_in_its_bounds_and_reads_what_it_reports(policy, seed):
    net, reader = tiny_net(seed=seed), CountingReader(seed)
    out = predict_slide(net, reader, BOX, policy.top_k, MEAN, STD, policy=policy)
    boxes = [Box(*b) for layer in out["layers"] for b in layer["boxes"]]
    assert reader.reads == out["reads"] == len(boxes) and reader.boxes == boxes  # counted at the reader
    for per_image in children(out):
        assert all(policy.top_k <= k <= policy.k_max for k in per_image)
    assert 1 + policy.top_k + policy.top_k**2 <= out["reads"] <= policy.max_reads(3)
    if policy.spread == 1.0:  # every score lies within 1.0 of the best: always the most
        assert out["reads"] == policy.max_reads(3) == 1 + 4 + 16


def test_spread_reads_more_where_the_focusing_scores_are_flat():
    net = tiny_net()
    policy = ReadPolicy(top_k=1, top_k_max=5, adaptive="spread", spread=0.05)
    peaked = torch.full((GRID * GRID,), 0.1)
    peaked[3] = 0.9
    fixed_scores(net, peaked)
    assert children(predict_slide(net, CountingReader(), BOX, 1, MEAN, STD, policy=policy)) == [[1], [1]]
    flat = torch.full((GRID * GRID,), 0.1)
    flat[[2, 5, 7]] = torch.tensor([0.9, 0.88, 0.87])  # three patches the predictor cannot tell apart
    fixed_scores(net, flat)
    out = predict_slide(net, CountingReader(), BOX, 1, MEAN, STD, policy=policy)
    assert children(out) == [[3], [3, 3, 3]] and out["reads"] == 1 + 3 + 9
    # the chosen patches are the three best, best first
    assert out["layers"][1]["scores"] == pytest.approx([0.9, 0.88, 0.87])


def test_margin_reads_the_most_only_while_the_slide_is_unsure():
    net = tiny_net()
    unsure = ReadPolicy(top_k=1, top_k_max=3, adaptive="margin", margin=0.5)  # every p lies within 0.5
    assert predict_slide(net, CountingReader(), BOX, 1, MEAN, STD, policy=unsure)["reads"] == 1 + 3 + 9
    with torch.no_grad():  # a confident layer head: p(positive) ~ 1 at every layer, outside any band
        for enc in net.encoders:
            enc.head.weight.zero_()
            enc.head.bias.copy_(torch.tensor([-20.0, 20.0]))
    sure = ReadPolicy(top_k=1, top_k_max=3, adaptive="margin", margin=0.4)
    assert predict_slide(net, CountingReader(), BOX, 1, MEAN, STD, policy=sure)["reads"] == 1 + 1 + 1


def test_the_slide_cli_walks_adaptively_and_reports_what_it_read(work, tmp_path):  # noqa: F811
    """smt_micro-like artifact (top_k 2, grid 4): spread 1.0 reads top_k_max everywhere; with the tissue mask
    each read patch holds tissue; the walk's own check compares the reader's count with the report's."""
    cfg = _cfg(work, "smt", tmp_path, **{"smt.top_k": 1, "smt.top_k_max": 3, "smt.adaptive": "spread",
                                         "smt.spread": 1.0})  # fmt: skip
    run_slides([work["big"]], cfg, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "big" / "report.json").read_text())
    assert report["reads"] == 1 + 3 + 9 == report["max_reads"] and report["reads_per_layer"] == [1, 3, 9]
    assert report["expected_reads"] is None and report["smt"]["adaptive"] == "spread"
    cfg = _cfg(work, "smt", tmp_path, **{"smt.top_k": 3, "smt.tissue_min": 0.3})
    run_slides([work["big"]], cfg, tmp_path / "masked")
    report = json.loads((tmp_path / "masked" / "big" / "report.json").read_text())
    assert report["reads"] == sum(report["reads_per_layer"]) <= 1 + 3 + 9
    assert report["smt"]["tissue_min"] == 0.3


# ---------------------------------------------------------------------------------------- tissue mask
def left_half_tissue() -> TissueMask:
    """A 64 x 64 mask at 16 level-0 px per pixel over BOX: tissue in x < 512 only."""
    mask = np.zeros((64, 64), dtype=bool)
    mask[:, :32] = True
    return TissueMask(mask=mask, downsample=16.0)


def test_tissue_masked_candidates_are_never_read():
    net = tiny_net()
    right = torch.zeros(GRID * GRID)
    right[[2, 3, 6, 7, 10, 11, 14, 15]] = 0.9  # the predictor prefers the glass (columns 2-3)
    fixed_scores(net, right)
    plain = predict_slide(net, CountingReader(), BOX, 2, MEAN, STD)
    assert any(b[0] >= 512 for b in plain["layers"][1]["boxes"])  # unmasked, it reads the glass
    policy = ReadPolicy(top_k=2, tissue_min=0.5)
    reader = CountingReader()
    out = predict_slide(net, reader, BOX, 2, MEAN, STD, policy=policy, tissue=left_half_tissue())
    for layer in out["layers"][1:]:
        assert all(x + side <= 512 for x, _, side in layer["boxes"])  # every read lies on tissue
    assert reader.reads == out["reads"] == 1 + 2 + 4
    with pytest.raises(ConfigError, match="tissue mask"):  # no mask: refused, not silently unmasked
        predict_slide(net, CountingReader(), BOX, 2, MEAN, STD, policy=policy)
    glass = TissueMask(mask=np.zeros((64, 64), dtype=bool), downsample=16.0)
    with pytest.raises(SlideError, match="tissue_min=0.5; lower it"):
        predict_slide(net, CountingReader(), BOX, 2, MEAN, STD, policy=policy, tissue=glass)


def test_an_image_with_fewer_tissue_patches_than_k_reads_only_those():
    net = tiny_net()
    mask = np.zeros((64, 64), dtype=bool)
    mask[:16, :16] = True  # one layer-1 patch (the top-left 256 px) holds tissue
    policy = ReadPolicy(top_k=3, tissue_min=0.5)
    reader = CountingReader()
    out = predict_slide(net, reader, BOX, 3, MEAN, STD, policy=policy, tissue=TissueMask(mask, 16.0))
    assert out["layers"][1]["boxes"] == [[0.0, 0.0, 256.0]]
    assert children(out)[0] == [1] and reader.reads == out["reads"] == 1 + 1 + 3


# ------------------------------------------------------------------------------------ attention head
def toy_bags(n: int, seed: int, dim: int = 32) -> tuple[list[torch.Tensor], list[int]]:
    """Bags of 4 embeddings; a positive bag has one image shifted along the first axes: separable only by
    looking at the right instance (the mean over the bag dilutes it)."""
    g = torch.Generator().manual_seed(seed)
    bags, labels = [], []
    for i in range(n):
        bag = torch.randn(4, dim, generator=g)
        if i % 2:
            bag[int(torch.randint(4, (1,), generator=g))] += 3.0 * (torch.arange(dim) < 4).float()
        bags.append(bag)
        labels.append(i % 2)
    return bags, labels


def test_attention_trains_on_a_separable_toy_and_calibrates_on_validation():
    head = AttentionAggregate(32, 2)
    bags, labels = toy_bags(16, 0)
    val_bags, val_labels = toy_bags(12, 1)
    info = fit_attention(head, bags, labels, 0, val_bags, val_labels, epochs=15)
    assert info["loss_after"] < 0.5 * info["loss_before"]  # the loss falls
    assert info["calibrated_on"] == "validation" and info["calibration_slides"] == 12
    assert head.calibrated and float(head.threshold) == pytest.approx(info["threshold"])
    with torch.no_grad():
        scores = [1 - float(head(b)[0]) for b in val_bags]
    calls = [s >= info["threshold"] for s in scores]
    assert np.mean([c == bool(y) for c, y in zip(calls, val_labels, strict=True)]) >= 0.9


def test_calibrated_threshold_maximises_balanced_accuracy():
    assert calibrate_threshold([0.1, 0.2, 0.6, 0.7], [False, False, True, True]) == pytest.approx(0.4)
    assert calibrate_threshold([0.3, 0.35, 0.4, 0.9], [False, True, False, True]) == pytest.approx(
        0.325
    )  # a tie: the lowest
    with pytest.raises(ConfigError, match="both kinds"):
        calibrate_threshold([0.1, 0.2], [True, True])


def _meta() -> dict:
    smt = {"image_size": S, "grid": GRID, "layers": 3, "top_k": 2, "aggregate": "attention"}
    model = {"name": "smt_test", "family": "smt", **ENCODER, "smt": smt}
    return {"model": model, "class_names": ["Normal", "Tumor"], "negative_class": "Normal", "image_size": S,
            "mean": MEAN, "std": STD, "slide_model": True}  # fmt: skip


def test_attention_is_saved_in_the_artifact_and_reloads_to_the_same_slide_probabilities(tmp_path):
    net = tiny_net("attention")
    walks = [predict_slide(net, CountingReader(i), BOX, 2, MEAN, STD, aggregate="max") for i in range(8)]
    labels = [i % 2 for i in range(8)]
    info = fit_attention(net.aggregator, [w["embeddings"] for w in walks], labels, 0, epochs=5)
    assert info["calibrated_on"] == "training"  # no validation bags given: said so
    before = [
        predict_slide(net, CountingReader(i), BOX, 2, MEAN, STD, aggregate="attention") for i in range(3)
    ]
    save_float_artifact(net, tmp_path / "a", _meta())
    loaded, meta = load_artifact(tmp_path / "a")
    assert float(loaded.aggregator.threshold) == pytest.approx(info["threshold"])
    settings = smt_settings(loaded, meta, tmp_path / "a")
    assert settings.aggregate == "attention"
    for i, ref in enumerate(before):
        out = predict_slide(loaded, CountingReader(i), BOX, 2, MEAN, STD, aggregate="attention")
        assert out["probs"] == pytest.approx(ref["probs"], abs=1e-6) and out["label"] == ref["label"]
        assert out["threshold"] == pytest.approx(info["threshold"]) and sum(
            out["attention"]
        ) == pytest.approx(1)
    plain = tiny_net()
    with pytest.raises(ConfigError, match="no trained attention head"):
        predict_slide(plain, CountingReader(), BOX, 2, MEAN, STD, aggregate="attention")
    with pytest.raises(ConfigError, match="no trained attention head"):
        smt_settings(plain, {**_meta(), "model": {**_meta()["model"], "smt": {"top_k": 2}}}, "x",
                     {"aggregate": "attention"})  # fmt: skip


def test_a_head_is_fitted_on_a_trained_smt_artifact_and_the_slide_cli_uses_it(work, tmp_path):  # noqa: F811
    """scripts/smt_attention.py's logic: the artifact's SMT weights unchanged, a head fitted on its walks of
    the training slides, its threshold set on the validation slides, a new artifact the slide CLI runs."""
    net, meta = load_smt_model(work["root"] / "smt")
    cases = [(work["big"], 1), (work["small"], 0)]
    headed, sidecar = with_attention_head(net, meta, cases, cases, tmp_path / "headed", epochs=3)
    assert sidecar["model"]["smt"]["aggregate"] == "attention"
    assert sidecar["smt_attention"]["calibrated_on"] == "validation"
    assert sidecar["smt_attention"]["train_slides"] == 2 and headed.aggregator.calibrated
    same = {k: v for k, v in headed.state_dict().items() if not k.startswith("aggregator.")}
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in same.items())  # SMT itself unchanged
    cfg = _cfg(work, "smt", tmp_path)
    cfg.artifact = str(tmp_path / "headed")
    run_slides([work["big"]], cfg, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "big" / "report.json").read_text())
    assert report["smt"]["aggregate"] == "attention" and "attention threshold" in report["call"]["by"]
    assert sum(r["attention"] for r in report["layers"][-1]["regions"]) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="fitted on a float SMT artifact"):
        with_attention_head(*load_smt_model(work["root"] / "smt_int8"), cases, cases, tmp_path / "x")


# ------------------------------------------------------------------------------------------ bad knobs
def test_each_bad_knob_is_refused_by_the_run_checks(tmp_path):
    def cfg(*overrides):
        return compose_config(["model=smt_micro", "dataset=smt_synthetic", *overrides], tmp_path, tmp_path)

    check_run(cfg("model.smt.aggregate=attention", "model.smt.adaptive=spread", "model.smt.top_k_max=4",
                  "model.smt.tissue_min=0.2"))  # fmt: skip
    for overrides, match in (
        (["model.smt.top_k_max=1"], r"model.smt.top_k_max=1 is below model.smt.top_k=2"),
        (
            ["model.smt.aggregate=median"],
            r"model.smt.aggregate='median' must be one of \['mean', 'max', 'att",
        ),
        (
            ["model.smt.adaptive=entropy", "model.smt.top_k_max=4"],
            r"model.smt.adaptive='entropy': use one of",
        ),
        (
            ["model.smt.adaptive=spread"],
            r"adaptive=spread needs a range to adapt in: set model.smt.top_k_max",
        ),
        (["model.smt.top_k_max=65"], r"model.smt.top_k_max=65: each image has only 8x8=64 patches"),
        (["model.smt.tissue_min=1.5"], r"model.smt.tissue_min=1.5 must lie in \[0, 1\)"),
        (["model.smt.margin=0"], r"model.smt.margin=0.0 must lie in \(0, 0.5\]"),
    ):
        with pytest.raises(ConfigError, match=match):
            check_run(cfg(*overrides))


def test_bad_walk_overrides_are_refused_before_any_slide():
    net = tiny_net()
    meta = {**_meta(), "model": {**_meta()["model"], "smt": {**_meta()["model"]["smt"], "aggregate": "max"}}}
    assert smt_settings(net, meta, "x", {"top_k_max": 4, "adaptive": "spread"}).max_reads == 1 + 4 + 16
    for walk, match in (
        ({"top_k_max": 1}, r"smt.top_k_max=1 is below smt.top_k=2"),
        ({"aggregate": "median"}, r"smt.aggregate='median': use one of"),
        ({"adaptive": "margin"}, r"smt.adaptive=margin needs a range"),
    ):
        with pytest.raises(ConfigError, match=match):
            smt_settings(net, meta, "x", walk)


# a sweep of four CLI jobs (12 s): make test stays under its 8 minutes
@pytest.mark.slow
def test_the_new_knobs_compose_in_a_sweep_and_each_job_is_refused_before_work(tmp_path):
    """Four jobs of the new keys, each with a maximum below its minimum: composed, checked, refused, no
    training (a sweep whose jobs train is the benchmark's, too slow here)."""
    sweep = tmp_path / "sweep"
    result = run_cli(
        ["-m", "model=smt_micro", "dataset=smt_synthetic", "model.smt.aggregate=max,attention",
         "model.smt.adaptive=none,spread", "model.smt.top_k_max=1", "logger=none",
         f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    summary = json.loads((sweep / "sweep.json").read_text())
    assert sorted(tuple(j["overrides"][2:4]) for j in summary["jobs"]) == [
        ("model.smt.aggregate=attention", "model.smt.adaptive=none"),
        ("model.smt.aggregate=attention", "model.smt.adaptive=spread"),
        ("model.smt.aggregate=max", "model.smt.adaptive=none"),
        ("model.smt.aggregate=max", "model.smt.adaptive=spread"),
    ]
    for i in range(4):
        record = json.loads((sweep / str(i) / "metrics.json").read_text())
        assert record["status"] == "failed" and "top_k_max=1 is below model.smt.top_k=2" in record["error"]
        assert record["config"]["model"]["smt"]["aggregate"] in ("max", "attention")
        assert not (sweep / str(i) / "checkpoints").exists()  # refused before any work


# ------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_a_tiny_smt_with_attention_and_adaptive_reads_trains_saves_and_walks(tmp_path):
    """The run's own path: SMT trains, the head is fitted on the training slides' walks (threshold on
    validation), both artifacts (float, dynamic INT8) carry it, and the test walks read within the bounds."""
    from tests.test_smt_train import train_tiny

    run = train_tiny(
        tmp_path, "trainer.max_epochs=1", "compression=ptq", "model.smt.aggregate=attention",
        "model.smt.adaptive=spread", "model.smt.top_k_max=3", "model.smt.spread=0.02",
        "model.smt.tissue_min=0.1", "model.smt.attention_epochs=5",
    )  # fmt: skip
    fitted = json.loads((run / "smt_attention.json").read_text())
    assert fitted["train_slides"] == 4 and fitted["loss_after"] <= fitted["loss_before"]
    record = json.loads((run / "metrics.json").read_text())
    assert record["status"] == "ok"
    for artifact in record["artifacts"]:
        per_slide = artifact["cost"]["protocol"]["per_slide"]
        assert all(1 <= s["reads"] <= 1 + 3 + 9 for s in per_slide["slides"])
        assert per_slide["reads_max"] <= 1 + 3 + 9 and per_slide["reads_mean"] >= 1
        net, meta = load_artifact(run / "artifacts" / artifact["name"])
        assert meta["model"]["smt"]["aggregate"] == "attention" and net.aggregator is not None
        assert float(net.aggregator.threshold) == pytest.approx(fitted["threshold"])
