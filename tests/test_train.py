"""Whole jobs in-process: the record they write, per group option, failures, interruption and resume."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import torch

from patholite.artifacts.torch_float import load_float_artifact
from patholite.errors import DatasetError
from patholite.pipelines.stages import artifact_names
from patholite.records import COST_KEYS, QUALITY_KEYS, read_record
from patholite.train import run_job
from tests.fixtures_data import BUILDERS


def check_ok_record(run_dir: Path, class_names: list[str]) -> dict:
    record = read_record(run_dir)
    assert record["status"] == "ok", record.get("error")
    assert record["error"] is None and record["finished_at"] and record["duration_s"] > 0
    assert record["versions"]["torch"] == torch.__version__.split("+")[0] and record["versions"]["timm"]
    assert record["device"]["kind"] in ("cpu", "gpu")
    [art] = record["artifacts"]
    assert art["name"] == "fp32" and art["name"] in artifact_names()
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


def same(a, b) -> bool:
    """Exact, recursive equality of checkpoint-like values (dicts, lists, tensors, numbers)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def logged(path: Path, column: str) -> list[tuple[int, str, float]]:
    """(step, epoch, value) of the rows of a Lightning metrics.csv where ``column`` has a value."""
    with open(path, newline="") as f:
        return [(int(r["step"]), r["epoch"], float(r[column])) for r in csv.DictReader(f) if r.get(column)]


def probe(name: str, path: Path) -> list[str]:
    """Overrides adding ``tests.helpers.RecordStart``: what training starts from goes to ``path``."""
    return [
        f"+callbacks.extra.{name}._target_=tests.helpers.RecordStart",
        f"+callbacks.extra.{name}.path={path}",
    ]


def interrupt_at(step: int) -> list[str]:
    return ["+callbacks.extra.stop._target_=tests.helpers.InterruptAt", f"+callbacks.extra.stop.step={step}"]


def test_ctrl_c_leaves_interrupted_record_and_resumable_checkpoint(make_cfg, tmp_path):
    # 2 epochs of 4 steps with EMA; Ctrl-C after optimizer step 2 (mid epoch 0), then resume= continues it
    common = [
        "trainer.max_epochs=2",
        "trainer.limit_val_batches=1",
        "compression=ema",
        "bench.batch_sizes=[1]",
        "accelerator.threads=1",  # a tiny model: a second thread only adds contention on a busy machine
    ]
    with pytest.raises((SystemExit, KeyboardInterrupt)):
        run_job(make_cfg(*common, *interrupt_at(2), *probe("start", tmp_path / "fresh.pt")))
    run_dir = tmp_path / "run"
    record = read_record(run_dir)
    assert record["status"] == "interrupted" and record["artifacts"] == []
    saved = run_dir / "checkpoints" / "train" / "interrupted.ckpt"
    assert saved.is_file()
    ckpt = torch.load(saved, weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 2 and ckpt["epoch"] == 0
    cfg = make_cfg(*common, f"resume={run_dir}", *probe("start", tmp_path / "resumed.pt"))
    assert run_job(cfg) == "ok"
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    fresh = torch.load(tmp_path / "fresh.pt", weights_only=False)  # what the interrupted run started from

    # training continues from exactly what the interrupted checkpoint saved: loop counters, weights,
    # AdamW's moments, the LR schedule's position and the EMA average
    assert (resumed["global_step"], resumed["epoch"]) == (2, 0)
    assert same(resumed["state_dict"], ckpt["state_dict"])
    assert len(ckpt["optimizer_states"][0]["state"]) > 0
    assert same(resumed["optimizer_states"], ckpt["optimizer_states"])
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 2
    assert same(resumed["lr_schedulers"], ckpt["lr_schedulers"])
    assert same(resumed["ema_state_dict"], ckpt["ema_state_dict"])
    # ... and none of that is what a fresh start looks like (the checks above would fail for one)
    assert (fresh["global_step"], fresh["optimizer_states"][0]["state"]) == (0, {})
    assert fresh["lr_schedulers"][0]["last_epoch"] == 0
    assert not same(fresh["state_dict"], ckpt["state_dict"])
    assert not same(fresh["ema_state_dict"], ckpt["ema_state_dict"])
    # the saved average is an average, not a copy of the raw weights (an EMA mix-up would show)
    raw = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items()}
    assert not same(raw, ckpt["ema_state_dict"]) and raw.keys() == ckpt["ema_state_dict"].keys()

    # the logs: the interrupted run's is kept; the resumed one's first training step follows the interrupted
    # step (Lightning logs optimizer step n at step n - 1) and steps run on without gap or repeat to the end
    first_log, resumed_log = run_dir / "csv" / "metrics.csv", run_dir / "csv" / "resume-1" / "metrics.csv"
    first_lrs, resumed_lrs = logged(first_log, "lr-AdamW/pg1"), logged(resumed_log, "lr-AdamW/pg1")
    assert [step for step, _, _ in first_lrs] == [0, 1]
    assert [step for step, _, _ in resumed_lrs] == [2, 3, 4, 5, 6, 7]
    assert logged(first_log, "train/loss_step")[0][0] == 0  # a fresh run logs from step 0
    # the rest of epoch 0 (optimizer steps 3 and 4 of 8), then epoch 1
    train = [(step, epoch) for step, epoch, _ in logged(resumed_log, "train/loss_step")]
    assert train == [(2, "0"), (3, "0"), (4, "1"), (5, "1"), (6, "1"), (7, "1")], train
    # the first resumed step ran at the learning rate the schedule had reached, not the warm-up's first one
    assert resumed_lrs[0][2] == pytest.approx(ckpt["lr_schedulers"][0]["_last_lr"][0])
    assert resumed_lrs[0][2] > 2 * first_lrs[0][2]
    last = torch.load(run_dir / "checkpoints" / "train" / "last.ckpt", weights_only=True, map_location="cpu")
    assert (last["global_step"], last["epoch"]) == (8, 1)


