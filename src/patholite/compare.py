"""``python -m patholite.compare <dirs>... [--out DIR] [--retime] [--batch 8]``: one table of every record.

Prints the table, writes ``compare.csv``, ``compare.md`` and Pareto plots (accuracy against latency at the
smallest batch, and against size) into ``--out`` (default: ``<first dir>/compare``), and lists failed jobs.
Exits 1 when a job failed, so scripts notice. The machine the rows ran on is named above the table (every
CSV row has ``machine`` and ``machine_key``); rows from several machines, or from records without machine
facts beside ones with them, get a warning naming each machine, in the terminal and in ``compare.md``.

``--retime`` times every distinct artifact of the records (by content) again, together in ONE child process,
alternating, at ``--batch`` (default 8) with the records' threads and protocol (or ``--threads``,
``--repeats``, ``--iters``, ``--warmup``), and writes ``retimed.json`` into the output folder; the jobs' own
measurements stay in their records. Whenever that file is there, the table gains the retimed throughput
ratios (to one baseline artifact timed in the same child, said in the caption) and
``pareto_accuracy_throughput_b<B>.png`` plots them, each distinct artifact once. Without it that plot shows
each job's own ratio at ``--batch``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from patholite.errors import PatholiteError
from patholite.measure.compare import Comparison, apply_retimed, compare, find_records
from patholite.measure.outputs import LEAD, TAIL, plot_pareto, retimed_columns, write_csv, write_markdown
from patholite.measure.retime import DEFAULT_BATCH, check_batch, read_retimed, retime

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
    # of the retimed columns, the ratio and who shares the artifact (the rest are in the files)
    cols += [c for c in retimed_columns(comparison) if c.startswith("retimed_speedup") or c == "shared_with"]
    cols = [c for c in cols if not c.endswith(("_min", "_max"))]
    if comparison.mixed_machines:
        cols.append("machine")
    caption = "\n".join(line for line in (comparison.machine_line, comparison.retime_line) if line)
    table = Table(title="patholite comparison", caption=escape(caption) if caption else None)
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


def run(
    directories: list[str],
    out: str | None = None,
    retime_now: bool = False,
    batch: int = DEFAULT_BATCH,
    threads: int | None = None,
    warmup: int | None = None,
    iters: int | None = None,
    repeats: int | None = None,
) -> tuple[Comparison, list[Path]]:
    """The comparison of the records under ``directories`` and the files written into ``out`` (default
    ``<first dir>/compare``); ``retime_now``: time their distinct artifacts again, as one, first."""
    check_batch(batch)
    records = find_records(directories)
    out_dir = Path(out) if out else Path(directories[0]) / "compare"
    if retime_now:
        retime(records, out_dir, batch, threads, warmup, iters, repeats)
    comparison = apply_retimed(compare(records), read_retimed(out_dir))
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
    plots.append(throughput_plot(comparison, batch, out_dir))
    plots.append(
        plot_pareto(comparison, "size_mb", "size on disk (MB)", out_dir / "pareto_accuracy_size.png")
    )
    plots = [p for p in plots if p is not None]
    written += [write_markdown(comparison, out_dir / "compare.md", plots), *plots]
    if comparison.retimed:
        written.append(out_dir / "retimed.json")
    return comparison, written


def throughput_plot(comparison: Comparison, batch: int, out_dir: Path) -> Path | None:
    """Accuracy against the throughput ratio at ``batch``: the retimed one (one child, one baseline) when the
    comparison has it at that batch, else each row's own ratio to its baseline from its job's timing."""
    path = out_dir / f"pareto_accuracy_throughput_b{batch}.png"
    if comparison.retime_batch == batch:
        key, label = f"retimed_speedup_b{batch}", f"throughput ratio, batch {batch} (retimed in one process)"
    else:
        key, label = f"speedup_b{batch}", f"throughput ratio to each row's baseline, batch {batch} (per job)"
        for row in comparison.rows:
            ratio = row.get(f"latency_ratio_b{batch}")
            row[key] = 1 / ratio if ratio else None
    return plot_pareto(comparison, key, label, path, higher_is_better=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m patholite.compare", description=__doc__.splitlines()[0])
    parser.add_argument(
        "directories", nargs="+", help="sweep or run directories holding metrics.json records"
    )
    parser.add_argument("--out", help="where to write compare.csv, compare.md and the plots")
    parser.add_argument(
        "--retime",
        action="store_true",
        help="time every distinct artifact again, together in one child process (writes retimed.json)",
    )
    parser.add_argument(
        "--batch", type=int, default=DEFAULT_BATCH, help="batch size to retime and plot at (default 8)"
    )
    parser.add_argument("--threads", type=int, help="retiming threads (default: the records' own)")
    parser.add_argument("--repeats", type=int, help="retiming repeats (default: the records' own)")
    parser.add_argument("--iters", type=int, help="retiming iterations per block (default: the records' own)")
    parser.add_argument("--warmup", type=int, help="retiming warm-up iterations (default: the records' own)")
    args = parser.parse_args(argv)
    console = Console(width=200) if not Console().is_terminal else Console()
    try:
        comparison, written = run(
            args.directories,
            args.out,
            args.retime,
            args.batch,
            args.threads,
            args.warmup,
            args.iters,
            args.repeats,
        )
    except PatholiteError as err:
        print(f"patholite: error: {err}", file=sys.stderr)
        sys.exit(2)
    print_table(comparison, console)
    for f in comparison.failed:
        console.print(f"[bold red]{f['status']}[/]: {f['run_dir']}: {f['error']}")
    for skip in (comparison.retimed or {}).get("skipped", []):
        console.print(
            f"[yellow]not retimed[/]: {skip['run_dir']}/{skip['artifact']}: {escape(skip['reason'])}"
        )
    for path in written:
        console.print(f"wrote {path}")
    if comparison.failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
