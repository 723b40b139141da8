"""A sweep timed as one: every distinct artifact of many run records timed together in ONE fresh child.

Each job of a sweep times its own artifacts, minutes apart from the other jobs, on a machine whose speed
drifts by up to 1.6x: its ratios hold within the job, its absolute figures do not compare across jobs (the
demo's teacher, one file recorded by two jobs, came out at 2.65 ms and 3.3 ms). ``retime`` takes the
records' artifacts, keeps one of each content (``artifacts.digest``: a teacher two jobs recorded is one
artifact), and times them with the alternating protocol of ``measure/timing.py`` at one batch size, with
throughput ratios per repeat to one baseline artifact timed in the same child.

The result, with the child's machine facts, is ``retimed.json`` beside the comparison (``RETIMED_FILE``);
the jobs' own measurements stay in their records. ``measure/compare.apply_retimed`` reads it into the rows.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from patholite.artifacts.digest import artifact_digest
from patholite.artifacts.load import LOADERS, NOT_LOADABLE
from patholite.artifacts.sidecar import SIDECAR, read_sidecar
from patholite.errors import ConfigError, PatholiteError
from patholite.io import write_json
from patholite.measure.compare import BASELINE_ARTIFACT, BASELINE_TECHNIQUE
from patholite.measure.timing import time_artifacts
from patholite.records import now

RETIMED_FILE = "retimed.json"
VERSION = 1
DEFAULT_BATCH = 8


@dataclass
class Distinct:
    """One artifact content, and every (job, artifact name) of the records that holds a copy of it."""

    digest: str
    path: Path  # the first copy: the one the child loads
    kind: str
    image_size: int
    jobs: list[dict[str, Any]] = field(default_factory=list)
    protocols: list[dict[str, Any]] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)

    @property
    def plain(self) -> bool:
        return any(
            j["technique"] == BASELINE_TECHNIQUE and j["artifact"] == BASELINE_ARTIFACT for j in self.jobs
        )

    @property
    def label(self) -> str:
        """The artifact's name and model, with each job that recorded it (``num:technique``)."""
        first = self.jobs[0]
        names = list(dict.fromkeys(j["artifact"] for j in self.jobs))
        jobs = ", ".join(j["job"] for j in self.jobs)
        return f"{first['model']}/{'='.join(names)} [{jobs}]"


def job_label(record: dict[str, Any]) -> str:
    """A short name of a record's job: its number in the sweep and its technique (``2:kd_ema``)."""
    num = (record.get("job") or {}).get("num")
    technique = (record.get("config") or {}).get("compression", {}).get("name", "?")
    where = str(num) if num is not None else Path(record["run_dir"]).name
    return f"{where}:{technique}"


def check_batch(batch: int) -> int:
    """The batch size to retime and plot at: a positive integer."""
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ConfigError(
            f"--batch {batch}: the batch size to time and plot must be a positive integer, e.g. 8"
        )
    return batch


def _why_not(art: dict[str, Any]) -> str | None:
    """Why a recorded artifact cannot be retimed (None: it can)."""
    latency = (art.get("cost") or {}).get("latency_ms") or {}
    if not any(str(b).isdigit() for b in latency):
        return "not timed per batch in its record (a slide-level model, or its timing never ran)"
    path = Path(art.get("path") or "")
    if not art.get("path") or not path.is_dir():
        return f"its folder {path} is missing"
    if not (path / SIDECAR).is_file():
        return f"{SIDECAR} is missing in {path}"
    missing = [f for f in art.get("files") or [] if not (path / f).is_file()]
    if missing:
        return f"files missing in {path}: {', '.join(missing)}"
    try:
        kind = read_sidecar(path).get("kind")
    except ValueError as err:
        return f"its {SIDECAR} is not JSON ({err})"
    if kind in NOT_LOADABLE:
        return f"{kind!r} is {NOT_LOADABLE[kind]}"
    if kind not in LOADERS:  # the one registry of kinds: a kind added there is retimed too
        return f"unknown artifact kind {kind!r}"
    return None


def collect(records: list[dict[str, Any]]) -> tuple[list[Distinct], list[dict[str, Any]]]:
    """The distinct timed artifacts of ``ok`` records (by content, in record order), and the recorded
    artifacts that cannot be timed, each with its reason."""
    distinct: dict[str, Distinct] = {}
    skipped: list[dict[str, Any]] = []
    for record in records:
        if record.get("status") != "ok":
            continue
        cfg = record.get("config") or {}
        for art in record.get("artifacts", []):
            where = {"run_dir": record["run_dir"], "artifact": art["name"], "path": art.get("path")}
            reason = _why_not(art)
            if reason:
                skipped.append({**where, "reason": reason})
                continue
            path = Path(art["path"])
            meta = read_sidecar(path)
            digest = artifact_digest(path)
            entry = distinct.setdefault(
                digest,
                Distinct(digest, path, meta["kind"], int(meta.get("image_size") or 224)),
            )
            entry.jobs.append(
                {
                    **where,
                    "job": job_label(record),
                    "technique": cfg.get("compression", {}).get("name", "?"),
                    "model": art.get("model") or cfg.get("model", {}).get("name", "?"),
                }
            )
            cost = art.get("cost") or {}
            if cost.get("protocol"):
                entry.protocols.append(cost["protocol"])
            if cost.get("threads"):
                entry.threads.append(int(cost["threads"]))
    return list(distinct.values()), skipped


