"""The command line as a user runs it: sweeps, failing jobs, rerun, a killed run resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from patholite.errors import ConfigError
from patholite.overrides import expand_run_references, merge_overrides, override_key, split_flags
from patholite.records import read_record
from tests.conftest import REPO, run_cli
from tests.wandb_reader import offline_runs

FAST = ["debug=fast", "model=vit_micro"]


def sweep_dirs(root: Path) -> list[Path]:
    return sorted((root / "outputs" / "multiruns").glob("*/*"))


def test_two_model_sweep_writes_two_records_and_two_wandb_runs(tmp_path):
    result = run_cli(["-m", "debug=fast", "model=vit_micro,vit_mini", "logger=wandb"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [sweep] = sweep_dirs(tmp_path)
    records = [read_record(sweep / str(n)) for n in (0, 1)]
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert {r["config"]["model"]["name"] for r in records} == {"vit_micro", "vit_mini"}
    for n, record in enumerate(records):
        assert len(list((sweep / str(n) / "wandb").glob("offline-run-*"))) == 1
        # the experiment (here the entry's task, train) and the sweep are the W&B group
        assert record["wandb"]["group"] == f"train_{sweep.parent.name}_{sweep.name}"
        assert record["job"]["num"] == n
    summary = json.loads((sweep / "sweep.json").read_text())
    assert summary["failed"] == 0 and len(summary["jobs"]) == 2
    assert "vit_mini" in result.stdout  # the sweep's results table
    compared = (sweep / "compare" / "compare.csv").read_text().splitlines()
    assert len(compared) == 3 and "vit_micro" in compared[1] + compared[2]  # header + one row per job
    assert (sweep / "compare" / "pareto_accuracy_latency.png").is_file()
    # the comparison is a W&B run of its own in the jobs' group, with the Pareto plots
    [compare_run] = offline_runs(sweep / "compare")
    assert compare_run.run.job_type == "compare" and compare_run.run.run_group == records[0]["wandb"]["group"]
    assert "pareto_accuracy_latency.png" in compare_run.files


def test_failing_job_in_sweep_is_recorded_and_the_sweep_exits_nonzero(tmp_path):
    # image size 30 is not a multiple of vit_micro's patch size 4: job 1 fails, job 0 and 2 run
    result = run_cli(["-m", *FAST, "logger=csv", "dataset.image_size=32,30,36"], tmp_path)
    assert result.returncode == 1
    [sweep] = sweep_dirs(tmp_path)
    statuses = [read_record(sweep / str(n))["status"] for n in range(3)]
    assert statuses == ["ok", "failed", "ok"]
    failed = read_record(sweep / "1")
    assert "ConfigError" in failed["error"] and "patch size 4" in failed["error"]
    assert "not a multiple" in result.stderr + result.stdout
    assert json.loads((sweep / "sweep.json").read_text())["failed"] == 1


def test_single_run_bad_input_exits_nonzero_with_one_clear_message(tmp_path):
    result = run_cli([*FAST, "dataset=bach", f"dataset.root={tmp_path / 'missing'}"], tmp_path)
    assert result.returncode == 1
    assert "DatasetError" in result.stderr or "DatasetError" in result.stdout
    assert str(tmp_path / "missing") in result.stderr + result.stdout
    assert "Traceback" not in result.stderr  # Hydra prints the error, not a stack


def test_unknown_key_on_the_command_line_names_it(tmp_path):
    result = run_cli([*FAST, "trainer.max_epoch=3"], tmp_path)
    assert result.returncode == 1
    assert "trainer.max_epoch" in result.stderr


def test_rerun_replays_saved_overrides_and_changes_group_choices(tmp_path):
    first = run_cli([*FAST, "logger=csv", "optim.lr=0.003", "hydra.run.dir=outputs/first"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "first"
    second = run_cli([f"rerun={run_dir}", "model=vit_mini", "hydra.run.dir=outputs/second"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    record = read_record(tmp_path / "outputs" / "second")
    assert record["config"]["model"]["name"] == "vit_mini"  # group choice changed
    assert record["config"]["optim"]["lr"] == 0.003  # saved override kept
    assert record["config"]["rerun"] == str(run_dir)
    saved = yaml.safe_load((tmp_path / "outputs" / "second" / ".hydra" / "overrides.yaml").read_text())
    assert "model=vit_mini" in saved and "model=vit_micro" not in saved


def test_sigterm_leaves_an_interrupted_record_and_resume_finishes_it(tmp_path):
    stop = [
        "+callbacks.extra.stop._target_=tests.helpers.InterruptAt",
        "+callbacks.extra.stop.step=2",
        "+callbacks.extra.stop.kind=sigterm",
    ]
    env = {"PYTHONPATH": str(REPO)}
    killed = run_cli(
        [*FAST, "logger=csv", "trainer.max_epochs=2", "hydra.run.dir=outputs/job", *stop], tmp_path, env=env
    )
    assert killed.returncode == 143  # 128 + SIGTERM, as a killed process
    run_dir = tmp_path / "outputs" / "job"
    assert read_record(run_dir)["status"] == "interrupted"
    assert (run_dir / "checkpoints" / "train" / "interrupted.ckpt").is_file()
    # the saved overrides include the callback that kills the run; resume replays the run as it was,
    # so the callback is told to stop at a step the resumed run never reaches again
    resumed = run_cli([f"resume={run_dir}"], tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_record(run_dir)["status"] == "ok"


def test_quoted_paths_survive_hydra_parsing():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from patholite.overrides import quote

    parser = OverridesParser.create()
    for path in ["/runs/plain", "/runs/a,b", "/runs/with space", "/runs/it's"]:
        [override] = parser.parse_overrides([f"rerun={quote(path)}"])
        assert override.value() == path


def test_override_merging():
    assert override_key("+callbacks.extra.a._target_=x") == "callbacks.extra.a._target_"
    assert override_key("~logger") == "logger"
    assert merge_overrides(["model=a", "optim.lr=1"], ["model=b", "seed=3"]) == [
        "model=b",
        "optim.lr=1",
        "seed=3",
    ]
    assert merge_overrides(["+tags=[a]"], ["tags=[b]"]) == ["+tags=[b]"]  # still absent from the base config
    assert split_flags(["-cn", "train", "model=a", "--multirun", "seed=1"]) == (
        ["-cn", "train", "--multirun"],
        ["model=a", "seed=1"],
    )


def test_rerun_and_resume_reject_bad_references(tmp_path):
    with pytest.raises(ConfigError, match="no such run directory"):
        expand_run_references([f"rerun={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="not a patholite run directory"):
        expand_run_references([f"resume={tmp_path}"])
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- model=vit_micro\n")
    with pytest.raises(ConfigError, match="use rerun="):
        expand_run_references([f"resume={tmp_path}", "model=deit_tiny"])
    with pytest.raises(ConfigError, match="cannot be combined with -m"):
        expand_run_references(["-m", f"rerun={tmp_path}"])
    assert expand_run_references([f"resume={tmp_path}"]) == [
        "model=vit_micro",
        f"resume={tmp_path}",
        f"hydra.run.dir={tmp_path}",
    ]


@pytest.mark.slow
def test_demo_teacher_lands_in_the_accuracy_band(tmp_path):
    """The demo's synthetic task must be learnable but not trivial, so compression effects stay visible."""
    args = ["experiment=demo", "model=vit_mini", "callbacks.progress_bar=none", "hydra.run.dir=outputs/demo"]
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = read_record(tmp_path / "outputs" / "demo")
    accuracy = record["artifacts"][0]["quality"]["accuracy"]
    assert 0.75 <= accuracy <= 0.97, accuracy
    assert "record:" in result.stdout and "fp32" in result.stdout  # ends with the table and the paths


