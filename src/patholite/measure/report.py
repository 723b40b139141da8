"""Print a run record (or many) as a table in the terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from patholite.accelerators.machine import machine_label


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def machine_caption(records: list[dict[str, Any]]) -> str | None:
    """The machine the records ran on (CPU and its INT8/bf16 features), or each of several, with a warning."""
    labels = list(dict.fromkeys(machine_label(r.get("device")) for r in records if r.get("device")))
    if len(labels) > 1:
        return "machines: " + "; ".join(labels) + " (timings not comparable across machines)"
    return f"machine: {labels[0]}" if labels else None


def artifact_table(records: list[dict[str, Any]], title: str) -> Table:
    caption = machine_caption(records)
    table = Table(title=title, caption=escape(caption) if caption else None)
    for column in (
        "job",
        "status",
        "artifact",
        "model",
        "acc",
        "bal. acc",
        "macro-F1",
        "AUROC",
        "ECE",
        "params (M)",
        "GFLOPs",
        "size (MB)",
        "p50 ms (batch)",
        "img/s (batch)",
    ):
        table.add_column(
            column, justify="left" if column in ("job", "status", "artifact", "model") else "right"
        )
    for rec in records:
        num = rec.get("job", {}).get("num")
        job = "-" if num is None else str(num)
        model = rec.get("config", {}).get("model", {}).get("name", "-")
        if not rec.get("artifacts"):
            table.add_row(job, rec["status"], "-", model, *["-"] * 10)
        for art in rec.get("artifacts", []):
            q, c = art["quality"], art["cost"]
            lat = ", ".join(f"{v['p50']:.1f} ({b})" for b, v in c.get("latency_ms", {}).items())
            ips = ", ".join(f"{v:.0f} ({b})" for b, v in c.get("throughput_ips", {}).items())
            table.add_row(
                job,
                rec["status"],
                art["name"],
                art.get("model") or model,
                _fmt(q.get("accuracy")),
                _fmt(q.get("balanced_accuracy")),
                _fmt(q.get("macro_f1")),
                _fmt(q.get("auroc")),
                _fmt(q.get("ece")),
                _fmt(c.get("params", 0) / 1e6, ".3f"),
                _fmt(c.get("flops", 0) / 1e9, ".3f"),
                _fmt(c.get("size_bytes", 0) / 1e6, ".2f"),
                lat,
                ips,
            )
    return table


def print_records(records: list[dict[str, Any]], title: str = "patholite results") -> None:
    console = Console()
    if not console.is_terminal:  # logs and pipes: keep the table whole rather than squeezed into 80 columns
        console = Console(width=200)
    console.print(artifact_table(records, title))