def _mode(values: list[Any], default: Any) -> Any:
    """The most common value (the first seen on a tie), or ``default`` when there are none."""
    return Counter(values).most_common(1)[0][0] if values else default


def retime(
    records: list[dict[str, Any]],
    out_dir: str | Path,
    batch: int = DEFAULT_BATCH,
    threads: int | None = None,
    warmup: int | None = None,
    iters: int | None = None,
    repeats: int | None = None,
    device: str = "cpu",
    minimum: int = 1,
) -> dict[str, Any] | None:
    """Time every distinct artifact of ``records`` in one child at ``batch``, write ``out_dir/retimed.json``
    and return it. Threads and protocol (warmup, iterations, repeats) are the records' own unless given.
    None, and nothing written, when fewer than ``minimum`` artifacts can be timed (a sweep with one)."""
    check_batch(batch)
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads}: give at least 1, or leave it out for the records' own")
    distinct, skipped = collect(records)
    if not distinct:
        reasons = "; ".join(f"{s['run_dir']}/{s['artifact']}: {s['reason']}" for s in skipped[:5])
        raise PatholiteError(
            "--retime: nothing to time: no ok record lists a timed artifact whose files are on disk"
            + (f" ({reasons})" if reasons else "")
            + "; give sweep or run folders whose jobs finished"
        )
    # the baseline first: the child's ratios are to its first artifact
    base = next((d for d in distinct if d.plain), distinct[0])
    timed = [base] + [d for d in distinct if d is not base]
    for d in timed[1:]:
        if d.image_size != base.image_size:
            skipped += [
                {
                    **{k: j[k] for k in ("run_dir", "artifact", "path")},
                    "reason": f"input size {d.image_size} px differs from the baseline's "
                    f"{base.image_size} px: a throughput ratio across input sizes measures the sizes",
                }
                for j in d.jobs
            ]
    timed = [d for d in timed if d.image_size == base.image_size]
    if len(timed) < minimum:
        return None
    protocols = [p for d in timed for p in d.protocols]
    protocol = {
        key: given if given is not None else int(_mode([p[key] for p in protocols if key in p], default))
        for key, given, default in (("warmup", warmup, 10), ("iters", iters, 30), ("repeats", repeats, 3))
    }
    for key, value in protocol.items():
        if value < (0 if key == "warmup" else 1):
            raise ConfigError(f"--{key} {value}: give at least {0 if key == 'warmup' else 1}")
    threads = threads if threads is not None else _mode([t for d in timed for t in d.threads], None)
    bench = SimpleNamespace(batch_sizes=[batch], threads=threads, **protocol)
    with tempfile.TemporaryDirectory(prefix="patholite-retime-") as tmp:
        # the child names each artifact by its folder's name; copies from different jobs share names
        # ("fp32"), so each is linked under its own
        links = []
        for i, d in enumerate(timed):
            link = Path(tmp) / f"a{i:03d}"
            link.symlink_to(d.path.resolve(), target_is_directory=True)
            links.append(link)
        timing = time_artifacts(links, base.image_size, bench, device)
    artifacts = []
    for i, d in enumerate(timed):
        got = timing["artifacts"][f"a{i:03d}"]
        ratio = got["ratio_to_baseline"][str(batch)]
        speedups = [1 / r for r in ratio["per_repeat"]]  # throughput ratio: baseline latency / this one's
        artifacts.append(
            {
                "digest": d.digest,
                "path": str(d.path),
                "kind": d.kind,
                "label": d.label,
                "jobs": [
                    {k: j[k] for k in ("run_dir", "artifact", "job", "technique", "model")} for j in d.jobs
                ],
                "latency_ms": got["latency_ms"][str(batch)],
                "throughput_ips": got["throughput_ips"][str(batch)],
                "latency_ratio": ratio,
                "throughput_ratio": {
                    "median": round(statistics.median(speedups), 4),
                    "min": round(min(speedups), 4),
                    "max": round(max(speedups), 4),
                    "per_repeat": [round(s, 4) for s in speedups],
                },
            }
        )
    result = {
        "version": VERSION,
        "retimed_at": now(),
        "method": "child_alternating",
        "batch": batch,
        "image_size": base.image_size,
        "device": timing["device"],
        "threads": timing["threads"],
        "sync": timing["sync"],
        "protocol": protocol,
        "machine": timing.get("machine"),
        "baseline": {"digest": base.digest, "label": base.label},
        "artifacts": artifacts,
        "skipped": skipped,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / RETIMED_FILE, result)
    return result


def read_retimed(out_dir: str | Path) -> dict[str, Any] | None:
    """``retimed.json`` in ``out_dir``, or None when there is none (or it is of another version)."""
    path = Path(out_dir) / RETIMED_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise PatholiteError(f"{path} is not JSON ({err}); delete it or run compare --retime again") from err
    return data if data.get("version") == VERSION else None
