"""Many run records -> one comparison: a row per artifact, ratios against a baseline, Pareto fronts.

The baseline of a row is the ``fp32`` artifact of a ``compression=none`` job with the same model, dataset and
accelerator (the same sweep and seed preferred) when the records hold one, else the row's own ``source``
artifact, else its record's first artifact. A plain row is its own baseline. A baseline from another run is
taken only from the same machine (``machine_key``, plus the GPU): a latency ratio across CPUs measures the
CPUs, not the technique.

Every row names its machine (``machine``: a label such as "AMD EPYC (Zen 4: avx512_vnni, avx512_bf16), 2
cores"; ``machine_key``). Records written before machine facts are "unknown machine". ``Comparison.machines``
lists the distinct machines; more than one (unknown included) makes ``machine_warning`` say so.

A sweep retimed as one (``measure/retime.py``, ``retimed.json``) adds to each row it timed the figures of
that one child: ``retimed_ms_b<B>``, ``retimed_speedup_b<B>`` (throughput ratio to the one baseline artifact
timed beside it, median over repeats, with ``_min``/``_max``), ``artifact_id`` (the content digest) and
``shared_with`` (the jobs that recorded the same files); ``retime_line`` says so in the table's caption.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patholite.accelerators.machine import machine_identity, machine_label
from patholite.errors import PatholiteError
from patholite.records import QUALITY_SCALARS, RECORD_FILE, read_record

BASELINE_TECHNIQUE, BASELINE_ARTIFACT = "none", "fp32"


@dataclass(frozen=True)
class Machine:
    """One machine the rows ran on: ``key`` is None for records without machine facts."""

    key: str | None
    label: str
    rows: int


@dataclass
class Comparison:
    rows: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    batch_sizes: list[int | str]  # batch sizes, then named units (slide)
    machines: list[Machine] = field(default_factory=list)  # distinct, in the order rows first name them
    retimed: dict[str, Any] | None = None  # retimed.json, when the rows were timed again as one

    @property
    def retime_batch(self) -> int | None:
        return self.retimed["batch"] if self.retimed else None

    @property
    def retime_line(self) -> str | None:
        """What the ``retimed_*`` columns are, as a caption line; None when nothing was retimed."""
        r = self.retimed
        if not r:
            return None
        p, rows = r["protocol"], sum(1 for row in self.rows if row.get("artifact_id"))
        machine = (r.get("machine") or {}).get("machine_label") or machine_label(r.get("machine"))
        line = (
            f"throughput ratios (retimed_speedup_b{r['batch']}) retimed together in ONE child process at "
            f"batch {r['batch']}, alternating ({p['repeats']} repeats x {p['iters']} iterations, "
            f"{r['threads']} threads) on {r['retimed_at'][:19]}Z, {machine}; to {r['baseline']['label']}; "
            f"{len(r['artifacts'])} distinct artifacts for {rows} of {len(self.rows)} rows"
        )
        if r.get("skipped"):
            line += f"; {len(r['skipped'])} not retimed (see retimed.json)"
        return line + "; p50_ms_b* are each job's own timing"

    @property
    def mixed_machines(self) -> bool:
        return len(self.machines) > 1

    @property
    def machine_line(self) -> str | None:
        """The one machine every row ran on, as a header line; None when there are none or several."""
        if len(self.machines) != 1:
            return None
        m = self.machines[0]
        if m.key is None:
            return f"machine: {m.label} (records without machine facts: their CPUs cannot be told apart)"
        return f"machine: {m.label} [{m.key}]"

    @property
    def machine_warning(self) -> str | None:
        """A warning naming each machine when the rows come from more than one; None otherwise."""
        if not self.mixed_machines:
            return None
        named = "; ".join(
            f"{m.label} [{m.key or 'no machine_key'}]: {m.rows} row{'s' * (m.rows != 1)}"
            for m in self.machines
        )
        return (
            f"WARNING: these rows come from {len(self.machines)} different machines, so their latencies and "
            f"throughputs are not comparable across machines (compare only rows of one machine): {named}"
        )


def find_records(directories: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every run record under the given sweep or run directories, in path order."""
    records = []
    for directory in directories:
        directory = Path(directory)
        if not directory.is_dir():
            raise PatholiteError(f"{directory} is not a directory; give sweep or run directories")
        for path in sorted(directory.rglob(RECORD_FILE)):
            if "wandb" in path.relative_to(directory).parts[:-1]:
                continue  # a W&B run's copy of its job's record (tracking saves it there), not another run
            record = read_record(path)
            record.setdefault("run_dir", str(path.parent))
            records.append(record)
    if not records:
        raise PatholiteError(f"no {RECORD_FILE} under {', '.join(map(str, directories))}")
    return records


def _row(record: dict[str, Any], art: dict[str, Any]) -> dict[str, Any]:
    cfg, q, c = record.get("config", {}), art["quality"], art["cost"]
    row = {
        "run_dir": record["run_dir"],
        "sweep": (record.get("job") or {}).get("sweep_dir") or record["run_dir"],
        "seed": cfg.get("seed"),
        "technique": cfg.get("compression", {}).get("name", "?"),
        "artifact": art["name"],
        "source": art.get("source"),
        "model": art.get("model") or cfg.get("model", {}).get("name", "?"),
        "dataset": cfg.get("dataset", {}).get("name", "?"),
        "accelerator": record.get("device", {}).get("kind") or cfg.get("accelerator", {}).get("name", "?"),
        "machine": machine_label(record.get("device")),
        "machine_key": machine_identity(record.get("device")),
        **{key: q.get(key) for key in QUALITY_SCALARS},
        "flip_rate": (art.get("parity") or {}).get("flip_rate"),  # top-1 changes against its source
        "params": c.get("params"),
        "gflops": c["flops"] / 1e9 if c.get("flops") is not None else None,
        "size_mb": c["size_bytes"] / 1e6 if c.get("size_bytes") is not None else None,
        "peak_rss_mb": c.get("peak_rss_mb"),
    }
    for batch, lat in c.get("latency_ms", {}).items():
        row[f"p50_ms_b{batch}"] = lat["p50"]
    for batch, ips in c.get("throughput_ips", {}).items():
        row[f"ips_b{batch}"] = ips
    return row


