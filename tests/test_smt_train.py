"""``python -m patholite.train model=smt``: a tiny SMT trains on tiny synthetic slides, is recorded per slide,
and its dynamic-INT8 twin runs too."""

from __future__ import annotations

import json

import pytest
import torch

from patholite.errors import CheckpointError, ConfigError
from patholite.pipelines.preflight import check_run

from .conftest import compose_config, run_cli

TINY_SLIDES = [
    "dataset=smt_synthetic",
    "dataset.width=2048",
    "dataset.height=2048",
    "dataset.slides_per_split=[4,2,2]",
]


def train_tiny(tmp_path, *overrides: str):
    """``python -m patholite.train model=smt_micro`` on the tiny slides; returns the run folder."""
    run = tmp_path / "run"
    result = run_cli(
        ["model=smt_micro", *TINY_SLIDES, "debug=fast", "logger=csv", *overrides,
         f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}"],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_a_tiny_smt_trains_and_is_recorded_per_slide(tmp_path):
    run = train_tiny(tmp_path, "trainer.max_epochs=2", "compression=ptq", "model.smt.start_epochs=[0,1,1]")
    record = json.loads((run / "metrics.json").read_text())
    assert record["status"] == "ok"
    fp32, int8 = record["artifacts"]
    assert (fp32["name"], int8["name"], int8["source"]) == ("smt_fp32", "smt_int8_dynamic", "smt_fp32")
    k = 2  # smt_micro: top_k 2, three layers
    for artifact in (fp32, int8):
        per_slide = artifact["cost"]["protocol"]["per_slide"]
        assert per_slide["n_slides"] == 2 == artifact["quality"]["n_samples"]  # the test slides
        assert [s["reads"] for s in per_slide["slides"]] == [1 + k + k * k] * 2
        assert all(s["read_s"] + s["model_s"] <= s["wall_s"] * 1.01 for s in per_slide["slides"])
        assert artifact["cost"]["latency_ms"]["slide"]["p50"] > 0
    assert int8["cost"]["size_bytes"] < fp32["cost"]["size_bytes"]
    assert int8["parity"]["against"] == "smt_fp32"

    sidecar = json.loads((run / "artifacts" / "smt_fp32" / "artifact.json").read_text())
    assert sidecar["slide_model"] is True and sidecar["negative_class"] == "Normal"
    assert sidecar["class_names"] == ["Normal", "Tumor"] and sidecar["model"]["family"] == "smt"
    # the focusing memory (temporal ensembling) travels in the checkpoint, so a resumed run continues it
    last = run / "checkpoints" / "train" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert len(checkpoint["smt_focus_memory"]["keys"]) >= 4  # the training slides' thumbnails, at least
    # layers 2 and 3 joined at epoch 1: the restored best is from an epoch where every layer trained
    assert [p.name for p in (run / "checkpoints" / "train").glob("best-*")] == ["best-epoch=001.ckpt"]


# two SMT trainings (16 s): make test stays under its 8 minutes
@pytest.mark.slow
def test_an_smt_student_distils_from_a_float_smt_teacher(tmp_path):
    run = train_tiny(tmp_path, "compression=kd", "compression.teacher.model=smt_micro")
    record = json.loads((run / "metrics.json").read_text())
    names = [(a["name"], a["source"]) for a in record["artifacts"]]
    assert names == [("teacher_fp32", None), ("student_fp32", "teacher_fp32")]
    assert record["artifacts"][1]["parity"]["against"] == "teacher_fp32"
    # the student's distillation term was logged per layer: the teacher scored the student's images
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/kd_0" in header and "train/kd_1" in header


@pytest.mark.slow  # 27 s; SMT INT8 by PTQ stays (test_a_tiny_smt_trains_and_is_recorded_per_slide)
def test_qat_fine_tunes_an_smt_for_dynamic_int8(tmp_path):
    from torch.ao.nn.quantized import dynamic as nnqd

    from patholite.artifacts.load import load_artifact
    from patholite.compress.quantize import quantize_dynamic_int8

    run = train_tiny(tmp_path, "compression=qat", "compression.qat.finetune.epochs=1")
    record = json.loads((run / "metrics.json").read_text())
    names = [(a["name"], a["source"]) for a in record["artifacts"]]
    assert names == [("smt_fp32", None), ("smt_int8_qat", "smt_fp32")]
    qat = record["artifacts"][1]
    assert [s["reads"] for s in qat["cost"]["protocol"]["per_slide"]["slides"]] == [1 + 2 + 4] * 2
    assert qat["cost"]["size_bytes"] < record["artifacts"][0]["cost"]["size_bytes"]
    assert list((run / "checkpoints" / "qat").glob("*.ckpt"))  # the fine-tuning is its own stage
    net, meta = load_artifact(run / "artifacts" / "smt_int8_qat")
    assert meta["qat"] is True and meta["slide_model"] is True
    assert any(isinstance(m, nnqd.Linear) for m in net.modules())
    # fine-tuning moved the weights: the INT8 weights are not the float model's own INT8 rounding
    fp32, _ = load_artifact(run / "artifacts" / "smt_fp32")
    ptq = quantize_dynamic_int8(fp32)
    w_ptq = ptq.encoders[2].blocks[0].attn.qkv.weight().int_repr()
    w_qat = net.encoders[2].blocks[0].attn.qkv.weight().int_repr()
    assert w_qat.shape == w_ptq.shape and not torch.equal(w_qat, w_ptq)

    # that run is a KD teacher as it stands: its float SMT (not the INT8 one it lists last), with its own
    # architecture (depth 2) under a shallower student; no teacher option needed
    student_dir = tmp_path / "student"
    student_dir.mkdir()
    student = train_tiny(
        student_dir, "compression=kd", f"compression.teacher.checkpoint={run}", "model.kwargs.depth=1"
    )
    record = json.loads((student / "metrics.json").read_text())
    teacher, distilled = record["artifacts"]
    assert (teacher["name"], distilled["name"], distilled["source"]) == ("teacher_fp32", "student_fp32",
                                                                         "teacher_fp32")  # fmt: skip
    assert teacher["model"] == "smt_micro" and teacher["quality"] == record_quality(run, "smt_fp32")
    assert distilled["cost"]["params"] < teacher["cost"]["params"]
    with pytest.raises(
        ConfigError, match=r"compression.teacher.checkpoint=.* must share model.smt.image_size"
    ):
        check_run(compose_config(
            ["model=smt_micro", *TINY_SLIDES, "compression=kd", f"compression.teacher.checkpoint={run}",
             "model.smt.image_size=32"], tmp_path, tmp_path,
        ))  # fmt: skip
    # preflight compares what needs the data: the teacher's normalisation and classes
    from patholite.pipelines.preflight import preflight

    def kd_from_run(*overrides):
        return compose_config(
            ["model=smt_micro", *TINY_SLIDES, "compression=kd", f"compression.teacher.checkpoint={run}",
             "accelerator=cpu", *overrides], student_dir, tmp_path / "cache",
        )  # fmt: skip

    with pytest.raises(ConfigError, match=r"normalises with mean .* set dataset.mean to the teacher's"):
        preflight(kd_from_run("dataset.mean=[0.5,0.5,0.5]"))
    with pytest.raises(ConfigError, match=r"was trained on classes \['Normal', 'Tumor'\]"):
        preflight(kd_from_run("dataset.slide_labels=classes"))
    with pytest.raises(CheckpointError, match="is a torch_int8_dynamic artifact; distil from a float one"):
        preflight(kd_from_run(f"compression.teacher.checkpoint={run / 'artifacts' / 'smt_int8_qat'}"))


def record_quality(run, name: str) -> dict:
    return next(
        a["quality"] for a in json.loads((run / "metrics.json").read_text())["artifacts"] if a["name"] == name
    )
