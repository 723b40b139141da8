"""A sweep timed as one: distinct artifacts (by content) timed together in one child, the comparison and plot
reading the retimed figures, labels that do not overlap, and the CLI's bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import patholite.measure.retime as retime_module
import patholite.measure.timing as timing
from patholite.compare import main
from patholite.measure.compare import Comparison, apply_retimed, compare, find_records
from patholite.measure.outputs import pareto_figure
from patholite.measure.retime import RETIMED_FILE, collect, retime
from patholite.records import ArtifactRecord
from tests.test_compare import cost, quality, write_job


def float_artifact(trained_models: Path) -> Path:
    """The shared plainly trained vit_micro's float artifact (read only: tests copy it)."""
    found = sorted(p.parent for p in trained_models.glob("*/artifact.json"))
    assert found, f"no float artifact in {trained_models}"
    return found[0]


def copy_artifact(source: Path, to: Path, perturb: bool = False) -> Path:
    shutil.copytree(source, to)
    if perturb:  # other weights: another artifact content of the same architecture
        weights = to / "model.safetensors"
        state = load_file(str(weights))
        name = next(k for k, v in state.items() if v.is_floating_point())
        state[name] = state[name] + 0.01
        save_file(state, str(weights))
    return to


def recorded(name: str, path: Path, acc: float, p50: float) -> ArtifactRecord:
    c = {
        **cost(1.0, {1: p50 / 4, 8: p50}),
        "protocol": {"warmup": 1, "iters": 2, "repeats": 2},
        "timing": {"method": "child_alternating"},  # each job timed its own in a child
    }
    return ArtifactRecord(
        name=name,
        path=str(path),
        files=["model.safetensors", "artifact.json"],
        quality=quality(acc),
        cost=c,
    )


@pytest.fixture
def sweep(tmp_path, trained_models) -> Path:
    """Two jobs: the plain one's fp32, and a distilled job recording a byte-identical copy of it as its
    teacher beside its own student (other weights): three rows, two artifact contents."""
    source = float_artifact(trained_models)
    sweep = tmp_path / "sweep"
    plain = copy_artifact(source, sweep / "0" / "artifacts" / "fp32")
    teacher = copy_artifact(source, sweep / "1" / "artifacts" / "teacher_fp32")
    student = copy_artifact(source, sweep / "1" / "artifacts" / "fp32", perturb=True)
    write_job(sweep, 0, "none", "vit_micro", [recorded("fp32", plain, 0.80, 2.65)])
    write_job(
        sweep,
        1,
        "kd",
        "vit_micro",
        [recorded("teacher_fp32", teacher, 0.80, 3.3), recorded("fp32", student, 0.78, 2.0)],
    )
    return sweep


def fake_timing(calls: list):
    """A stand-in for ``time_artifacts`` in tests that check what is done with its result, not the child:
    the i-th artifact at 10 + i ms, ratios to the first."""

    def time_artifacts(directories, image_size, bench, device="cpu"):
        calls.append([Path(d).resolve() for d in directories])
        (b,) = bench.batch_sizes
        out = {}
        for i, d in enumerate(directories):
            ms = 10.0 + i
            out[Path(d).name] = {
                "latency_ms": {str(b): {"p50": ms, "p90": ms}},
                "throughput_ips": {str(b): b * 1000 / ms},
                "ratio_to_baseline": {
                    str(b): {"median": ms / 10, "min": ms / 10, "max": ms / 10, "per_repeat": [ms / 10]}
                },
            }
        return {
            "threads": 2,
            "device": "cpu",
            "sync": "none",
            "machine": {"machine_key": "k", "machine_label": "test CPU"},
            "artifacts": out,
            "baseline": Path(directories[0]).name,
        }

    return time_artifacts


