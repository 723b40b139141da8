"""patholite.compare on small fake sweeps: the table, CSV, Markdown and Pareto plots, failed jobs listed."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from patholite.compare import main
from patholite.measure.compare import compare, find_records, pareto_front
from patholite.records import ArtifactRecord, RunRecord


def quality(acc: float) -> dict:
    return {
        "accuracy": acc,
        "balanced_accuracy": acc,
        "macro_f1": acc - 0.01,
        "auroc": 0.95,
        "ece": 0.05,
        "f1_per_class": {},
        "recall_per_class": {},
        "confusion_matrix": [],
        "n_samples": 100,
    }


def cost(size_mb: float, p50: dict[int, float]) -> dict:
    return {
        "params": 1000,
        "flops": 2e9,
        "flops_fused_uncounted": 1.8e9,
        "size_bytes": int(size_mb * 1e6),
        "latency_ms": {str(b): {"p50": v, "p90": v * 1.1} for b, v in p50.items()},
        "throughput_ips": {str(b): b * 1000 / v for b, v in p50.items()},
        "peak_rss_mb": 900.0,
        "device": "cpu",
        "threads": 2,
        "protocol": {},
    }


def write_job(
    sweep: Path,
    num: int,
    technique: str,
    model: str,
    artifacts: list[ArtifactRecord],
    status: str = "ok",
    seed: int = 0,
) -> None:
    record = RunRecord(
        run_dir=str(sweep / str(num)),
        config={
            "compression": {"name": technique},
            "model": {"name": model},
            "dataset": {"name": "synthetic"},
            "seed": seed,
        },
        job={
            "num": num,
            "sweep_dir": str(sweep),
            "overrides": [f"model={model}", f"compression={technique}"],
        },
        device={"kind": "cpu"},
        artifacts=artifacts,
    )
    record.finish(status, RuntimeError("out of memory") if status == "failed" else None)


def art(
    name: str, acc: float, size: float, p50: dict[int, float], source: str | None = None
) -> ArtifactRecord:
    return ArtifactRecord(
        name=name, path="/x", files=[], quality=quality(acc), cost=cost(size, p50), source=source
    )


@pytest.fixture
def sweeps(tmp_path) -> tuple[Path, Path]:
    a, b = tmp_path / "sweep_a", tmp_path / "sweep_b"
    write_job(a, 0, "none", "deit_tiny", [art("fp32", 0.90, 20.0, {1: 10.0, 8: 50.0})])
    write_job(a, 1, "ptq", "deit_tiny", [art("int8_dynamic", 0.89, 5.0, {1: 8.0, 8: 45.0}, source="fp32")])
    write_job(a, 2, "qat", "deit_tiny", [], status="failed")
    write_job(b, 0, "none", "deit_small", [art("fp32", 0.93, 80.0, {1: 30.0, 8: 150.0})])
    return a, b


def test_compare_two_sweeps_writes_table_csv_markdown_and_plots(sweeps, tmp_path, capsys):
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, sweeps), "--out", str(out)])
    assert exit_info.value.code == 1  # a job failed
    printed = capsys.readouterr().out
    assert "int8_dynamic" in printed and "out of memory" in printed

    rows = list(csv.DictReader((out / "compare.csv").read_text().splitlines()))
    assert [(r["model"], r["technique"], r["artifact"]) for r in rows] == [
        ("deit_tiny", "none", "fp32"),
        ("deit_tiny", "ptq", "int8_dynamic"),
        ("deit_small", "none", "fp32"),
    ]
    ptq = rows[1]
    assert ptq["baseline"] == "none/fp32"
    assert float(ptq["size_ratio"]) == pytest.approx(0.25)
    assert float(ptq["latency_ratio_b1"]) == pytest.approx(0.8) and float(
        ptq["latency_ratio_b8"]
    ) == pytest.approx(0.9)
    assert float(ptq["accuracy_delta_pp"]) == pytest.approx(-1.0)
    assert float(rows[2]["size_ratio"]) == 1.0  # a plain model is its own baseline

    markdown = (out / "compare.md").read_text()
    assert markdown.count("\n| ") == 4  # header + 3 rows
    assert (
        "## Failed jobs" in markdown
        and "RuntimeError: out of memory" in markdown
        and "compression=qat" in markdown
    )
    for png in ("pareto_accuracy_latency.png", "pareto_accuracy_size.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_baseline_prefers_same_sweep_and_seed(tmp_path):
    s = tmp_path / "s"
    write_job(s, 0, "none", "m", [art("fp32", 0.80, 10.0, {1: 10.0})], seed=1)
    write_job(s, 1, "none", "m", [art("fp32", 0.90, 10.0, {1: 20.0})], seed=2)
    write_job(s, 2, "kd", "m", [art("student_fp32", 0.85, 10.0, {1: 10.0})], seed=2)
    rows = compare(find_records([s])).rows
    kd = rows[2]
    assert kd["accuracy_delta_pp"] == pytest.approx(-5.0) and kd["latency_ratio_b1"] == pytest.approx(0.5)


def test_pareto_front_keeps_the_undominated_points():
    points = [(10, 0.90), (8, 0.89), (30, 0.93), (12, 0.88), (8, 0.85)]
    assert pareto_front(points) == [1, 0, 2]


def test_compare_refuses_empty_or_missing_directories(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2 and "no metrics.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope")])
