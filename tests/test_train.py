"""Whole jobs in-process: the record they write, per group option, failures, interruption and resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from patholite.artifacts.torch_float import load_float_artifact
from patholite.errors import DatasetError
from patholite.records import ARTIFACT_NAMES, COST_KEYS, QUALITY_KEYS, read_record
from patholite.train import run_job
from tests.fixtures_data import BUILDERS


def check_ok_record(run_dir: Path, class_names: list[str]) -> dict:
    record = read_record(run_dir)
    assert record["status"] == "ok", record.get("error")
    assert record["error"] is None and record["finished_at"] and record["duration_s"] > 0
    assert record["versions"]["torch"] == torch.__version__.split("+")[0] and record["versions"]["timm"]
    assert record["device"]["kind"] in ("cpu", "gpu")
    [art] = record["artifacts"]
    assert art["name"] == "fp32" and art["name"] in ARTIFACT_NAMES
    q, c = art["quality"], art["cost"]
    assert set(q) == set(QUALITY_KEYS) and set(c) == set(COST_KEYS)
    assert set(q["f1_per_class"]) == set(class_names) == set(q["recall_per_class"])
    assert 0 <= q["accuracy"] <= 1 and 0 <= q["auroc"] <= 1
    assert sum(map(sum, q["confusion_matrix"])) == q["n_samples"] > 0
    # size is the bytes of every file of the reloadable artifact
    files = [Path(art["path"]) / f for f in art["files"]]
    assert c["size_bytes"] == sum(f.stat().st_size for f in files) > 0
    assert set(c["latency_ms"]) == {str(b) for b in record["config"]["bench"]["batch_sizes"]}
    assert c["flops"] >= c["flops_fused_uncounted"] > 0  # equal for CNNs, larger where attention is fused
    return record


def test_synthetic_teacher_run_writes_a_complete_record(make_cfg, tmp_path):
    cfg = make_cfg()
    assert run_job(cfg) == "ok"
    run_dir = tmp_path / "run"
    record = check_ok_record(run_dir, ["Normal", "Benign", "InSitu", "Invasive"])
    cost = record["artifacts"][0]["cost"]
    assert cost["params"] == 207_684  # vit_micro with a 4-class head (timm's own count)
    assert cost["flops"] > cost["flops_fused_uncounted"]  # attention counted only when unfused
    assert (run_dir / "checkpoints" / "train" / "last.ckpt").is_file()
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    # validation is logged every epoch; the test split is evaluated once, on the reloaded artifact (record)
    assert {"val/macro_f1", "val/f1/InSitu", "val/recall/Invasive"} <= set(header)
    assert not any(key.startswith("test/") for key in header)
    assert record["config"]["model"]["name"] == "vit_micro"  # the resolved config is stored
    # the artifact reloads from its files alone and reproduces the recorded quality
    net, meta = load_float_artifact(record["artifacts"][0]["path"])
    assert meta["class_names"] == ["Normal", "Benign", "InSitu", "Invasive"] and meta["image_size"] == 32
    from patholite.data import build_datamodule
    from patholite.measure.evaluate import evaluate_quality

    dm = build_datamodule(cfg.dataset)
    dm.setup()
    again = evaluate_quality(net, dm.test_dataloader(), meta["class_names"])
    assert again["confusion_matrix"] == record["artifacts"][0]["quality"]["confusion_matrix"]
    assert again["accuracy"] == pytest.approx(record["artifacts"][0]["quality"]["accuracy"])


def test_checkpoints_load_with_weights_only(make_cfg, tmp_path):
    run_job(make_cfg())
    ckpt = torch.load(
        tmp_path / "run" / "checkpoints" / "train" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert ckpt["hyper_parameters"]["model"]["name"] == "vit_micro"
    assert isinstance(ckpt["hyper_parameters"]["optim"], dict)


@pytest.mark.parametrize(
    "overrides,effect",
    [
        (["model=deit_tiny"], {"model": "deit_tiny"}),
        (["model=resnet18"], {"model": "resnet18"}),
        (["model=mobilenetv3_large"], {"model": "mobilenetv3_large"}),
        (["model=convnext_tiny"], {"model": "convnext_tiny"}),
        (["model=vit_mini", "model.pyramid.enabled=true"], {"model": "vit_mini", "pyramid": True}),
        (["accelerator=auto"], {"note": "auto picked"}),
        (["logger=none"], {"no_logs": True}),
        (["callbacks.progress_bar=rich"], {}),
        (["callbacks.progress_bar=tqdm"], {}),
        (["experiment=demo"], {"tags": ["demo"]}),  # model=vit_micro from the command line wins
    ],
    ids=lambda o: " ".join(o) if isinstance(o, list) else "",
)
def test_options_run_and_take_effect(make_cfg, tmp_path, overrides, effect):
    assert run_job(make_cfg(*overrides)) == "ok"
    run_dir = tmp_path / "run"
    record = check_ok_record(run_dir, ["Normal", "Benign", "InSitu", "Invasive"])
    if "model" in effect:
        assert record["config"]["model"]["name"] == effect["model"]
    if effect.get("pyramid"):
        _, meta = load_float_artifact(record["artifacts"][0]["path"])
        assert meta["model"]["pyramid"]["enabled"] is True
        from patholite.models.factory import create_network

        plain = sum(p.numel() for p in create_network({**meta["model"], "pyramid": None}, 4, 32).parameters())
        # the ViT's 128->4 head is replaced by a 3x128->4 head over three layer-normed scales
        expected = plain - (128 * 4 + 4) + (3 * 128 * 4 + 4) + 3 * 2 * 128
        assert record["artifacts"][0]["cost"]["params"] == expected
    if "note" in effect:
        assert any(effect["note"] in n for n in record["device"]["notes"])
    if effect.get("no_logs"):
        assert not (run_dir / "csv").exists() and not (run_dir / "wandb").exists()
    if "tags" in effect:
        assert record["config"]["tags"] == effect["tags"]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_each_real_loader_trains_on_its_fixture(make_cfg, tmp_path, name):
    root = BUILDERS[name](tmp_path / "data" / name)
    cfg = make_cfg(f"dataset={name}", f"dataset.root={root}", "dataset.max_samples_per_split=null")
    assert run_job(cfg) == "ok"
    record = read_record(tmp_path / "run")
    from patholite.data import build_datamodule

    names = build_datamodule(cfg.dataset).class_names
    check_ok_record(tmp_path / "run", names)
    assert record["artifacts"][0]["quality"]["n_samples"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("model", ["deit_small", "deit_base"])
def test_large_models_run(make_cfg, tmp_path, model):
    assert run_job(make_cfg(f"model={model}")) == "ok"


def test_wandb_logger_makes_one_offline_run_with_the_record(make_cfg, tmp_path):
    assert run_job(make_cfg("logger=wandb")) == "ok"
    record = read_record(tmp_path / "run")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and record["wandb"]["mode"] == "offline"
    assert record["wandb"]["run_id"] in runs[0].name
    # offline runs keep everything in one protobuf log: the resolved config and the record's summary are in it
    [log] = runs[0].glob("run-*.wandb")
    # wandb-core (a separate process) writes the file; under load its last flush can trail finish() briefly
    deadline = time.monotonic() + 30
    while b"fp32/latency_p50_ms_b1" not in (data := log.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b"vit_micro" in data and b"max_samples_per_split" in data
    assert b"fp32/accuracy" in data and b"fp32/latency_p50_ms_b1" in data
    import wandb

    assert wandb.run is None  # closed at the end of the job


def test_failed_job_writes_failed_record_and_exits(make_cfg, tmp_path, capsys):
    cfg = make_cfg("dataset=bach", f"dataset.root={tmp_path / 'nowhere'}")
    with pytest.raises(SystemExit) as exit_info:
        run_job(cfg)
    assert exit_info.value.code == 1 and isinstance(exit_info.value.__cause__, DatasetError)
    assert "patholite: DatasetError: dataset=bach" in capsys.readouterr().err
    record = read_record(tmp_path / "run")
    assert record["status"] == "failed" and record["error"].startswith("DatasetError")
    assert record["artifacts"] == []


def test_ctrl_c_leaves_interrupted_record_and_resumable_checkpoint(make_cfg, tmp_path):
    interrupt = [
        "+callbacks.extra.stop._target_=tests.helpers.InterruptAt",
        "+callbacks.extra.stop.step=2",
        "trainer.max_epochs=2",
        "trainer.limit_val_batches=1",
    ]
    with pytest.raises((SystemExit, KeyboardInterrupt)):
        run_job(make_cfg(*interrupt))
    run_dir = tmp_path / "run"
    record = read_record(run_dir)
    assert record["status"] == "interrupted" and record["artifacts"] == []
    saved = run_dir / "checkpoints" / "train" / "interrupted.ckpt"
    assert saved.is_file()
    assert torch.load(saved, weights_only=True, map_location="cpu")["global_step"] == 2
    # resume continues in the same directory from the interrupted step and finishes
    cfg = make_cfg("trainer.max_epochs=2", "trainer.limit_val_batches=1", f"resume={run_dir}")
    assert run_job(cfg) == "ok"
    assert (run_dir / "csv" / "metrics.csv").is_file()  # the interrupted run's log is kept
    assert (run_dir / "csv" / "resume-1" / "metrics.csv").is_file()
    last = torch.load(run_dir / "checkpoints" / "train" / "last.ckpt", weights_only=True, map_location="cpu")
    assert (last["global_step"], last["epoch"]) == (8, 1), (
        last["global_step"],
        last["epoch"],
        last["loops"]["fit_loop"]["epoch_progress"],
    )


def test_resume_refuses_a_finished_run(make_cfg, tmp_path):
    from patholite.errors import ConfigError

    assert run_job(make_cfg()) == "ok"
    with pytest.raises(SystemExit) as exit_info:
        run_job(make_cfg(f"resume={tmp_path / 'run'}"))
    assert isinstance(exit_info.value.__cause__, ConfigError)
    assert "finished ok" in str(exit_info.value.__cause__) and "rerun=" in str(exit_info.value.__cause__)


def test_resume_without_checkpoint_fails_clearly(make_cfg, tmp_path):
    from patholite.errors import CheckpointError

    with pytest.raises(SystemExit) as exit_info:
        run_job(make_cfg(f"resume={tmp_path / 'run'}"))
    assert isinstance(exit_info.value.__cause__, CheckpointError)
    assert "no last.ckpt or interrupted.ckpt" in str(exit_info.value.__cause__)


def test_record_json_is_valid_and_complete_on_disk(make_cfg, tmp_path):
    run_job(make_cfg())
    text = (tmp_path / "run" / "metrics.json").read_text()
    assert json.loads(text)["schema_version"] == 1
    assert not list((tmp_path / "run").glob(".metrics.json.*"))  # no temp files left behind


def test_last_checkpoint_follows_every_epoch_even_without_improvement(make_cfg, tmp_path):
    # a vanishing learning rate: epoch 2's metric cannot beat epoch 1's, so no new "best" is written
    assert run_job(make_cfg("trainer.max_epochs=2", "optim.lr=1e-12")) == "ok"
    checkpoints = tmp_path / "run" / "checkpoints" / "train"
    last = torch.load(checkpoints / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["epoch"] == 1 and last["global_step"] == 8
    assert [p.name for p in checkpoints.glob("best-*.ckpt")] == ["best-epoch=000.ckpt"]


def test_thread_settings_apply_to_their_job_only(make_cfg, tmp_path):
    before = torch.get_num_threads()
    assert run_job(make_cfg("accelerator.threads=1", "bench.threads=1")) == "ok"
    assert read_record(tmp_path / "run")["artifacts"][0]["cost"]["threads"] == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    "experiment,dataset,extra",
    [("r2_isic_teacher", "isic2018", []), ("r1_bach_teacher", "bach", ["dataset.tile_size=32"])],
)
def test_research_presets_run_on_fixtures(make_cfg, tmp_path, experiment, dataset, extra):
    root = BUILDERS[dataset](tmp_path / "data" / dataset)
    cfg = make_cfg(
        f"experiment={experiment}",
        f"dataset.root={root}",
        "dataset.max_samples_per_split=null",
        "dataset.num_workers=0",
        *extra,
    )
    assert cfg.dataset.name == dataset
    assert run_job(cfg) == "ok"
    record = read_record(tmp_path / "run")
    assert set(record["config"]["tags"]) >= {"teacher"}
    if experiment.startswith("r1"):
        assert (
            record["config"]["model"]["pyramid"]["enabled"] and record["config"]["dataset"]["mode"] == "tile"
        )


def test_isolated_cost_comes_from_fresh_children(make_cfg, tmp_path):
    from patholite.measure.cost import peak_rss_mb
    from patholite.measure.memory import measure_in_child

    assert run_job(make_cfg("bench.isolation=child")) == "ok"
    art = read_record(tmp_path / "run")["artifacts"][0]
    memory = art["cost"]["memory"]
    assert memory["method"] == "child" and memory["batch"] == 4  # debug=fast's largest batch
    assert art["cost"]["timing"]["method"] == "child_alternating"  # latency timed in a fresh process too
    assert 0 < memory["rss_after_imports_mb"] < art["cost"]["peak_rss_mb"]
    assert art["cost"]["peak_rss_mb"] < peak_rss_mb() - 100  # not this (training) process's peak
    assert "error" in measure_in_child(tmp_path / "nowhere", 1, 1, 32)  # a broken artifact is reported
