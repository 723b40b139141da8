"""Trained starting points shared by the jobs of a sweep: teachers, and plain models to prune or quantize.

A network trained with the plain recipe is fully determined by the model, the dataset, the seed and the
schedule; ``cache_key`` hashes exactly those. The entry ``<paths.cache_dir>/trained/<model>-<dataset>-<key>/``
holds a float artifact (``model.safetensors`` + ``artifact.json``), ``key.json`` (what was hashed; written
last, so its presence means "complete") and ``train/`` (the cache training's checkpoints and CSV log; no
W&B run). A file lock makes parallel sweep jobs train it once; an interrupted cache training resumes from
its last checkpoint the next time any job needs it. ``compression=none`` publishes its result here too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from patholite.artifacts.sidecar import SIDECAR
from patholite.artifacts.torch_float import WEIGHTS, save_float_artifact
from patholite.io import write_json
from patholite.models.hub import file_sha256, locate_hub_weights, wants_hub
from patholite.pipelines.context import RunContext
from patholite.pipelines.seed import seed_everything
from patholite.progress import format_duration

log = logging.getLogger(__name__)

KEY_FILE = "key.json"
# Dataset keys that change how fast data loads or is checked, not what is trained on.
_DATASET_NOISE = ("num_workers", "verify_images", "eval_batch_size")
_TRAINER_KEYS = (
    "max_epochs",
    "limit_train_batches",
    "limit_val_batches",
    "gradient_clip_val",
    "accumulate_grad_batches",
    "check_val_every_n_epoch",
    "deterministic",
)


# ModelConfig keys added with hub weights (models/hub.py)
_STAIN_KEYS = ("stain", "stain_vectors")
_HUB_KEYS = ("hub", "revision", "download", "mean", "std", "mpp", "license")


def precision_key(configured: str, resolved: str | None) -> str:
    """The training precision as the cache keys it: what ran, not ``auto`` (a bf16 GPU teacher and an fp16
    NPU teacher are different models). ``auto`` that ran in full precision (the CPU's) stays ``auto``, so
    the entries made on the CPU before keep their keys; ``resolved`` None: the configured value."""
    if configured != "auto" or resolved is None or resolved in ("32-true", "32"):
        return configured
    return resolved


def cache_inputs(
    cfg: DictConfig, model_cfg: DictConfig, world_size: int = 1, precision: str | None = None
) -> dict[str, Any]:
    """Everything that determines the plain training of ``model_cfg`` on ``cfg``'s data (``world_size``:
    DDP processes; same global batch, but another data order, so another model; ``precision``: the resolved
    training precision, ``ResolvedAccelerator.precision``)."""
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    for key in _DATASET_NOISE:
        dataset.pop(key, None)
    # the test split's stain shift never reaches training; stain normalisation, unset, leaves the keys of
    # entries made before it unchanged
    dataset.pop("stain_shift", None)
    if dataset.get("stain_norm") is None:
        dataset.pop("stain_norm", None)
        dataset.pop("stain_reference", None)
    model = OmegaConf.to_container(model_cfg, resolve=True)
    for key in _HUB_KEYS:  # the hub's keys, unset, leave the keys of entries made before them unchanged
        if key == "download" or model.get(key) is None:  # fetching or not changes nothing trained
            model.pop(key, None)
    for key in _STAIN_KEYS:  # the stain front-end, unset, leaves the keys of entries made before it unchanged
        if model.get(key) is None:
            model.pop(key, None)
    inputs = {
        "model": model,
        "dataset": dataset,
        "seed": int(cfg.seed),
        "trainer": {k: OmegaConf.to_container(cfg.trainer, resolve=True)[k] for k in _TRAINER_KEYS},
        "optim": OmegaConf.to_container(cfg.optim, resolve=True),
        "selection": {
            "monitor": cfg.callbacks.monitor,
            "mode": cfg.callbacks.monitor_mode,
            "early_stopping_patience": cfg.callbacks.early_stopping_patience,
        },
        "precision": precision_key(cfg.accelerator.precision, precision),
        "recipe": "plain-v1",  # bump when the plain recipe changes what it trains
    } | ({"ddp_world_size": world_size} if world_size > 1 else {})  # single-process keys stay as they were
    if wants_hub(model_cfg):  # another snapshot of the hub weights is another starting point
        inputs["hub_weights_sha256"] = file_sha256(locate_hub_weights(model_cfg, download=False).weights)
    return inputs


def cache_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def entry_dir(
    cfg: DictConfig, model_cfg: DictConfig, world_size: int = 1, precision: str | None = None
) -> tuple[Path, dict[str, Any]]:
    inputs = cache_inputs(cfg, model_cfg, world_size, precision)
    name = f"{model_cfg.name}-{cfg.dataset.name}-{cache_key(inputs)}"
    return Path(cfg.paths.cache_dir).resolve() / "trained" / name, inputs


def is_complete(entry: Path) -> bool:
    return (entry / KEY_FILE).is_file() and (entry / WEIGHTS).is_file() and (entry / SIDECAR).is_file()


def complete_entries(cache_dir: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every complete entry under ``<cache_dir>/trained`` with what was hashed for it, newest first: for a
    run that looks for a trained model by what it is (``model.smt.encoder_checkpoint=auto``), not by one
    exact key."""
    root = Path(cache_dir).expanduser().resolve() / "trained"
    entries = [e for e in root.iterdir() if e.is_dir() and is_complete(e)] if root.is_dir() else []
    entries.sort(key=lambda e: (e / KEY_FILE).stat().st_mtime, reverse=True)
    return [(e, json.loads((e / KEY_FILE).read_text())) for e in entries]


