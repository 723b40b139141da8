"""Write a comparison as CSV, Markdown and Pareto plots (PNG), each file atomically.

A plot shows each artifact content once when the rows were retimed (``distinct_rows``), and places its labels
so that none overlaps another (``place_labels``: deterministic, from the renderer's bounding boxes)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from patholite.io import atomic_path
from patholite.measure.compare import Comparison, distinct_rows, pareto_front

LEAD = [
    "technique",
    "artifact",
    "model",
    "dataset",
    "accelerator",
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "auroc",
    "flip_rate",
    "size_mb",
    "gflops",
    "params",
    "peak_rss_mb",
]
TAIL = ["baseline", "accuracy_delta_pp", "size_ratio"]


def retimed_columns(comparison: Comparison) -> list[str]:
    """The columns a retiming adds (none when the rows were not retimed)."""
    b = comparison.retime_batch
    if b is None:
        return []
    speedup = f"retimed_speedup_b{b}"
    return [f"retimed_ms_b{b}", speedup, f"{speedup}_min", f"{speedup}_max", "artifact_id", "shared_with"]


def columns(comparison: Comparison) -> list[str]:
    b = comparison.batch_sizes
    return [
        *LEAD,
        *(f"p50_ms_b{n}" for n in b),
        *(f"ips_b{n}" for n in b),
        *TAIL,
        *(f"latency_ratio_b{n}" for n in b),
        *retimed_columns(comparison),
        "machine",
        "machine_key",
        "run_dir",
    ]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_csv(comparison: Comparison, path: Path) -> Path:
    cols = columns(comparison)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in cols} for r in comparison.rows)
    return path


def write_markdown(comparison: Comparison, path: Path, plots: list[Path]) -> Path:
    # One machine is said once above the table; several get a warning and a column naming each row's.
    dropped = {"run_dir", "machine_key"} | (set() if comparison.mixed_machines else {"machine"})
    cols = [c for c in columns(comparison) if c not in dropped]
    lines = ["# patholite comparison", ""]
    if comparison.machine_warning:
        lines += [f"> **{comparison.machine_warning}**", ""]
    elif comparison.machine_line:
        lines += [comparison.machine_line[0].upper() + comparison.machine_line[1:], ""]
    if comparison.retime_line:
        lines += [comparison.retime_line[0].upper() + comparison.retime_line[1:] + ".", ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in comparison.rows]
    if comparison.failed:
        lines += ["", "## Failed jobs", ""]
        lines += [
            f"- `{f['run_dir']}` ({f['status']}, {f['overrides']}): {f['error']}" for f in comparison.failed
        ]
    if plots:
        lines += ["", "## Pareto plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def point_label(row: dict[str, Any]) -> str:
    """A plotted point's label: a retimed artifact's names and the jobs that share it, else the row's."""
    return row.get("retimed_label") or f"{row['model']}/{row['technique']}/{row['artifact']}"


def pareto_figure(comparison: Comparison, x_key: str, x_label: str, higher_is_better: bool = False):
    """The figure of ``plot_pareto`` (a matplotlib ``Figure``, open in pyplot: close it), or None if no row
    has both ``x_key`` and an accuracy. ``higher_is_better``: x is a gain (a throughput ratio), not a cost."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    rows = [
        r for r in distinct_rows(comparison) if r.get(x_key) is not None and r.get("accuracy") is not None
    ]
    if not rows:
        return None
    points = [(r[x_key], r["accuracy"]) for r in rows]
    front = pareto_front([(-x, y) for x, y in points] if higher_is_better else points)
    if higher_is_better:
        front = front[::-1]  # sorted by x, left to right
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    ax.scatter(*zip(*points, strict=True), color="tab:blue", label="artifact", zorder=2)
    ax.plot(
        [points[i][0] for i in front],
        [points[i][1] for i in front],
        "o-",
        color="tab:red",
        label="Pareto front",
        zorder=3,
    )
    labels = [ax.annotate(point_label(r), (x, y), fontsize=7) for r, (x, y) in zip(rows, points, strict=True)]
    ax.set_xlabel(x_label)
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.margins(x=0.12, y=0.1)  # room for the labels of the outermost points
    ax.legend(loc="best")
    place_labels(fig, ax, labels)
    return fig


def place_labels(fig, ax, labels: list, gap: float = 4.0, tries: int = 40) -> None:
    """Lay out the figure, then move each label (an annotation) to the first of a fixed sequence of offsets
    from its point: just above, then alternately below and further up, where its box overlaps neither a label
    placed before it nor the legend.

    Deterministic: labels are placed in order of their points (x, then y), and a label of a point in the
    right half of the axes is written to the left of it, so it stays inside the figure. Nothing may change the
    layout afterwards: a later ``tight_layout`` would move the points under the labels."""
    x_mid = sum(ax.get_xlim()) / 2
    for label in labels:
        left = label.xy[0] > x_mid
        label.set_anncoords("offset points")
        label.set_ha("right" if left else "left")
        label.set_position((-gap if left else gap, gap))
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend()
    placed = [legend.get_window_extent(renderer)] if legend is not None else []
    for label in sorted(labels, key=lambda a: (a.xy[0], a.xy[1])):
        dx = label.get_position()[0]
        height_pt = label.get_window_extent(renderer).height * 72 / fig.dpi + 1.0
        for step in [0] + [s for k in range(1, tries) for s in (-k, k)]:
            # step >= 0: the label's baseline ``step`` heights above the point; < 0: its top below the point
            dy = gap + step * height_pt if step >= 0 else -gap + step * height_pt
            label.set_position((dx, dy))
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
        placed.append(label.get_window_extent(renderer))


def plot_pareto(
    comparison: Comparison, x_key: str, x_label: str, path: Path, higher_is_better: bool = False
) -> Path | None:
    """Accuracy against a cost (or a gain: ``higher_is_better``), every artifact a point, the Pareto front
    joined; None if nothing to plot."""
    import matplotlib.pyplot as plt

    fig = pareto_figure(comparison, x_key, x_label, higher_is_better)
    if fig is None:
        return None
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