def test_cli_retime_times_each_distinct_artifact_once_in_one_child(sweep, monkeypatch, capsys):
    launched = []
    real = timing.run_reporting_child

    def recording(command, progress, timeout):
        launched.append(json.loads(Path(command[-1]).read_text()))  # the child's spec, before it is deleted
        return real(command, progress, timeout)

    monkeypatch.setattr(timing, "run_reporting_child", recording)
    main([str(sweep), "--retime", "--batch", "2", "--repeats", "2", "--iters", "2", "--warmup", "1"])
    printed = capsys.readouterr().out

    assert len(launched) == 1, "every artifact of the sweep is timed in one child process"
    (spec,) = launched
    # two contents: the teacher copy of job 1 is the fp32 of job 0, byte for byte
    assert len(spec["directories"]) == 2 and spec["batch_sizes"] == [2] and spec["repeats"] == 2
    assert spec["threads"] == 2  # the records' own threads

    retimed = json.loads((sweep / "compare" / RETIMED_FILE).read_text())
    assert retimed["batch"] == 2 and retimed["skipped"] == []
    assert retimed["machine"]["machine_key"] and "cpu_features" in retimed["machine"]
    base, student = retimed["artifacts"]
    assert [j["job"] for j in base["jobs"]] == ["0:none", "1:kd"]
    assert [j["artifact"] for j in base["jobs"]] == ["fp32", "teacher_fp32"]
    assert retimed["baseline"]["digest"] == base["digest"]  # the plain fp32 is the baseline
    assert base["throughput_ratio"]["per_repeat"] == [1.0, 1.0]
    assert len(student["throughput_ratio"]["per_repeat"]) == 2 and student["throughput_ratio"]["median"] > 0

    with open(sweep / "compare" / "compare.csv") as f:
        rows = {(r["run_dir"][-1], r["artifact"]): r for r in csv.DictReader(f)}
    assert rows[("0", "fp32")]["artifact_id"] == rows[("1", "teacher_fp32")]["artifact_id"]
    assert rows[("0", "fp32")]["retimed_ms_b2"] == rows[("1", "teacher_fp32")]["retimed_ms_b2"] != ""
    assert rows[("0", "fp32")]["p50_ms_b8"] != rows[("1", "teacher_fp32")]["p50_ms_b8"]  # the jobs' own kept
    assert rows[("1", "fp32")]["artifact_id"] != rows[("0", "fp32")]["artifact_id"]
    md = (sweep / "compare" / "compare.md").read_text()
    assert "retimed together in ONE child process at batch 2" in md
    assert (sweep / "compare" / "pareto_accuracy_throughput_b2.png").is_file()
    assert "ONE child process" in printed


def test_the_sweep_callback_retimes_its_jobs_as_one_before_comparing(sweep, monkeypatch, capsys):
    from omegaconf import OmegaConf

    from patholite.sweep import SweepSummary

    calls: list = []
    monkeypatch.setattr(retime_module, "time_artifacts", fake_timing(calls))
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}, "runtime": {"choices": {}}}})
    SweepSummary().on_multirun_end(config)
    assert len(calls) == 1 and len(calls[0]) == 2  # one child, the two contents
    assert json.loads((sweep / "compare" / RETIMED_FILE).read_text())["batch"] == 8
    md = (sweep / "compare" / "compare.md").read_text()
    assert "retimed together in ONE child process at batch 8" in md and "test CPU" in md
    assert "retimed 2 distinct artifacts" in capsys.readouterr().err


def test_a_sweep_timed_in_process_is_not_retimed(tmp_path, sweep, monkeypatch, capsys):
    from omegaconf import OmegaConf

    from patholite.sweep import SweepSummary

    for path in sweep.glob("*/metrics.json"):  # as debug=fast records them (bench.isolation=process)
        record = json.loads(path.read_text())
        for art in record["artifacts"]:
            art["cost"]["timing"] = {"method": "process"}
        path.write_text(json.dumps(record))
    calls: list = []
    monkeypatch.setattr(retime_module, "time_artifacts", fake_timing(calls))
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert calls == [] and not (sweep / "compare" / RETIMED_FILE).exists()
    assert (sweep / "compare" / "compare.md").is_file() and "not retimed" in capsys.readouterr().err


