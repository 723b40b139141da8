"""Compression options end to end: stages, cache of trained starting points, records, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from patholite.artifacts.load import load_artifact
from patholite.errors import ConfigError
from patholite.pipelines.preflight import preflight
from patholite.records import read_record
from patholite.train import run_job
from tests.conftest import run_cli

OPTIONS = {
    # option: the artifacts its record must hold, in order
    "none": ["fp32"],
    "ema": ["fp32", "fp32_ema"],
    "kd": ["teacher_fp32", "student_fp32"],
    "kd_ema": ["teacher_fp32", "student_fp32", "student_fp32_ema"],
    "ptq": ["fp32", "int8_dynamic"],
    "kd_ema_ptq": ["teacher_fp32", "student_fp32", "student_fp32_ema", "int8_dynamic"],
    "qat": ["fp32", "int8_qat"],
    "prune": ["fp32", "pruned"],
    "lowrank": ["fp32", "lowrank"],
    "pdq": ["fp32", "pruned", "int8_mixed"],
}


def names(record: dict) -> list[str]:
    return [a["name"] for a in record["artifacts"]]


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_option_runs_and_records_its_artifacts_against_their_sources(make_cfg, tmp_path, option):
    assert run_job(make_cfg(f"compression={option}")) == "ok"
    record = read_record(tmp_path / "run")
    assert record["status"] == "ok" and names(record) == OPTIONS[option]
    by_name = {a["name"]: a for a in record["artifacts"]}
    for art in record["artifacts"][1:]:
        # every derived artifact names its source, and its parity was measured on the same test images
        assert art["source"] in by_name, art["name"]
        assert art["parity"]["against"] == art["source"]
        assert art["parity"]["n_samples"] == art["quality"]["n_samples"] > 0
        assert 0 <= art["parity"]["flip_rate"] <= 1
    for art in record["artifacts"]:
        low, high = art["quality"]["accuracy_ci95"]
        assert low <= art["quality"]["accuracy"] <= high
        # params and FLOPs are those of the architecture, also for packed INT8 and ONNX artifacts
        assert art["cost"]["params"] > 1000 and art["cost"]["flops"] > 0


@pytest.mark.parametrize(
    "overrides",
    [
        ["compression.kd.kind=hard"],
        ["compression.kd.levels=[logits,attention,features]", "compression.kd.entropy_weight=1.0"],
        ["model=deit_tiny_distilled", "compression.kd.kind=token"],
    ],
)
def test_distillation_sub_modes_train_a_student(make_cfg, tmp_path, overrides):
    assert run_job(make_cfg("compression=kd", *overrides)) == "ok"
    teacher, student = read_record(tmp_path / "run")["artifacts"]
    assert (teacher["model"], student["source"]) == ("vit_micro", "teacher_fp32")
    net, meta = load_artifact(student["path"])  # the student alone: no teacher, no projections inside
    assert meta["model"]["name"] == student["model"]
    assert not any("proj" in k and k.startswith("projections") for k in net.state_dict())


def test_onnx_export_of_a_pruned_model_matches_pytorch(make_cfg, tmp_path):
    cfg = make_cfg("compression=prune", "compression.export.onnx=true")
    assert run_job(cfg) == "ok"
    arts = read_record(tmp_path / "run")["artifacts"]
    assert [a["name"] for a in arts] == ["fp32", "pruned", "onnx_fp32"]
    onnx = arts[2]
    assert onnx["source"] == "pruned" and onnx["parity"]["flip_rate"] == 0.0
    assert onnx["parity"]["max_abs_logit_diff"] <= 1e-3
    assert onnx["cost"]["params"] == arts[1]["cost"]["params"]  # counted on the pruned float twin


def test_int8_artifacts_reload_and_reproduce_their_recorded_accuracy(make_cfg, tmp_path):
    cfg = make_cfg("compression=ptq", "compression.ptq.methods=[dynamic,dynamic_ort,static_ort,mixed]")
    assert run_job(cfg) == "ok"
    record = read_record(tmp_path / "run")
    assert names(record) == ["fp32", "int8_dynamic", "int8_dynamic_ort", "int8_static_ort", "int8_mixed"]
    from patholite.data import build_datamodule
    from patholite.measure.evaluate import evaluate_quality

    dm = build_datamodule(cfg.dataset)
    dm.setup()
    fp32_size = record["artifacts"][0]["cost"]["size_bytes"]
    for art in record["artifacts"][1:]:
        net, meta = load_artifact(art["path"])
        again = evaluate_quality(net, dm.test_dataloader(), meta["class_names"])
        assert again["confusion_matrix"] == art["quality"]["confusion_matrix"], art["name"]
        assert art["cost"]["size_bytes"] < fp32_size, art["name"]
    plan = json.loads((Path(record["artifacts"][4]["path"]) / "plan.json").read_text())
    assert plan["accuracy_drop_pp"] <= cfg.compression.ptq.budget_pp
    from patholite.compress.quantize import int8_layer_names

    assert set(int8_layer_names(net)) == set(plan["int8_layers"])  # exactly the planned layers run in INT8


@pytest.mark.slow  # 17 s: make test stays under its 8 minutes
def test_a_runs_artifacts_are_timed_together_in_one_child(make_cfg, tmp_path):
    assert run_job(make_cfg("compression=ptq", "bench.isolation=child")) == "ok"
    fp32, int8 = read_record(tmp_path / "run")["artifacts"]
    for art in (fp32, int8):
        timing = art["cost"]["timing"]
        assert timing["method"] == "child_alternating" and timing["timed_with"] == ["fp32", "int8_dynamic"]
        assert set(art["cost"]["latency_ms"]) == {"1", "4"}
    assert fp32["cost"]["timing"]["ratio_to_baseline"]["4"]["median"] == 1.0
    ratio = int8["cost"]["timing"]["ratio_to_baseline"]["4"]
    assert ratio["min"] <= ratio["median"] <= ratio["max"] and ratio["median"] > 0


def test_pruned_network_is_smaller_and_reloads_as_such(make_cfg, tmp_path):
    assert run_job(make_cfg("compression=prune", "compression.prune.ratio=0.5")) == "ok"
    fp32, pruned = read_record(tmp_path / "run")["artifacts"]
    assert pruned["cost"]["params"] < fp32["cost"]["params"]
    assert pruned["cost"]["flops"] < fp32["cost"]["flops"]
    net, meta = load_artifact(pruned["path"])
    assert meta["surgery"][0]["op"] == "prune"
    assert sum(p.numel() for p in net.parameters()) == pruned["cost"]["params"]
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 4)


def test_none_publishes_to_the_cache_and_ptq_starts_from_it_without_training(make_cfg, tmp_path, monkeypatch):
    cache = tmp_path / "own-cache"
    assert run_job(make_cfg(f"paths.cache_dir={cache}", run_dir=tmp_path / "a")) == "ok"
    entries = [p for p in (cache / "trained").iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / "key.json").is_file()

    import patholite.pipelines.cache as cache_module

    def no_training(*args, **kwargs):
        raise AssertionError("the cached model should have been used")

    monkeypatch.setattr(cache_module, "_train_into", no_training)
    assert run_job(make_cfg(f"paths.cache_dir={cache}", "compression=ptq", run_dir=tmp_path / "b")) == "ok"
    trained = read_record(tmp_path / "a")["artifacts"][0]
    started = read_record(tmp_path / "b")["artifacts"][0]
    assert started["quality"]["confusion_matrix"] == trained["quality"]["confusion_matrix"]
    # another seed is another starting point: it has to be trained
    with pytest.raises(AssertionError, match="cached model"):
        run_job(make_cfg(f"paths.cache_dir={cache}", "compression=ptq", "seed=7", run_dir=tmp_path / "c"))


def test_cache_key_follows_what_determines_the_training(make_cfg):
    from patholite.pipelines.cache import cache_inputs, cache_key

    base = make_cfg()
    key = cache_key(cache_inputs(base, base.model))
    assert key == cache_key(cache_inputs(make_cfg("dataset.num_workers=1"), base.model))  # speed only
    # the test split's stain shift never reaches training
    assert key == cache_key(cache_inputs(make_cfg("dataset.stain_shift.rotate_deg=30"), base.model))
    for change in ("seed=1", "trainer.max_epochs=2", "optim.lr=0.01", "dataset.image_size=64",
                   "dataset.stain_norm=macenko", "model.stain=learnable"):  # fmt: skip
        other = make_cfg(change)
        assert cache_key(cache_inputs(other, other.model)) != key, change
    # options added since, unset, leave the keys of entries made before them unchanged (a sweep's cache
    # is not silently retrained after an upgrade)
    inputs = cache_inputs(base, base.model)
    assert not {"stain_norm", "stain_reference", "stain_shift"} & set(inputs["dataset"])
    assert not {"stain", "stain_vectors"} & set(inputs["model"])


def test_ema_weights_follow_the_decay():
    from patholite.compress.ema import EmaCallback

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(1, 1, bias=False)

    holder = Holder()
    callback = EmaCallback(decay=0.5, warmup=False)
    trainer = type("T", (), {"global_step": 0})()
    expected = None
    for step, value in enumerate([1.0, 3.0, 7.0], start=1):
        holder.net.weight.data.fill_(value)
        trainer.global_step = step
        callback.on_train_batch_end(trainer, holder)
        # timm: the first update copies the weights, then m = d*m + (1-d)*w
        expected = value if expected is None else 0.5 * expected + 0.5 * value
        assert callback.ema_net.weight.item() == pytest.approx(expected)
    assert expected == pytest.approx(4.5)


def test_ema_warmup_keeps_short_runs_off_the_initial_weights():
    from patholite.compress.ema import EmaCallback

    fixed = EmaCallback(decay=0.999, warmup=False)
    warm = EmaCallback(decay=0.999, warmup=True)
    for cb in (fixed, warm):
        cb._ensure(type("M", (), {"net": nn.Linear(1, 1)})())
    # after 300 steps the fixed decay still weighs the start 0.999**300 = 74%; the warm-up decay is lower
    assert fixed.ema.get_decay(300) == 0.999 and warm.ema.get_decay(300) < 0.99


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["compression=prune", "compression.prune.ratio=1.5"], "compression.prune.ratio"),
        (["compression=prune", "compression.prune.ratio=null"], "exactly one of ratio"),
        (
            [
                "compression=ptq",
                "compression.ptq.methods=[static_ort]",
                "compression.ptq.calibration_images=0",
            ],
            "calibration",
        ),
        (["compression=ptq", "compression.ptq.methods=[fancy]"], "compression.ptq.methods"),
        (["compression=kd", "compression.kd.alpha=2"], "compression.kd.alpha"),
        (
            ["compression=kd", "compression.teacher.checkpoint=/nonexistent/teacher.safetensors"],
            "compression.teacher.checkpoint",
        ),
        (["compression=kd", "compression.teacher.model=no_such_model"], "compression.teacher.model"),
        (["compression=kd", "compression.kd.kind=token"], "distillation token"),
        (["compression=prune", "model=resnet18"], "Vision Transformers"),
        (["compression=kd_ema", "compression.ema.decay=1.5"], "compression.ema.decay"),
        (["compression.stages=[ptq,start]"], "must start with"),
        (["compression.stages=[start,lowrank,prune]"], "prune must come before lowrank"),
    ],
)
def test_bad_compression_input_fails_before_any_work(make_cfg, overrides, message):
    from patholite.pipelines.preflight import preflight

    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        preflight(make_cfg(*overrides))


def test_teacher_with_another_class_count_is_refused(make_cfg, tmp_path):
    from safetensors.torch import save_file

    from patholite.models.factory import create_network
    from patholite.pipelines.preflight import preflight

    cfg = make_cfg()
    teacher = create_network(cfg.model, 7, 32)  # a 7-class teacher for 4-class data
    path = tmp_path / "teacher.safetensors"
    save_file(teacher.state_dict(), str(path))
    with pytest.raises(ConfigError, match=r"compression.teacher.checkpoint=.*7-class head.*4 classes"):
        preflight(make_cfg("compression=kd", f"compression.teacher.checkpoint={path}"))


def test_a_trained_run_is_a_teacher_as_it_stands(make_cfg, tmp_path, monkeypatch):
    import patholite.pipelines.cache as cache_module

    cache = tmp_path / "own-cache"
    teacher_run = tmp_path / "teacher"
    assert run_job(make_cfg(f"paths.cache_dir={cache}", "compression=ema", run_dir=teacher_run)) == "ok"

    def no_training(*args, **kwargs):
        raise AssertionError("the teacher comes from the run: nothing to train")

    monkeypatch.setattr(cache_module, "_train_into", no_training)
    kd = ("compression=kd", f"compression.teacher.checkpoint={teacher_run}", f"paths.cache_dir={cache}")
    assert run_job(make_cfg(*kd, run_dir=tmp_path / "student")) == "ok"
    teacher = read_record(tmp_path / "student")["artifacts"][0]
    final = read_record(teacher_run)["artifacts"][-1]  # the run's own final float model: fp32_ema
    assert (teacher["name"], final["name"]) == ("teacher_fp32", "fp32_ema")
    assert teacher["quality"]["confusion_matrix"] == final["quality"]["confusion_matrix"]
    with pytest.raises(ConfigError, match=r"takes 32-px images, the student 16-px ones"):
        preflight(make_cfg(*kd, "dataset.image_size=16", run_dir=tmp_path / "small"))
    with pytest.raises(ConfigError, match=r"does not exist; give a trained teacher.s weights file"):
        preflight(make_cfg("compression=kd", f"compression.teacher.checkpoint={tmp_path / 'nothing'}"))


def test_qat_on_a_non_cpu_accelerator_is_refused(make_cfg):
    from patholite.accelerators.resolve import resolve_accelerator
    from patholite.pipelines.stages import check_stages
    from patholite.pipelines.tasks import task_for

    cfg = make_cfg("compression=qat")
    accel = resolve_accelerator(cfg.accelerator)
    accel.device = torch.device("cuda")  # as resolved on a GPU machine
    with pytest.raises(ConfigError, match="accelerator=cpu"):
        check_stages(cfg, task_for(cfg.model), accel)


def test_a_run_interrupted_between_stages_resumes_without_redoing_them(make_cfg, tmp_path, monkeypatch):
    import patholite.pipelines.stages.ptq as ptq
    import patholite.pipelines.tasks.tiles as tiles

    calls = []
    real_ptq = ptq.METHODS["dynamic"]

    def interrupted(run, src):
        calls.append("ptq")
        raise KeyboardInterrupt

    monkeypatch.setitem(ptq.METHODS, "dynamic", ptq.Method("int8_dynamic", interrupted))
    cfg = make_cfg("compression=kd_ema_ptq")
    with pytest.raises(KeyboardInterrupt):
        run_job(cfg)
    run_dir = tmp_path / "run"
    assert read_record(run_dir)["status"] == "interrupted"
    state = json.loads((run_dir / "stages" / "state.json").read_text())
    assert state["done"] == ["distill"]

    def no_training(*args, **kwargs):
        raise AssertionError("distillation finished before the interruption; it must not run again")

    monkeypatch.setattr(tiles, "fit", no_training)
    monkeypatch.setitem(ptq.METHODS, "dynamic", real_ptq)
    assert run_job(make_cfg("compression=kd_ema_ptq", f"resume={run_dir}")) == "ok"
    record = read_record(run_dir)
    assert names(record) == OPTIONS["kd_ema_ptq"] and calls == ["ptq"]


@pytest.mark.slow
def test_compression_sweep_in_a_subprocess_writes_one_record_per_job(tmp_path):
    options = ",".join(sorted(OPTIONS))
    result = run_cli(
        [
            "-m",
            "debug=fast",
            "model=vit_micro",
            "logger=csv",
            f"compression={options}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(sweep["jobs"]) == len(OPTIONS)
    rows = (tmp_path / "sweep" / "compare" / "compare.csv").read_text().splitlines()
    assert len(rows) - 1 == sum(len(v) for v in OPTIONS.values())


def test_a_stage_does_not_depend_on_whether_its_teacher_was_cached(make_cfg, tmp_path):
    cache = tmp_path / "own-cache"
    first = make_cfg("compression=kd", f"paths.cache_dir={cache}", run_dir=tmp_path / "a")  # trains teacher
    assert run_job(first) == "ok"
    again = make_cfg("compression=kd", f"paths.cache_dir={cache}", run_dir=tmp_path / "b")  # cached teacher
    assert run_job(again) == "ok"
    a, b = (load_artifact(read_record(tmp_path / r)["artifacts"][1]["path"])[0] for r in ("a", "b"))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_a_teacher_trained_for_a_student_is_the_one_compression_none_trains(make_cfg, tmp_path):
    # The distill stage initialises its student before it trains a missing teacher; the cache entry must
    # still be what the plain recipe makes of its key, whichever job asked for it first.
    kd = make_cfg("compression=kd", f"paths.cache_dir={tmp_path / 'kd-cache'}", run_dir=tmp_path / "kd")
    assert run_job(kd) == "ok"
    plain = make_cfg(f"paths.cache_dir={tmp_path / 'plain-cache'}", run_dir=tmp_path / "plain")
    assert run_job(plain) == "ok"
    teacher = read_record(tmp_path / "kd")["artifacts"][0]
    trained = read_record(tmp_path / "plain")["artifacts"][0]
    assert teacher["name"] == "teacher_fp32" and trained["name"] == "fp32"
    a, b = (load_artifact(row["path"])[0] for row in (teacher, trained))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