def test_a_new_run_does_not_silently_continue_an_interrupted_one(make_cfg, tmp_path):
    from patholite.errors import CheckpointError

    common = ["trainer.max_epochs=2", "trainer.limit_val_batches=1", "accelerator.threads=1"]
    with pytest.raises((SystemExit, KeyboardInterrupt)):
        run_job(make_cfg(*common, *interrupt_at(2)))
    # the same command without resume= in the same directory: Lightning alone would restore interrupted.ckpt
    # (fit(ckpt_path=None) means "last" beside OnExceptionCheckpoint) and train on from step 2 unannounced
    with pytest.raises(SystemExit) as exit_info:
        run_job(make_cfg(*common, *probe("start", tmp_path / "second.pt")))
    error = exit_info.value.__cause__
    assert isinstance(error, CheckpointError) and f"resume={tmp_path / 'run'}" in str(error)
    assert not (tmp_path / "second.pt").exists()  # it never trained


# tiny SMT slides: 2 per split (one lesion-free), 1024 px, so generating them takes a few seconds
SMT_TINY = [
    "debug=fast", "logger=csv", "model=smt_micro", "dataset=smt_synthetic", "dataset.width=1024",
    "dataset.height=1024", "dataset.lesion_diameter_um=[40.0,80.0]", "dataset.slides_per_split=[2,2,2]",
    "dataset.batch_size=1", "accelerator.threads=1",
]  # fmt: skip


def test_smt_resume_restores_the_focusing_memory(make_cfg, tmp_path):
    # 2 train slides, 1 per batch, 2 optimisers: 4 optimizer steps an epoch; stop after epoch 1's first batch
    common = [*SMT_TINY, "trainer.max_epochs=2"]
    with pytest.raises((SystemExit, KeyboardInterrupt)):
        run_job(make_cfg(*common, *interrupt_at(6), *probe("start", tmp_path / "fresh.pt"), fast=False))
    run_dir = tmp_path / "run"
    ckpt = torch.load(run_dir / "checkpoints" / "train" / "interrupted.ckpt", weights_only=True)
    assert (ckpt["global_step"], ckpt["epoch"]) == (6, 1)
    memory = ckpt["smt_focus_memory"]
    # the memory holds both slides' thumbnails and deeper patches; one slide was already folded in at epoch 1
    assert len(memory["keys"]) >= 6 and sorted(set(memory["epochs"].tolist())) == [0, 1]
    assert memory["scores"].abs().sum() > 0
    resume = make_cfg(*common, f"resume={run_dir}", *probe("start", tmp_path / "resumed.pt"), fast=False)
    assert run_job(resume) == "ok"
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    fresh = torch.load(tmp_path / "fresh.pt", weights_only=False)
    assert (resumed["global_step"], resumed["epoch"]) == (6, 1)
    assert same(resumed["smt_focus_memory"], memory)  # keys, scores and the epoch each was last updated
    assert resumed["smt_trained_depth"] == ckpt["smt_trained_depth"] == 3
    assert same(resumed["state_dict"], ckpt["state_dict"])
    assert same(resumed["optimizer_states"], ckpt["optimizer_states"])  # both SGDs' momentum buffers
    assert len(ckpt["optimizer_states"]) == 2 and all(o["state"] for o in ckpt["optimizer_states"])
    # a fresh start has an empty memory and other weights
    assert fresh["global_step"] == 0 and fresh["smt_focus_memory"]["keys"] == []
    assert not same(fresh["state_dict"], ckpt["state_dict"])
    assert read_record(run_dir)["status"] == "ok"


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
    record = json.loads(text)
    assert record["schema_version"] == 2 and record["entry"] == "train"
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

    # this process's peak grows by 400 MB of touched memory, so the assertion below does not depend on how
    # much other tests (or this training) happened to allocate here
    ballast = torch.ones(100 * 2**20)
    assert run_job(make_cfg("bench.isolation=child")) == "ok"
    del ballast
    art = read_record(tmp_path / "run")["artifacts"][0]
    memory = art["cost"]["memory"]
    assert memory["method"] == "child" and memory["batch"] == 4  # debug=fast's largest batch
    assert art["cost"]["timing"]["method"] == "child_alternating"  # latency timed in a fresh process too
    assert 0 < memory["rss_after_imports_mb"] < art["cost"]["peak_rss_mb"]
    assert art["cost"]["peak_rss_mb"] < peak_rss_mb() - 100  # not this (training) process's peak
    assert "error" in measure_in_child(tmp_path / "nowhere", 1, 1, 32)  # a broken artifact is reported
