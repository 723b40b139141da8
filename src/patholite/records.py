"""The run record: ``metrics.json`` in every job's output directory, the one result format of patholite,
written alike by every entry point (``entry``: train, bench, slide).

Schema (version ``SCHEMA_VERSION``)::

    {
      "schema_version": 2,
      "entry": "train" | "bench" | "slide",
      "status": "running" | "ok" | "failed" | "interrupted" | "requeued",
      "error": null | "<type>: <message>",         # set when failed, interrupted or requeued
      "traceback": null | "<text>",
      "run_dir": "...",
      "job": {"name", "num", "override_dirname", "overrides": [...], "sweep_dir", "multirun",
              # a train job under SLURM (patholite.requeue):
              "slurm"?: {"job_id" (array jobs: <array id>_<task id>), "restart_count", "requeue_signal",
                         "launcher": "submitit" | "sbatch"},
              "requeues"?: how many times this SLURM job was requeued so far,
              "requeue_events"?: [{"at": ISO-8601, "signal": "SIGUSR1" | ..., "restart_count",
                                   "requeued": bool, "error"?: why scontrol failed}]},
      "started_at": ISO-8601, "finished_at": ISO-8601 | null, "duration_s": float | null,
      "config": {...resolved config...},
      "versions": {"python", "torch", "timm", ...},
      "device": {"requested", "kind", "accelerator", "devices", "strategy", "precision", "eval_device",
                 "int8_engine", "notes", "cpu", "cpu_count", "torch_threads", "machine", "gpu"?, ...,
                 # machine facts (accelerators.machine; absent from records before them: "unknown machine")
                 "cpu_vendor", "cpu_family", "cpu_model", "cpu_stepping", "cpu_microarchitecture",
                 "cpu_features": {"avx2": bool, ..., "amx_bf16": bool} | "unknown", "cpu_physical_cores",
                 "cpu_usable" (this process's affinity), "cpu_quota" (cgroup CPUs | null),
                 "torch_cpu_capability", "machine_key" (12 hex), "machine_label"},
      "wandb": null | {"run_id", "dir", "mode", "group"},
      "artifacts": [ARTIFACT, ...],
      "slides": null | {"n", "ok", "failed", "summary"}   # slide runs: the slides and their summary file
    }

    ARTIFACT = {
      "name": an artifact name (the stages declare theirs: ``pipelines.stages.artifact_names``),
      "path": directory of the reloadable files, "files": [relative file names], "source": name | null,
      "model": the artifact's model option name (a teacher's is not the run's model=),
      "parity": null | {"against": name, "flip_rate", "max_abs_logit_diff", "n_samples"},  # vs its source
      "quality": QUALITY_KEYS: {"accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece",
                  "accuracy_ci95": [low, high] (percentile bootstrap, 1000 resamples),
                  "f1_per_class": {class: f1}, "recall_per_class": {class: recall},
                  "confusion_matrix": [[...]] (rows: true class, columns: predicted), "n_samples"},
      "cost": COST_KEYS: {"params", "flops", "flops_fused_uncounted", "size_bytes",
               "latency_ms": {"<batch>": {"p50", "p90"}}, "throughput_ips": {"<batch>": value},
               "peak_rss_mb", "memory": {"method": "child" | "process", "device_peak_mb",
                          "device_peak_source"? | "device_peak_absent_reason"?, ...},
               "timing": {"method": "child_alternating" | "child" | "process", "sync"?,
                          "timed_with"?, "baseline"?, "ratio_to_baseline"?: {"<batch>": {"median", "min",
                          "max", "per_repeat"}}, "energy_j_per_image"?: {"<batch>": joules},
                          "energy_source"?, "energy_absent_reason"?}, "device", "threads",
               "protocol": {"warmup", "iters", "repeats"}}

``flops`` counts attention (2 FLOPs per multiply-add); ``flops_fused_uncounted`` is torch's count with fused
attention, which it cannot see on CPU. ``peak_rss_mb`` comes from a fresh child process that loads the
artifact and runs the largest batch (``memory.method == "child"``, with ``rss_after_imports_mb`` and
``peak_increase_mb``), or, with ``bench.isolation=process``, is the job's own peak so far (an upper bound).
That child runs the artifact on the run's device; on a GPU or NPU ``memory.device_peak_mb`` is beside it: the
most memory torch's allocator held there (``max_memory_allocated``, reset before the artifact is loaded;
the runtime's own context not counted). On the CPU it is null, with ``device_peak_absent_reason``.
FLOPs are counted on the CPU whatever the run's device, so every row of a run counts alike.
    }

``requeued``: a SLURM job stopped by its warning signal, with its checkpoint written and ``scontrol
requeue`` accepted; the requeued attempt continues in the same folder and overwrites the record.

A job writes the record at start ("running"), so a job killed outright never leaves one claiming success,
and again at the end. Every write is atomic. ``read_record`` reads every version: a version-1 record (before
``entry``; a benchmark's timing ratios at ``cost.ratio_to_baseline``) is upgraded to this shape in memory.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from patholite.io import write_json

SCHEMA_VERSION = 2
ENTRIES = ("train", "bench", "slide")
QUALITY_SCALARS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece")
QUALITY_KEYS = (
    *QUALITY_SCALARS,
    "accuracy_ci95",
    "f1_per_class",
    "recall_per_class",
    "confusion_matrix",
    "n_samples",
)
COST_KEYS = (
    "params",
    "flops",
    "flops_fused_uncounted",
    "size_bytes",
    "latency_ms",
    "throughput_ips",
    "peak_rss_mb",
    "memory",
    "timing",
    "device",
    "threads",
    "protocol",
)
RECORD_FILE = "metrics.json"
STATUSES = ("running", "ok", "failed", "interrupted", "requeued")

_PACKAGES = (
    "patholite",
    "torch",
    "torchvision",
    "timm",
    "lightning",
    "torchmetrics",
    "hydra-core",
    "omegaconf",
    "wandb",
    "numpy",
    "onnxruntime",
    "openslide-python",
    "openslide-bin",
)


@dataclass
class ArtifactRecord:
    name: str
    path: str
    files: list[str]
    quality: dict[str, Any]
    cost: dict[str, Any]
    source: str | None = None
    parity: dict[str, Any] | None = None
    model: str | None = None  # the artifact's own model option (a teacher's differs from the run's model=)


@dataclass
class RunRecord:
    run_dir: str
    config: dict[str, Any]
    job: dict[str, Any] = field(default_factory=dict)
    status: str = "running"
    error: str | None = None
    traceback: str | None = None
    started_at: str = field(default_factory=lambda: now())
    finished_at: str | None = None
    duration_s: float | None = None
    versions: dict[str, str] = field(default_factory=lambda: package_versions())
    device: dict[str, Any] = field(default_factory=dict)
    wandb: dict[str, Any] | None = None
    artifacts: list[ArtifactRecord] = field(default_factory=list)
    entry: str = "train"
    slides: dict[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def path(self) -> Path:
        return Path(self.run_dir) / RECORD_FILE

    def write(self) -> Path:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")
        if self.entry not in ENTRIES:
            raise ValueError(f"entry {self.entry!r} is not one of {ENTRIES}")
        write_json(self.path, asdict(self))
        return self.path

    def finish(self, status: str, error: BaseException | None = None, traceback: str | None = None) -> Path:
        self.status = status
        if error is not None:
            self.error = f"{type(error).__name__}: {error}"
            self.traceback = traceback
        self.finished_at = now()
        start = dt.datetime.fromisoformat(self.started_at)
        self.duration_s = round((dt.datetime.fromisoformat(self.finished_at) - start).total_seconds(), 3)
        return self.write()


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def read_record(path: str | Path) -> dict[str, Any]:
    """A record as a dict in the current schema; ``path`` is the JSON file or the run directory holding
    it."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_FILE
    return upgrade_record(json.loads(path.read_text()))


# Version 1 benchmark records kept these beside the costs; version 2 keeps them in cost.timing.
_V1_BENCH_TIMING = ("ratio_to_baseline", "baseline", "sync", "energy_j_per_image", "energy_source",
                    "energy_absent_reason")  # fmt: skip


def upgrade_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` (any schema version) in the current schema; a newer version than this code is refused."""
    version = int(record.get("schema_version", 1))
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"record schema version {version} is newer than this patholite reads ({SCHEMA_VERSION}); "
            "upgrade patholite"
        )
    if version == 1:
        config = record.get("config") or {}
        bench = (config.get("compression") or {}).get("name") == "bench" or config.get("task_name") == "bench"
        record = {**record, "entry": "bench" if bench else "train", "slides": None, "schema_version": 2}
        for artifact in record.get("artifacts", []):
            cost = artifact.get("cost") or {}
            if "ratio_to_baseline" in cost:
                moved = {k: cost.pop(k) for k in _V1_BENCH_TIMING if k in cost}
                timing = {"method": "child_alternating", **moved}
                if timing.get("baseline") and "timed_with" not in timing:
                    timing["timed_with"] = [a["name"] for a in record["artifacts"]]
                cost["timing"] = {**(cost.get("timing") or {}), **timing}
    return record
