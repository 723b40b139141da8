"""Write a comparison as CSV, Markdown and Pareto plots (PNG), each file atomically."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from patholite.io import atomic_path
from patholite.measure.compare import Comparison, pareto_front

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


def columns(comparison: Comparison) -> list[str]:
    b = comparison.batch_sizes
    return [
        *LEAD,
        *(f"p50_ms_b{n}" for n in b),
        *(f"ips_b{n}" for n in b),
        *TAIL,
        *(f"latency_ratio_b{n}" for n in b),
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


def pareto_figure(comparison: Comparison, x_key: str, x_label: str):
    """The figure of ``plot_pareto`` (a matplotlib ``Figure``, open in pyplot: close it), or None if no row
    has both ``x_key`` and an accuracy."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    rows = [r for r in comparison.rows if r.get(x_key) is not None and r.get("accuracy") is not None]
    if not rows:
        return None
    points = [(r[x_key], r["accuracy"]) for r in rows]
    front = pareto_front(points)
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
    for r, (x, y) in zip(rows, points, strict=True):
        ax.annotate(
            f"{r['model']}/{r['technique']}/{r['artifact']}",
            (x, y),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel(x_label)
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    return fig


def plot_pareto(comparison: Comparison, x_key: str, x_label: str, path: Path) -> Path | None:
    """Accuracy against a cost, every artifact a point, the Pareto front joined; None if nothing to plot."""
    import matplotlib.pyplot as plt

    fig = pareto_figure(comparison, x_key, x_label)
    if fig is None:
        return None
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
