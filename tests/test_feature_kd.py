"""Label-free feature distillation: the loss by hand, heads that learn, augmentations, the stage end to end,
the teacher-embedding cache shared by runs, and bad input refused before work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from patholite.compress.feature_kd import FeatureDistiller, HistologyAugment, feature_loss
from patholite.data.synthetic.slides import write_synthetic_slide
from patholite.data.synthetic.spec import SlideSpec
from patholite.errors import ConfigError, PatholiteError
from patholite.models.factory import create_network
from patholite.pipelines.preflight import preflight
from patholite.records import read_record
from patholite.train import run_job

MICRO = {
    "name": "vit_micro",
    "family": "vit",
    "timm_name": "vit_tiny_patch16_224",
    "kwargs": {"patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4},
}
KD = ["compression=feature_kd"]


def test_the_feature_loss_is_cosine_plus_smooth_l1_as_computed_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 1.0], [0.0, 0.5]])
    # cosines: 1/sqrt(2) and 1; smooth-L1 (beta 1) of the differences 0, -1, 0, 1.5: 0, 0.5, 0, 1.0
    cosine = ((1 - 2**-0.5) + (1 - 1.0)) / 2
    smooth = (0 + 0.5 + 0 + 1.0) / 4
    got = feature_loss(s, t, cosine_weight=2.0, smooth_l1_weight=3.0, beta=1.0)
    torch.testing.assert_close(got, torch.tensor(2 * cosine + 3 * smooth))
    # beta 2: |d| < 2 is quadratic 0.5 d^2 / beta: 0.25 for d=-1, 0.5625 for d=1.5
    got = feature_loss(s, t, cosine_weight=0.0, smooth_l1_weight=1.0, beta=2.0)
    torch.testing.assert_close(got, torch.tensor((0.25 + 0.5625) / 4))
    with pytest.raises(ValueError, match="student"):
        feature_loss(s, t[:, :1])


def _distiller(nested=(), patch=False, teachers=None) -> FeatureDistiller:
    torch.manual_seed(0)
    student = create_network(MICRO, 0, 16)
    return FeatureDistiller(student, 64, teachers or {"t0": 24}, nested, "mlp", patch=patch)


def test_heads_are_one_per_teacher_and_nested_size_and_the_loss_averages_them():
    d = _distiller(nested=(16, 32), patch=True, teachers={"t0": 24, "t1": 40})
    assert d.sizes == [16, 32, 64]
    assert sorted(d.heads) == sorted(f"t{i}@{m}" for i in (0, 1) for m in (16, 32, 64))
    x = torch.randn(3, 3, 16, 16)
    out = d(x)
    assert (
        out["t0@16"].shape == (3, 24) and out["t1@64"].shape == (3, 40) and out["t1@patch"].shape == (3, 40)
    )
    targets = {t: {"cls": torch.randn(3, w), "patch": torch.randn(3, w)} for t, w in (("t0", 24), ("t1", 40))}
    total, parts = d.loss(out, targets, patch_weight=0.5)
    per_teacher = [
        torch.stack([parts[f"{t}@{m}"] for m in (16, 32, 64)]).mean() + 0.5 * parts[f"{t}@patch"]
        for t in ("t0", "t1")
    ]
    torch.testing.assert_close(total, torch.stack(per_teacher).mean())
    # the 16-wide head sees only the first 16 dimensions of the student's embedding
    pooled = d.net(x)
    torch.testing.assert_close(out["t0@16"], d.heads["t0@16"](pooled[:, :16]))
    with pytest.raises(ValueError, match="nested"):
        _distiller(nested=(65,))


def test_a_student_moves_toward_its_teachers_embedding_in_a_few_steps():
    d = _distiller(teachers={"t0": 24, "t1": 8})
    torch.manual_seed(1)
    x = torch.randn(16, 3, 16, 16)
    teacher = {"t0": {"cls": torch.randn(16, 24)}, "t1": {"cls": torch.randn(16, 8)}}
    opt = torch.optim.AdamW(d.parameters(), lr=3e-3)

    def agreement() -> float:
        with torch.no_grad():
            out = d(x)
            return float(F.cosine_similarity(out["t0@64"], teacher["t0"]["cls"]).mean())

    before, first = agreement(), None
    for _ in range(30):
        loss, _ = d.loss(d(x), teacher)
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first
    assert agreement() > before + 0.3


def test_the_students_view_turns_and_flips_tiles_and_jitters_their_stain():
    torch.manual_seed(0)
    tiles = torch.rand(8, 3, 12, 12)
    turned = HistologyAugment(flips=True, rotate90=True, stain_sigma=0.0)(tiles)
    for a, b in zip(tiles, turned, strict=True):  # the same pixels, moved
        torch.testing.assert_close(a.flatten().sort().values, b.flatten().sort().values)
    assert any(not torch.equal(a, b) for a, b in zip(tiles, turned, strict=True))
    stained = HistologyAugment(flips=False, rotate90=False, stain_sigma=0.2)(tiles)
    assert stained.shape == tiles.shape and not torch.allclose(stained, tiles)
    assert stained.min() >= 0 and stained.max() <= 1
    torch.testing.assert_close(HistologyAugment(False, False, 0.0)(tiles), tiles)


# ------------------------------------------------------------------------------------------ end to end
def test_feature_kd_distils_without_labels_probes_quantizes_and_records(make_cfg, tmp_path):
    cfg = make_cfg("compression=feature_kd_ptq", "compression.ptq.methods=[dynamic]")
    assert run_job(cfg) == "ok"
    record = read_record(tmp_path / "run")
    rows = {a["name"]: a for a in record["artifacts"]}
    assert list(rows) == ["teacher_fp32", "student_fp32", "int8_dynamic"]
    student, int8 = rows["student_fp32"], rows["int8_dynamic"]
    for row in rows.values():
        q = row["quality"]
        assert 0 <= q["balanced_accuracy"] <= 1 and q["probe"]["knn"]["k"] >= 1
        assert q["embed_dim"] == 64 and -1 <= q["stain_cosine"] <= 1
        assert row["cost"]["params"] > 0
    assert student["source"] == "teacher_fp32" and int8["source"] == "student_fp32"
    assert 0 <= student["parity"]["neighbour_overlap"] <= 1
    assert set(student["parity"]["projected_cosine"]) == {"teacher_fp32"}
    assert int8["parity"]["mean_cosine"] > 0.9  # INT8 keeps the embedding
    assert "balanced_accuracy_change_pp" in int8["parity"]
    # the float student's own probe read on the INT8 embeddings: flips and change without refit noise
    assert 0 <= int8["parity"]["probe_flip_rate"] <= 1
    assert "same_probe_balanced_accuracy_change_pp" in int8["parity"]
    assert Path(student["path"], "probe.safetensors").is_file()
    sidecar = json.loads(Path(student["path"], "artifact.json").read_text())
    assert sidecar["encoder"] == {"embed_dim": 64}


def test_teacher_embeddings_are_computed_once_per_cache_key(make_cfg, tmp_path):
    assert run_job(make_cfg(*KD, run_dir=tmp_path / "a")) == "ok"
    cache = Path(make_cfg(*KD).paths.cache_dir) / "teacher_embeddings"
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert len(entries) == 1
    stamp = {p.name: p.stat().st_mtime_ns for p in entries[0].iterdir()}
    # another student of the same teacher and tiles reads them; other tiles make another entry
    assert run_job(make_cfg(*KD, "compression.feature_kd.nested=[16]", run_dir=tmp_path / "b")) == "ok"
    assert {p.name: p.stat().st_mtime_ns for p in entries[0].iterdir()} == stamp
    assert run_job(make_cfg(*KD, "compression.feature_kd.tiles.max_tiles=40", run_dir=tmp_path / "c")) == "ok"
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["compression.teacher.model=smt_micro"], "not an encoder"),
        (["compression.feature_kd.nested=[32,128]"], "exceed the student's embedding width 64"),
        (["compression.feature_kd.projection=deep"], "compression.feature_kd.projection"),
        (
            ["compression.feature_kd.teachers=[vit_micro,vit_micro,vit_micro,vit_micro,vit_micro]"],
            "at most 4",
        ),
        (["model=resnet18", "+model.kwargs.global_pool=''"], "does not pool"),
        (["compression.feature_kd.tiles.kind=images", "compression.feature_kd.tiles.path=EMPTY"], "no image"),
        (["compression.feature_kd.cosine_weight=0", "compression.feature_kd.smooth_l1_weight=0"], "nothing"),
        (["compression.feature_kd.tiles.kind=photos"], "compression.feature_kd.tiles.kind"),
    ],
)
def test_bad_feature_kd_settings_fail_before_work_with_one_message(make_cfg, tmp_path, overrides, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    overrides = [o.replace("EMPTY", str(empty)) for o in overrides]
    with pytest.raises(PatholiteError, match=message):
        preflight(make_cfg(*KD, *overrides))
    assert not (tmp_path / "run" / "artifacts").exists()


def test_ptq_that_needs_labels_refuses_an_encoder(make_cfg):
    with pytest.raises(ConfigError, match="mixed"):
        preflight(make_cfg("compression=feature_kd_ptq", "compression.ptq.methods=[mixed]"))


def test_an_encoder_is_pruned_and_quantization_aware_trained_toward_its_float_embeddings(make_cfg, tmp_path):
    cfg = make_cfg(
        "compression=feature_kd",
        "compression.stages=[feature_kd,prune,qat]",
        "compression.prune.importance=magnitude",
        "compression.prune.ratio=0.25",
    )
    assert run_job(cfg) == "ok"
    rows = {a["name"]: a for a in read_record(tmp_path / "run")["artifacts"]}
    assert list(rows) == ["teacher_fp32", "student_fp32", "pruned", "int8_qat"]
    assert rows["pruned"]["source"] == "student_fp32" and rows["int8_qat"]["source"] == "pruned"
    assert rows["pruned"]["cost"]["params"] < rows["student_fp32"]["cost"]["params"]
    for name in ("pruned", "int8_qat"):
        parity = rows[name]["parity"]
        assert parity["mean_cosine"] is not None and parity["mean_cosine"] > 0.5
        assert "balanced_accuracy_change_pp" in parity
    # the fine-tunes learned from the float encoder's embeddings: no labels, checkpoints of their own
    assert (tmp_path / "run" / "checkpoints" / "prune").is_dir()
    assert (tmp_path / "run" / "checkpoints" / "qat").is_dir()


def test_prune_scoring_that_needs_labels_is_refused_for_an_encoder(make_cfg):
    with pytest.raises(ConfigError, match="importance=magnitude"):
        preflight(make_cfg("compression=feature_kd", "compression.stages=[feature_kd,prune]"))


def test_a_student_carries_its_teachers_provenance_and_licence(make_cfg, tmp_path, job_cache):
    # a teacher artifact made from a (pretend) hub model: its sidecar names the hub repo and the licence
    [entry] = [p for p in (job_cache / "trained").iterdir() if p.is_dir()]
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    for f in entry.iterdir():
        if f.is_file():
            (teacher / f.name).write_bytes(f.read_bytes())
    sidecar = json.loads((teacher / "artifact.json").read_text())
    source = {"hub_id": "MahmoodLab/uni", "revision": "abc123", "license": "cc-by-nc-nd-4.0"}
    (teacher / "artifact.json").write_text(json.dumps({**sidecar, "weights_source": source}))
    cfg = make_cfg(
        "compression=feature_kd_ptq",
        "compression.ptq.methods=[dynamic]",
        f"compression.teacher.checkpoint={teacher}",
    )
    assert run_job(cfg) == "ok"
    for name in ("student_fp32", "int8_dynamic"):
        meta = json.loads((tmp_path / "run" / "artifacts" / name / "artifact.json").read_text())
        assert meta["licence"] == "cc-by-nc-nd-4.0"
        assert meta["distilled_from"][0]["weights_source"]["hub_id"] == "MahmoodLab/uni"


def test_a_sweep_over_feature_kd_and_none_is_compared_in_one_table(tmp_path):
    from tests.conftest import run_cli

    result = run_cli(
        ["-m", "debug=fast", "model=vit_micro", "logger=csv", "compression=feature_kd,none"], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [sweep] = sorted((tmp_path / "outputs" / "multiruns").glob("*/*"))
    table = (sweep / "compare" / "compare.csv").read_text().splitlines()
    header, body = table[0].split(","), table[1:]
    assert any("feature_kd" in row and "student_fp32" in row for row in body)
    assert any(row.split(",")[0] == "none" or ",none," in row for row in body)
    assert "balanced_accuracy" in header


def test_a_student_learns_from_the_tissue_tiles_of_a_folder_of_slides(make_cfg, tmp_path):
    folder = tmp_path / "cohort"
    write_synthetic_slide(folder / "a.svs", SlideSpec(768, 768, seed=1))
    tiles = "compression.feature_kd.tiles"
    cfg = make_cfg(
        *KD,
        f"{tiles}.kind=slides",
        f"{tiles}.path={folder}",
        f"{tiles}.mpp=1.0",
        f"{tiles}.tile_px=32",
        f"{tiles}.per_slide=16",
        f"{tiles}.max_tiles=null",
    )
    assert run_job(cfg) == "ok"
    [key] = (Path(cfg.paths.cache_dir) / "teacher_embeddings").glob("*/key.json")
    meta = json.loads(key.read_text())
    assert meta["key"]["tiles"]["kind"] == "slides" and meta["count"] == 16
    assert read_record(tmp_path / "run")["artifacts"][1]["name"] == "student_fp32"


def test_the_weights_digest_covers_every_tensor_of_a_cnn_and_changes_with_one():
    from patholite.pipelines.tasks.encoder_fit import weights_digest

    net = create_network({"name": "r", "family": "cnn", "timm_name": "resnet18", "kwargs": {}}, 0, 32)
    before = weights_digest(net)  # BatchNorm's 0-d num_batches_tracked included
    assert before == weights_digest(net)
    with torch.no_grad():
        net.bn1.num_batches_tracked += 1
    assert weights_digest(net) != before