@pytest.mark.slow
def test_demo_sweep_ends_with_the_comparison_of_four_techniques(tmp_path):
    args = ["-m", "experiment=demo", "callbacks.progress_bar=none", "hydra.sweep.dir=outputs/demo"]
    result = run_cli(args, tmp_path, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    compare = tmp_path / "outputs" / "demo" / "compare"
    rows = (compare / "compare.csv").read_text().splitlines()[1:]
    techniques = {row.split(",")[0] for row in rows}
    assert techniques == {"none", "kd_ema", "kd_ema_ptq", "qat"}
    assert "pareto_accuracy_latency.png" in result.stdout + result.stderr  # the paths come through logging
    assert (compare / "pareto_accuracy_latency.png").is_file()
    # the distilled student keeps up with its plainly trained twin (same architecture, same epochs)
    records = [read_record(p) for p in sorted((tmp_path / "outputs" / "demo").glob("[0-9]*"))]
    accuracy = {
        (r["config"]["compression"]["name"], a["name"]): a["quality"]["accuracy"]
        for r in records
        for a in r["artifacts"]
    }
    assert accuracy[("kd_ema", "student_fp32_ema")] >= accuracy[("none", "fp32")] - 0.03
    int8, ema = accuracy[("kd_ema_ptq", "int8_dynamic")], accuracy[("kd_ema_ptq", "student_fp32_ema")]
    assert abs(int8 - ema) <= 0.01


def test_worker_errors_are_unwrapped_for_the_one_line_message():
    from patholite.errors import DatasetError
    from patholite.jobs import user_message

    wrapped = DatasetError(
        "Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\npatholite.errors.DatasetError: cannot read image /d/a.jpg: truncated'
    )
    assert user_message(wrapped) == "cannot read image /d/a.jpg: truncated"
    assert user_message(DatasetError("dataset=bach: no Photos/")) == "dataset=bach: no Photos/"


def test_sweep_summary_ignores_older_jobs_in_a_reused_sweep_dir(tmp_path):
    from patholite.io import write_json
    from patholite.sweep import sweep_records

    for num, started in ((0, "2026-01-01T10:00:00.000+00:00"), (1, "2026-01-01T09:00:00.000+00:00")):
        write_json(tmp_path / str(num) / "metrics.json", {"status": "ok", "started_at": started, "job": {}})
    assert len(sweep_records(tmp_path)) == 2
    assert [r["started_at"][11:13] for r in sweep_records(tmp_path, since="2026-01-01T09:30:00")] == ["10"]