def test_an_artifact_with_missing_files_is_skipped_with_its_reason_and_the_rest_timed(
    sweep, tmp_path, monkeypatch
):
    (sweep / "1" / "artifacts" / "fp32" / "model.safetensors").unlink()
    calls: list = []
    monkeypatch.setattr(retime_module, "time_artifacts", fake_timing(calls))
    result = retime(find_records([sweep]), tmp_path / "out", batch=8)
    assert len(calls) == 1 and len(calls[0]) == 1  # the fp32/teacher content alone
    (skipped,) = result["skipped"]
    assert skipped["artifact"] == "fp32" and skipped["run_dir"].endswith("1")
    assert "files missing" in skipped["reason"] and "model.safetensors" in skipped["reason"]
    assert json.loads((tmp_path / "out" / RETIMED_FILE).read_text())["skipped"] == [skipped]


def test_dedup_is_by_content_not_by_path_or_name(sweep):
    distinct, skipped = collect(find_records([sweep]))
    assert skipped == []
    assert [len(d.jobs) for d in distinct] == [2, 1]
    assert distinct[0].label == "vit_micro/fp32=teacher_fp32 [0:none, 1:kd]"


def test_a_distinct_artifact_is_plotted_once_its_label_naming_the_jobs(sweep, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    monkeypatch.setattr(retime_module, "time_artifacts", fake_timing([]))
    records = find_records([sweep])
    comparison = apply_retimed(compare(records), retime(records, tmp_path, batch=8))
    assert [r["retimed_speedup_b8"] for r in comparison.rows] == [1.0, 1.0, pytest.approx(10 / 11, abs=1e-4)]
    assert "0:none 1:kd" in [r.get("shared_with") for r in comparison.rows]
    fig = pareto_figure(comparison, "retimed_speedup_b8", "throughput ratio", higher_is_better=True)
    try:
        labels = sorted(t.get_text() for t in fig.axes[0].texts)
        assert labels == ["vit_micro/fp32 [1:kd]", "vit_micro/fp32=teacher_fp32 [0:none, 1:kd]"]
        (line,) = fig.axes[0].lines  # higher is better on x: the plain fp32, faster and more accurate, alone
        assert list(line.get_xdata()) == [1.0]
    finally:
        plt.close(fig)


def test_labels_of_points_that_would_collide_do_not_overlap():
    import matplotlib.pyplot as plt

    # six artifacts on two spots with long labels: at one fixed offset their labels would pile up
    rows = [
        {
            "model": "vit_nano",
            "technique": t,
            "artifact": f"artifact_with_a_long_name_{i}",
            "accuracy": a,
            "x": x,
        }
        for i, (t, a, x) in enumerate(
            [
                ("none", 0.80, 1.0),
                ("kd", 0.80, 1.0),
                ("kd_ema", 0.801, 1.01),
                ("ptq", 0.70, 2.0),
                ("qat", 0.70, 2.0),
                ("prune", 0.7005, 2.0),
            ]
        )
    ]
    fig = pareto_figure(Comparison(rows=rows, failed=[], batch_sizes=[]), "x", "x", higher_is_better=True)
    try:
        renderer = fig.canvas.get_renderer()
        boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts]
        assert len(boxes) == 6
        pairs = [(i, j) for i in range(6) for j in range(i + 1, 6) if boxes[i].overlaps(boxes[j])]
        assert pairs == [], f"labels overlap: {pairs}"
        legend = fig.axes[0].get_legend().get_window_extent(renderer)
        assert not any(b.overlaps(legend) for b in boxes), "a label lies under the legend"
        inside = fig.bbox
        assert all(inside.x0 <= b.x0 and b.x1 <= inside.x1 for b in boxes), "a label left the figure"
    finally:
        plt.close(fig)


def test_retime_with_nothing_timed_is_one_clear_error(tmp_path, capsys):
    write_job(tmp_path / "s", 0, "none", "vit_micro", [recorded("fp32", tmp_path / "gone", 0.8, 2.0)])
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "s"), "--retime"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "nothing to time" in err and "gone is missing" in err


def test_batch_zero_is_refused_before_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "absent"), "--retime", "--batch", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--batch 0" in err and "positive" in err