def _lock(entry: Path) -> FileLock:
    entry.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(entry) + ".lock")


def publish(ctx: RunContext, net: nn.Module, model_cfg: DictConfig | None = None) -> Path:
    """Store a plainly trained ``net`` as the cache entry of ``model_cfg`` (default: the run's model)
    unless one is already there."""
    model_cfg = model_cfg if model_cfg is not None else ctx.cfg.model
    entry, inputs = entry_dir(ctx.cfg, model_cfg, ctx.accelerator.world_size, ctx.accelerator.precision)
    with _lock(entry):
        if not is_complete(entry):
            meta = ctx.artifact_meta(model_cfg)
            save_float_artifact(net, entry, {**meta, "cache_key": entry.name})
            write_json(entry / KEY_FILE, inputs)
            log.info("published the trained %s to the cache: %s", model_cfg.name, entry)
    return entry


def trained_plain(
    ctx: RunContext, model_cfg: DictConfig, role: str, train: Callable[[RunContext], nn.Module]
) -> Path:
    """The cache entry of ``model_cfg`` trained with the plain recipe on this run's data, training it (once,
    under the lock) when absent: ``train(context)`` fits the context's ``model`` and returns the network.
    ``role`` names it in the logs ("teacher", "starting point")."""
    entry, inputs = entry_dir(ctx.cfg, model_cfg, ctx.accelerator.world_size, ctx.accelerator.precision)
    with _lock(entry):
        if is_complete(entry):
            log.info("%s %s: from the cache %s", role, model_cfg.name, entry)
            return entry
        log.info(
            "%s %s: not in the cache; training it with the plain recipe into %s", role, model_cfg.name, entry
        )
        _train_into(ctx, model_cfg, entry, inputs, train)
    return entry


def _train_into(
    ctx: RunContext,
    model_cfg: DictConfig,
    entry: Path,
    inputs: dict[str, Any],
    train: Callable[[RunContext], nn.Module],
) -> None:
    cfg = OmegaConf.create(OmegaConf.to_container(ctx.cfg, resolve=True))
    cfg.model = model_cfg
    work = entry / "train"
    resuming = (work / "checkpoints" / "train").is_dir()
    epochs = EpochLog(f"cache training of {model_cfg.name}", int(cfg.trainer.max_epochs))
    cache_ctx = dataclasses.replace(
        ctx,
        cfg=cfg,
        run_dir=work,
        # no W&B run for a cache entry; its epochs go to the job's log, since no bar of the job shows them
        loggers=[CSVLogger(save_dir=str(work), name="csv"), epochs],
        resume_from=work if resuming else None,
    )
    # Seeded as a compression=none run of this model is: the entry is what the plain recipe makes of its key,
    # not of the random draws the job that happened to ask first had taken (a student's initialisation).
    seed_everything(cfg.seed)
    log.info(
        "%s: %s (%d epochs) in %s", epochs.name, "resuming" if resuming else "starting", epochs.total, work
    )
    net = train(cache_ctx)
    meta = cache_ctx.artifact_meta()
    save_float_artifact(net, entry, {**meta, "cache_key": entry.name})
    write_json(entry / KEY_FILE, inputs)
    log.info("%s: done in %s -> %s", epochs.name, format_duration(epochs.elapsed), entry)


class EpochLog(Logger):
    """A Lightning logger that writes one log line per finished epoch (its validation metrics, the time
    taken and left): a cache training runs inside another job, for minutes to hours, with no display of
    its own."""

    def __init__(self, name: str, total: int) -> None:
        super().__init__()
        self._name = name
        self.total = total
        self._start = time.monotonic()
        self._epoch: int | None = None  # the epoch whose metrics are being logged
        self._first: int | None = None  # the first epoch of this process (a resumed training starts later)
        self._metrics: dict[str, float] = {}

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return "0"

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the CSV log beside it keeps them

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        # Lightning adds the epoch to every metrics dict it logs; a new epoch number means the last one ended
        epoch = metrics.get("epoch")
        if epoch is None:
            return
        epoch = int(epoch)
        if self._epoch is not None and epoch != self._epoch:
            self._epoch_done()
        if self._epoch != epoch:
            self._epoch, self._metrics = epoch, {}
            self._first = epoch if self._first is None else self._first
        # the epoch's validation scores, not the per-class ones (val/f1/<class>): one line stays readable
        self._metrics.update(
            {k: float(v) for k, v in metrics.items() if k.startswith("val/") and k.count("/") == 1}
        )

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._epoch is not None:
            self._epoch_done()
            self._epoch = None

    def _epoch_done(self) -> None:
        done, ran = self._epoch + 1, self._epoch + 1 - self._first
        left = self.elapsed / ran * (self.total - done) if ran > 0 and done < self.total else None
        scores = ", ".join(f"{k}={v:.4g}" for k, v in sorted(self._metrics.items()))
        line = f"{self.name}: epoch {done}/{self.total} done" + (f" ({scores})" if scores else "")
        line += f", elapsed {format_duration(self.elapsed)}"
        log.info(line + (f", left {format_duration(left)}" if left is not None else ""))
