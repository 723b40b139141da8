"""The run record: ``metrics.json`` in every job's output directory, the one result format of patholite.

Schema (version ``SCHEMA_VERSION``)::

    {
      "schema_version": 1,
      "status": "running" | "ok" | "failed" | "interrupted",
      "error": null | "<type>: <message>",         # set when failed or interrupted
      "traceback": null | "<text>",
      "run_dir": "...",
      "job": {"name", "num", "override_dirname", "overrides": [...], "sweep_dir", "multirun"},
      "started_at": ISO-8601, "finished_at": ISO-8601 | null, "duration_s": float | null,
      "config": {...resolved config...},
      "versions": {"python", "torch", "timm", ...},
      "device": {"requested", "kind", "accelerator", "devices", "strategy", "precision", "eval_device",
                 "int8_engine", "notes", "cpu", "cpu_count", "torch_threads", "machine", "gpu"?, ...},
      "wandb": null | {"run_id", "dir", "mode", "group"},
      "artifacts": [ARTIFACT, ...]
    }

    ARTIFACT = {
      "name": one of ARTIFACT_NAMES,
      "path": directory of the reloadable files, "files": [relative file names], "source": name | null,
      "model": the artifact's model option name (a teacher's is not the run's model=),
      "parity": null | {"against": name, "flip_rate", "max_abs_logit_diff", "n_samples"},  # vs its source
      "quality": QUALITY_KEYS: {"accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece",
                  "accuracy_ci95": [low, high] (percentile bootstrap, 1000 resamples),
                  "f1_per_class": {class: f1}, "recall_per_class": {class: recall},
                  "confusion_matrix": [[...]] (rows: true class, columns: predicted), "n_samples"},
      "cost": COST_KEYS: {"params", "flops", "flops_fused_uncounted", "size_bytes",
               "latency_ms": {"<batch>": {"p50", "p90"}}, "throughput_ips": {"<batch>": value},
               "peak_rss_mb", "memory": {"method": "child" | "process", ...},
               "timing": {"method": "child_alternating" | "child" | "process", "sync"?,
                          "timed_with"?, "baseline"?, "ratio_to_baseline"?: {"<batch>": {"median", "min",
                          "max", "per_repeat"}}}, "device", "threads",
               "protocol": {"warmup", "iters", "repeats"}}

``flops`` counts attention (2 FLOPs per multiply-add); ``flops_fused_uncounted`` is torch's count with fused
attention, which it cannot see on CPU. ``peak_rss_mb`` comes from a fresh child process that loads the
artifact and runs the largest batch (``memory.method == "child"``, with ``rss_after_imports_mb`` and
``peak_increase_mb``), or, with ``bench.isolation=process``, is the job's own peak so far (an upper bound).
    }

A job writes the record at start ("running"), so a job killed outright never leaves one claiming success,
and again at the end. Every write is atomic.
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

SCHEMA_VERSION = 1
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
STATUSES = ("running", "ok", "failed", "interrupted")

# The artifact vocabulary: every evaluated model is one of these.
ARTIFACT_NAMES = {
    "fp32": "the trained float model (teacher / plain training)",
    "fp32_ema": "the float model with EMA-averaged weights",
    "teacher_fp32": "the frozen teacher a student was distilled from",
    "student_fp32": "a distilled student in float",
    "student_fp32_ema": "a distilled student with EMA-averaged weights",
    "pruned_ema": "pruned and fine-tuned, EMA-averaged weights",
    "lowrank_ema": "Nystrom low-rank attention, fine-tuned, EMA-averaged weights",
    "int8_dynamic": "torch.ao dynamic INT8 of Linear layers (x86/fbgemm), LayerNorm/Softmax in float",
    "int8_static_ort": "static INT8 QDQ through ONNX Runtime",
    "int8_dynamic_ort": "dynamic INT8 (MatMul/Gemm) through ONNX Runtime",
    "int8_mixed": "per-layer mixed precision (INT8 where the task tolerates it)",
    "int8_qat": "quantization-aware trained, converted to INT8",
    "pruned": "structurally pruned (heads, MLP channels) and fine-tuned",
    "lowrank": "Nystrom low-rank attention",
    "onnx_fp32": "float ONNX export run with ONNX Runtime",
    "fp32_compile": "the float model run through torch.compile (inductor), benchmark only",
    # slide-level models (model=smt and its baselines); quality per slide, cost per slide
    "smt_fp32": "R3's SMT in float: thumbnail plus 1 + K + K^2 focused regions per slide",
    "smt_int8_dynamic": "SMT with torch.ao dynamic INT8 Linear layers in every encoder",
    "smt_int8_qat": "SMT fine-tuned with fake-quantized Linear weights (dynamic QAT), then dynamic INT8",
    "tiling_max": "full tiling of the tissue with the patch classifier, max pooling of tile scores (R3)",
    "tiling_mean": "full tiling of the tissue with the patch classifier, mean pooling of tile scores",
    "mil_gated": "gated-attention MIL (CLAM-SB-like) over the patch classifier's tile embeddings",
}

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

    def __post_init__(self) -> None:
        if self.name not in ARTIFACT_NAMES:
            raise ValueError(f"artifact name {self.name!r} is not in the vocabulary {sorted(ARTIFACT_NAMES)}")


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
    schema_version: int = SCHEMA_VERSION

    @property
    def path(self) -> Path:
        return Path(self.run_dir) / RECORD_FILE

    def write(self) -> Path:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")
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
    """A record as a dict; ``path`` is the JSON file or the run directory holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_FILE
    return json.loads(path.read_text())
