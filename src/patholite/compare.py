"""``python -m patholite.compare <sweep or run dir>... [--out DIR]``: one table of every record.

Prints the table, writes ``compare.csv``, ``compare.md`` and Pareto plots (accuracy against latency at the
smallest batch, and against size) into ``--out`` (default: ``<first dir>/compare``), and lists failed jobs.
Exits 1 when a job failed, so scripts notice. The machine the rows ran on is named above the table (every
CSV row has ``machine`` and ``machine_key``); rows from several machines, or from records without machine
facts beside ones with them, get a warning naming each machine, in the terminal and in ``compare.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from patholite.errors import PatholiteError
from patholite.measure.compare import Comparison, compare, find_records
from patholite.measure.outputs import LEAD, TAIL, plot_pareto, write_csv, write_markdown

# The terminal shows a narrower table than the files: drop the columns a reader rarely scans there.
SHOWN = [
    c
    for c in (*LEAD, *TAIL)
    if c not in ("balanced_accuracy", "flip_rate", "gflops", "params", "peak_rss_mb")
]


def print_table(comparison: Comparison, console: Console) -> None:
    """The table, its machine in the caption, or a warning naming each machine when the rows mix several."""
    b = comparison.batch_sizes
    cols = [*SHOWN, *(f"p50_ms_b{n}" for n in b), *(f"latency_ratio_b{n}" for n in b)]
    if comparison.mixed_machines:
        cols.append("machine")
    line = comparison.machine_line
    table = Table(title="patholite comparison", caption=escape(line) if line else None)
    for c in cols:
        table.add_column(c)
    for r in comparison.rows:
        table.add_row(
            *(
                "-" if r.get(c) is None else f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c])
                for c in cols
            )
        )
    console.print(table)
    if comparison.machine_warning:
        console.print(f"[bold yellow]{escape(comparison.machine_warning)}[/]")


def run(directories: list[str], out: str | None = None) -> tuple[Comparison, list[Path]]:
    comparison = compare(find_records(directories))
    out_dir = Path(out) if out else Path(directories[0]) / "compare"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [write_csv(comparison, out_dir / "compare.csv")]
    plots = []
    if comparison.batch_sizes:
        b = comparison.batch_sizes[0]
        plots.append(
            plot_pareto(
                comparison,
                f"p50_ms_b{b}",
                f"latency p50 (ms, batch {b})" if isinstance(b, int) else f"latency p50 (ms per {b})",
                out_dir / "pareto_accuracy_latency.png",
            )
        )
    plots.append(
        plot_pareto(comparison, "size_mb", "size on disk (MB)", out_dir / "pareto_accuracy_size.png")
    )
    plots = [p for p in plots if p is not None]
    written += [write_markdown(comparison, out_dir / "compare.md", plots), *plots]
    return comparison, written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m patholite.compare", description=__doc__.splitlines()[0])
    parser.add_argument(
        "directories", nargs="+", help="sweep or run directories holding metrics.json records"
    )
    parser.add_argument("--out", help="where to write compare.csv, compare.md and the plots")
    args = parser.parse_args(argv)
    console = Console(width=200) if not Console().is_terminal else Console()
    try:
        comparison, written = run(args.directories, args.out)
    except PatholiteError as err:
        print(f"patholite: error: {err}", file=sys.stderr)
        sys.exit(2)
    print_table(comparison, console)
    for f in comparison.failed:
        console.print(f"[bold red]{f['status']}[/]: {f['run_dir']}: {f['error']}")
    for path in written:
        console.print(f"wrote {path}")
    if comparison.failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