def _is_plain(row: dict[str, Any]) -> bool:
    return row["technique"] == BASELINE_TECHNIQUE and row["artifact"] == BASELINE_ARTIFACT


def _baseline(row: dict[str, Any], plain: list[dict[str, Any]], own: list[dict[str, Any]]) -> dict[str, Any]:
    """The row itself if plain; else the closest plain row (same sweep and seed first); else its source."""
    if _is_plain(row):
        return row
    what = ("model", "dataset", "accelerator", "machine_key")
    same = [p for p in plain if all(p[k] == row[k] for k in what)]
    for narrower in (
        lambda p: p["sweep"] == row["sweep"] and p["seed"] == row["seed"],
        lambda p: p["sweep"] == row["sweep"],
        lambda p: True,
    ):
        hits = [p for p in same if narrower(p)]
        if hits:
            return hits[0]
    return next((o for o in own if o["artifact"] == row["source"]), own[0])


def _ratios(rows: list[dict[str, Any]], batch_sizes: list[int]) -> None:
    """Add baseline name and ratios (size, latency per batch) and accuracy difference to every row."""
    plain = [r for r in rows if _is_plain(r)]
    by_run: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_run.setdefault(r["run_dir"], []).append(r)
    for r in rows:
        base = _baseline(r, plain, by_run[r["run_dir"]])
        r["baseline"] = f"{base['technique']}/{base['artifact']}"
        r["accuracy_delta_pp"] = _diff(r["accuracy"], base["accuracy"], 100)
        r["size_ratio"] = _div(r["size_mb"], base["size_mb"])
        for b in batch_sizes:
            r[f"latency_ratio_b{b}"] = _div(r.get(f"p50_ms_b{b}"), base.get(f"p50_ms_b{b}"))


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _diff(a: float | None, b: float | None, scale: float) -> float | None:
    return None if a is None or b is None else (a - b) * scale


def compare(records: list[dict[str, Any]]) -> Comparison:
    rows, failed = [], []
    for record in records:
        if record.get("status") != "ok":
            failed.append(
                {
                    "run_dir": record["run_dir"],
                    "status": record.get("status"),
                    "error": record.get("error"),
                    "overrides": " ".join(record.get("job", {}).get("overrides") or []),
                }
            )
            continue
        rows += [_row(record, art) for art in record.get("artifacts", [])]
    batch_sizes = sorted(
        {_unit(k[len("p50_ms_b") :]) for r in rows for k in r if k.startswith("p50_ms_b")},
        key=lambda b: (isinstance(b, str), b),
    )
    _ratios(rows, batch_sizes)
    return Comparison(rows=rows, failed=failed, batch_sizes=batch_sizes, machines=machines(rows))


def apply_retimed(comparison: Comparison, retimed: dict[str, Any] | None) -> Comparison:
    """Add the figures of one retiming child (``retimed.json``) to the rows it timed, by job and artifact."""
    comparison.retimed = retimed
    if not retimed:
        return comparison
    b = retimed["batch"]
    by_row = {(j["run_dir"], j["artifact"]): a for a in retimed["artifacts"] for j in a["jobs"]}
    for row in comparison.rows:
        a = by_row.get((row["run_dir"], row["artifact"]))
        if a is None:
            continue
        ratio = a["throughput_ratio"]
        row.update(
            {
                "artifact_id": a["digest"][:12],
                "shared_with": " ".join(j["job"] for j in a["jobs"]) if len(a["jobs"]) > 1 else None,
                f"retimed_ms_b{b}": a["latency_ms"]["p50"],
                f"retimed_speedup_b{b}": ratio["median"],
                f"retimed_speedup_b{b}_min": ratio["min"],
                f"retimed_speedup_b{b}_max": ratio["max"],
                "retimed_label": a["label"],
            }
        )
    return comparison


def distinct_rows(comparison: Comparison) -> list[dict[str, Any]]:
    """The rows with one per artifact content: a retimed row stands for every row of its ``artifact_id``
    (the first in order); rows never retimed are each their own."""
    seen: set[str] = set()
    out = []
    for row in comparison.rows:
        key = row.get("artifact_id")
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        out.append(row)
    return out


def machines(rows: list[dict[str, Any]]) -> list[Machine]:
    """The distinct machines of the rows (by ``machine_key``; unknown is one more), in first-seen order."""
    seen: dict[str | None, list[dict[str, Any]]] = {}
    for r in rows:
        seen.setdefault(r["machine_key"], []).append(r)
    return [Machine(key=key, label=rs[0]["machine"], rows=len(rs)) for key, rs in seen.items()]


def _unit(key: str) -> int | str:
    """A latency column's unit: a batch size, or a named unit such as ``slide`` (slide-level models)."""
    return int(key) if key.isdigit() else key


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower cost (x) and higher quality (y), sorted by cost."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])
