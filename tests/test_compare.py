"""patholite.compare on small fake sweeps: the table, CSV, Markdown and Pareto plots, failed jobs listed."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from patholite.compare import main
from patholite.measure.compare import Comparison, compare, find_records, pareto_front
from patholite.measure.outputs import pareto_figure, plot_pareto
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


@pytest.mark.parametrize(
    ("points", "front"),
    [
        pytest.param([(3.0, 0.7)], [0], id="single point"),
        pytest.param([(5, 0.8), (5, 0.8), (5, 0.8)], [0, 1, 2], id="all equal: none beats another"),
        pytest.param([(5, 0.8), (10, 0.7), (5, 0.8)], [0, 2], id="exact duplicates both kept"),
        pytest.param([(5, 0.8), (5, 0.8), (4, 0.9)], [2], id="duplicates both dominated"),
        pytest.param([(6, 0.8), (5, 0.8)], [1], id="equal quality, higher cost loses"),
        pytest.param([(5, 0.7), (5, 0.8)], [1], id="equal cost, lower quality loses"),
        # lower cost and higher quality are better: cheaper-and-worse vs dearer-and-better is a trade-off
        pytest.param([(2, 0.9), (1, 0.5)], [1, 0], id="trade-off: both kept, sorted by cost"),
        # ... while cheaper-and-better beats dearer-and-worse (a wrong direction on either axis keeps both
        # or the wrong one)
        pytest.param([(2, 0.5), (1, 0.9)], [1], id="cheaper and better wins"),
        pytest.param([(1, 0.5), (2, 0.9)], [0, 1], id="mirror of the trade-off"),
        pytest.param([(1, 0.9), (2, 0.5)], [0], id="mirror of cheaper and better"),
        pytest.param(
            [(30, 0.95), (10, 0.90), (20, 0.85), (5, 0.60), (10, 0.80)], [3, 1, 0], id="several, unsorted"
        ),
        pytest.param([], [], id="no points"),
    ],
)
def test_pareto_front_cases(points, front):
    assert pareto_front(points) == front


def test_pareto_front_takes_no_missing_values():
    # pareto_front has no notion of a missing value: its callers drop rows without one (see plot_pareto)
    with pytest.raises(TypeError):
        pareto_front([(1.0, 0.5), (None, 0.9)])


def pareto_rows() -> Comparison:
    def row(technique: str, artifact: str, acc: float | None, size: float | None, p50: float) -> dict:
        return {
            "model": "m",
            "technique": technique,
            "artifact": artifact,
            "accuracy": acc,
            "size_mb": size,
            "p50_ms_b1": p50,
        }

    return Comparison(
        rows=[
            row("none", "fp32", 0.91, 40.0, 7.0),
            row("ptq", "int8", 0.89, 10.0, 3.0),
            row("prune", "pruned", 0.80, 25.0, 2.0),  # dominated by int8 on size, on the front on latency
            row("kd", "student", None, 5.0, 1.0),  # no accuracy: on neither plot
            row("lowrank", "svd", 0.95, None, 9.0),  # no size: only on the latency plot
        ],
        failed=[],
        batch_sizes=[1],
    )


def plotted(
    fig,
) -> tuple[list[tuple[float, float]], list[tuple[float, float]], dict[str, tuple[float, float]]]:
    """The scattered points, the front's line and each annotation's point, read back off the figure."""
    (ax,) = fig.axes
    (scatter,) = ax.collections
    (line,) = ax.lines
    points = [tuple(map(float, p)) for p in scatter.get_offsets()]
    front = list(zip(map(float, line.get_xdata()), map(float, line.get_ydata()), strict=True))
    labels = {t.get_text(): tuple(map(float, t.xy)) for t in ax.texts}
    return points, front, labels


def test_pareto_plot_puts_the_named_column_on_x_and_accuracy_on_y():
    import matplotlib.pyplot as plt

    fig = pareto_figure(pareto_rows(), "size_mb", "size on disk (MB)")
    try:
        ax = fig.axes[0]
        assert ax.get_xlabel() == "size on disk (MB)" and ax.get_ylabel() == "test accuracy"
        points, front, labels = plotted(fig)
        assert points == [(40.0, 0.91), (10.0, 0.89), (25.0, 0.80)]  # size_mb on x, accuracy on y
        assert front == [(10.0, 0.89), (40.0, 0.91)]  # pruned (25 MB, 0.80) is beaten by int8
        assert labels == {
            "m/none/fp32": (40.0, 0.91),
            "m/ptq/int8": (10.0, 0.89),
            "m/prune/pruned": (25.0, 0.80),
        }
    finally:
        plt.close(fig)

    fig = pareto_figure(pareto_rows(), "p50_ms_b1", "latency p50 (ms, batch 1)")
    try:
        assert fig.axes[0].get_xlabel() == "latency p50 (ms, batch 1)"
        points, front, labels = plotted(fig)
        assert points == [(7.0, 0.91), (3.0, 0.89), (2.0, 0.80), (9.0, 0.95)]
        assert front == [(2.0, 0.80), (3.0, 0.89), (7.0, 0.91), (9.0, 0.95)]  # each faster one is worse
        assert labels["m/lowrank/svd"] == (9.0, 0.95) and "m/kd/student" not in labels
    finally:
        plt.close(fig)


def test_plot_pareto_writes_the_figure_or_nothing(tmp_path):
    import matplotlib.pyplot as plt

    open_before = len(plt.get_fignums())
    path = plot_pareto(pareto_rows(), "size_mb", "size on disk (MB)", tmp_path / "size.png")
    assert path == tmp_path / "size.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(plt.get_fignums()) == open_before  # the figure is closed once written
    empty = Comparison(rows=[{"accuracy": None, "size_mb": 1.0}], failed=[], batch_sizes=[])
    assert plot_pareto(empty, "size_mb", "size", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    assert pareto_figure(empty, "size_mb", "size") is None


def test_compare_refuses_empty_or_missing_directories(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2 and "no metrics.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope")])
