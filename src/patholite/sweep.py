"""End of a Hydra multirun: list every job's status, fail the sweep when a job failed, and compare its jobs,
their distinct artifacts timed again together in one child process (``measure/retime.py``): each job timed
its own minutes apart, on a machine whose speed drifts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from patholite.compare import run as compare_run
from patholite.io import write_json
from patholite.measure.compare import find_records
from patholite.measure.outputs import columns
from patholite.measure.report import print_records
from patholite.measure.retime import RETIMED_FILE, retime
from patholite.records import RECORD_FILE, now, read_record
from patholite.tracking import log_comparison

# Jobs that did not end "ok" in the last sweep of this process; the entry point exits non-zero on them.
FAILED_JOBS: list[dict[str, Any]] = []


def sweep_records(sweep_dir: Path, since: str | None = None) -> list[dict[str, Any]]:
    """The records under ``sweep_dir`` (of jobs started at or after ``since``, an ISO time), in job order."""
    paths = sorted(sweep_dir.glob(f"*/{RECORD_FILE}"), key=lambda p: (len(p.parent.name), p.parent.name))
    records = [read_record(path) for path in paths]
    return [r for r in records if since is None or r["started_at"] >= since]


def timed_in_children(records: list[dict[str, Any]]) -> bool:
    """Whether any job timed its artifacts in a child (``bench.isolation=child``): a sweep that chose the
    quick in-process timing (``debug=fast``) is not timed again at its end."""
    return any(
        str(((art.get("cost") or {}).get("timing") or {}).get("method", "")).startswith("child")
        for r in records
        for art in r.get("artifacts", [])
    )


class SweepSummary(Callback):
    def __init__(self) -> None:
        self.started_at: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started_at = now()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        records = sweep_records(sweep_dir, since=self.started_at)  # a reused sweep dir holds older jobs too
        FAILED_JOBS.clear()
        FAILED_JOBS.extend(
            {"run_dir": r["run_dir"], "status": r["status"], "error": r.get("error")}
            for r in records
            if r["status"] != "ok"
        )
        write_json(
            sweep_dir / "sweep.json",
            {
                "jobs": [
                    {
                        "run_dir": r["run_dir"],
                        "status": r["status"],
                        "overrides": r["job"].get("overrides"),
                        "error": r.get("error"),
                    }
                    for r in records
                ],
                "failed": len(FAILED_JOBS),
            },
        )
        print_records(records, title=f"sweep {sweep_dir}")
        console = Console(stderr=True)
        for job in FAILED_JOBS:
            console.print(f"[bold red]{job['status']}[/]: {job['run_dir']}: {job['error']}")
        console.print(
            f"{len(records) - len(FAILED_JOBS)} of {len(records)} jobs ok; "
            f"summary in {sweep_dir / 'sweep.json'}"
        )
        if len(records) > len(FAILED_JOBS):
            try:  # one timing of the sweep's distinct artifacts, which the comparison then reads
                (sweep_dir / "compare" / RETIMED_FILE).unlink(missing_ok=True)  # an earlier sweep's, here
                found = find_records([sweep_dir])
                retimed = (
                    retime(found, sweep_dir / "compare", minimum=2) if timed_in_children(found) else None
                )
                if retimed is None:
                    console.print(
                        "not retimed: fewer than two distinct artifacts, or the jobs timed in their own "
                        "process (bench.isolation=process: debug=fast); `python -m patholite.compare "
                        f"{sweep_dir} --retime` times them as one"
                    )
                else:
                    console.print(
                        f"retimed {len(retimed['artifacts'])} distinct artifacts together in one process "
                        f"(batch {retimed['batch']}): {sweep_dir / 'compare' / 'retimed.json'}"
                    )
                    for skip in retimed["skipped"]:
                        console.print(
                            f"[yellow]not retimed[/]: {skip['run_dir']}/{skip['artifact']}: {skip['reason']}"
                        )
            except Exception as err:  # noqa: BLE001 - the jobs' own timings stand; the comparison uses them
                console.print(f"[yellow]sweep not retimed[/]: {type(err).__name__}: {err}")
            try:
                comparison, written = compare_run([str(sweep_dir)])
                console.print("comparison: " + "  ".join(str(p) for p in written))
            except Exception as err:  # noqa: BLE001 - the records stand; the comparison is a convenience
                console.print(f"[yellow]no comparison written[/]: {type(err).__name__}: {err}")
                return
            try:  # the comparison and its Pareto plots in the sweep's W&B group, beside its jobs' runs
                choices = OmegaConf.select(config, "hydra.runtime.choices", default=None)
                plots = [p for p in written if p.suffix == ".png"]
                cols = columns(comparison)
                table = (cols, [[row.get(c) for c in cols] for row in comparison.rows])
                files = [p for p in written if p.suffix != ".png"]
                logged = log_comparison(config, sweep_dir, choices, table, files, plots)
                if logged:
                    console.print(f"comparison W&B run: {logged}")
            except Exception as err:  # noqa: BLE001 - tracking never fails a finished sweep
                console.print(f"[yellow]comparison not logged to W&B[/]: {type(err).__name__}: {err}")
