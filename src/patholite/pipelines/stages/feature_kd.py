"""``feature_kd``: label-free feature distillation. ``model=`` (the student, an encoder) learns the embeddings
of one or more teachers (``compression.feature_kd.teachers``, else ``compression.teacher``) on unlabelled
tiles (``compression.feature_kd.tiles``); the run's model is then an encoder, judged by probes
(``tasks.encoders``), and later stages (``ptq``, ``export``) compress it like any float model.

Each teacher is an encoder: a trained run or float artifact, a model option with hub weights (a pathology
foundation model), a weights file, or a model option trained once with the plain recipe on ``dataset=``
(cached). Its embeddings of the clean tiles are computed once per teacher and tile set and cached under
``paths.cache_dir`` (``pipelines.embeddings``), so a sweep over students pays each teacher once.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

from patholite.accelerators import ResolvedAccelerator
from patholite.artifacts.sidecar import read_sidecar
from patholite.artifacts.torch_float import load_float_artifact
from patholite.compress.feature_kd import PROJECTIONS, FeatureDistiller, HistologyAugment
from patholite.config.checks import choice, require
from patholite.data.unlabelled import KINDS, check_tile_source, unlabelled_tiles
from patholite.errors import ConfigError
from patholite.measure.probe import mean_cosine
from patholite.models.encoder import as_encoder, embeddings, is_encoder_meta
from patholite.models.factory import build_model
from patholite.models.hub import locate_hub_weights, model_normalisation, wants_hub
from patholite.modules.encoder import MONITOR, MONITOR_TRAIN, FeatureKdModule
from patholite.pipelines.context import RunContext
from patholite.pipelines.embeddings import cached_embeddings
from patholite.pipelines.fit import fit
from patholite.pipelines.stages.base import Stage, StageRun
from patholite.pipelines.tasks import TASKS, Task
from patholite.pipelines.tasks.encoders import meta_width
from patholite.pipelines.teacher import Teacher, resolve_teachers

log = logging.getLogger(__name__)

MAX_TEACHERS = 4
TEACHER_NAMES = ("teacher_fp32", *(f"teacher_{i}_fp32" for i in range(1, MAX_TEACHERS)))


@dataclass
class TeacherEncoder:
    """A teacher ready to embed tiles: its headless network, the normalisation its weights expect, and the
    digest of its weights (the cache key of its embeddings)."""

    teacher: Teacher
    net: nn.Module
    mean: list[float]
    std: list[float]
    digest: str


def weights_digest(net: nn.Module) -> str:
    """sha256 of a network's state dict (names, shapes, bytes): what its embeddings depend on."""
    h = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def teacher_encoder(ctx: RunContext, teacher: Teacher) -> TeacherEncoder:
    """``teacher``'s headless network and normalisation: an artifact's own, a hub model's, else the
    dataset's. A teacher with no weights of its own is trained once with the plain recipe (cached)."""
    d = ctx.cfg.dataset
    mean, std = [float(v) for v in d.mean], [float(v) for v in d.std]
    size = int(d.image_size)
    if teacher.artifact is not None:
        net, meta = load_float_artifact(teacher.artifact)
        mean, std = list(meta.get("mean") or mean), list(meta.get("std") or std)
        net = net if is_encoder_meta(meta) else as_encoder(net, teacher.named)
    elif wants_hub(teacher.model):
        net = build_model(teacher.model, 0, size)  # a foundation model: its pretrained trunk, no head
        own = model_normalisation(teacher.model, locate_hub_weights(teacher.model))
        mean, std = own if own is not None else (mean, std)
    elif teacher.model.checkpoint:
        net = as_encoder(build_model(teacher.model, ctx.datamodule.num_classes, size), teacher.named)
    else:
        net = as_encoder(TASKS["tiles"].plain_network(ctx, teacher.model, "teacher"), teacher.named)
    net = net.eval()
    return TeacherEncoder(
        teacher, net, [float(v) for v in mean], [float(v) for v in std], weights_digest(net)
    )


class DistillTiles(Dataset):
    """Unlabelled tiles (``indices`` of ``tiles``) with each teacher's standardised embeddings as targets."""

    def __init__(
        self,
        tiles: Dataset,
        indices: list[int],
        targets: dict[str, dict[str, np.ndarray]],
        stats: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
    ) -> None:
        self.tiles, self.indices, self.targets, self.stats = tiles, list(indices), targets, stats

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
        index = self.indices[i]
        image, _ = self.tiles[index]
        targets = {
            t: {
                kind: torch.from_numpy((np.asarray(arr[index], dtype=np.float32) - mu) / sd)
                for kind, arr in per.items()
                for mu, sd in [self.stats[t][kind]]
            }
            for t, per in self.targets.items()
        }
        return image, targets


def standardisation(values: np.ndarray, rows: list[int], on: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std over the training tiles (identity when ``on`` is false): teachers'
    embeddings differ in scale by orders of magnitude, and smooth-L1 would weigh them by it."""
    if not on:
        width = values.shape[1]
        return np.zeros(width, np.float32), np.ones(width, np.float32)
    sample = np.asarray(values[np.sort(np.asarray(rows))], dtype=np.float64)
    return sample.mean(0).astype(np.float32), (sample.std(0) + 1e-6).astype(np.float32)


def run(run: StageRun) -> None:
    ctx, fk = run.ctx, run.c.feature_kd
    # The student is initialised first, from the stage's seed: training a missing teacher uses the RNG too.
    student = run.task.new_network(ctx)
    encoders = [teacher_encoder(ctx, t) for t in resolve_teachers(run.c)]
    recorded = []
    for name, enc in zip(TEACHER_NAMES, encoders, strict=False):
        extra = {"mean": enc.mean, "std": enc.std}
        recorded.append(run.record_float(name, enc.net, model_cfg=enc.teacher.model, meta=extra))

    d = ctx.cfg.dataset
    tiles = unlabelled_tiles(fk.tiles, ctx.datamodule.splits["train"], int(d.image_size))
    train_rows, val_rows = tiles.split(float(fk.tiles.val_fraction), int(fk.tiles.seed))
    log.info("feature_kd: %d unlabelled tiles (%d held out)", len(tiles), len(val_rows))
    kinds = ("cls", "patch") if fk.patch_weight > 0 else ("cls",)
    targets, stats, dims = {}, {}, {}
    for i, enc in enumerate(encoders):
        key = f"t{i}"
        targets[key] = cached_embeddings(
            Path(ctx.cfg.paths.cache_dir),
            embedding_key(enc, tiles.key(), kinds),
            tiles,
            teacher_compute(enc, kinds, ctx.accelerator.device),
            batch_size=int(fk.teacher_batch_size),
            num_workers=int(d.num_workers),
            log_name=enc.teacher.named,
        )
        stats[key] = {
            k: standardisation(v, train_rows, bool(fk.standardize)) for k, v in targets[key].items()
        }
        dims[key] = int(targets[key]["cls"].shape[1])

    width = int(meta_width(ctx.cfg.model, int(d.image_size), "the student"))
    distiller = FeatureDistiller(
        student, width, dims, list(fk.nested), fk.projection, patch=fk.patch_weight > 0
    )
    optim = {
        **ctx.plain("optim"),
        "lr": fk.lr,
        "weight_decay": fk.weight_decay,
        "warmup_epochs": fk.warmup_epochs,
    }
    module = FeatureKdModule(
        distiller,
        d.mean,
        d.std,
        HistologyAugment(fk.augment.flips, fk.augment.rotate90, float(fk.augment.stain_sigma)),
        {
            "cosine_weight": fk.cosine_weight,
            "smooth_l1_weight": fk.smooth_l1_weight,
            "beta": fk.smooth_l1_beta,
            "patch_weight": fk.patch_weight,
        },
        optim,
    )
    data = L.LightningDataModule.from_datasets(
        train_dataset=DistillTiles(tiles, train_rows, targets, stats),
        val_dataset=DistillTiles(tiles, val_rows, targets, stats) if val_rows else None,
        batch_size=int(d.batch_size),
        num_workers=int(d.num_workers),
    )
    epochs = int(fk.epochs) if fk.epochs is not None else None
    fitted = fit(
        ctx,
        module,
        "feature_kd",
        epochs,
        ema=run.c.ema,
        datamodule=data,
        monitor=MONITOR if val_rows else MONITOR_TRAIN,
    )
    net = fitted.ema_net if fitted.ema_net is not None else fitted.net
    name = "student_fp32_ema" if fitted.ema_net is not None else "student_fp32"
    if fitted.ema_net is not None and run.c.ema.keep_raw:
        run.record_float("student_fp32", fitted.net, source=recorded[0])
    run.current = run.record_float(name, net, source=recorded[0])
    run.records[-1].parity["projected_cosine"] = projected_agreement(
        distiller, net, run.current, recorded, stats
    )


def projected_agreement(
    distiller: FeatureDistiller, net: nn.Module, student: Any, teachers: list[Any], stats: dict
) -> dict[str, float]:
    """Mean cosine on the test tiles between the student's embedding through its distillation head and each
    teacher's (standardised as in training): how far the student learned each teacher."""
    out = {}
    with torch.inference_mode():
        for i, rec in enumerate(teachers):
            head = distiller.heads[f"t{i}@{distiller.sizes[-1]}"].cpu().eval()
            mu, sd = (torch.from_numpy(v) for v in stats[f"t{i}"]["cls"])
            out[rec.name] = mean_cosine(head(student.logits.float()), (rec.logits.float() - mu) / sd)
    return out


def embedding_key(enc: TeacherEncoder, tiles_key: dict[str, Any], kinds: tuple[str, ...]) -> dict[str, Any]:
    """What a teacher's cached embeddings depend on: its weights and input, which embeddings, the tiles."""
    return {
        "version": 1,
        "teacher": enc.teacher.model.name,
        "weights_sha256": enc.digest,
        "mean": enc.mean,
        "std": enc.std,
        "embeddings": list(kinds),
        "tiles": tiles_key,
    }


def teacher_compute(enc: TeacherEncoder, kinds: tuple[str, ...], device: Any):
    """uint8 tiles -> the teacher's named embeddings of them, clean (no augmentation)."""
    net = enc.net.to(device)
    mean = torch.tensor(enc.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(enc.std, device=device).view(1, 3, 1, 1)

    @torch.inference_mode()
    def compute(tiles: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (tiles.to(device).float() / 255.0 - mean) / std
        pooled, patch = embeddings(net, x, enc.teacher.named)
        found = {"cls": pooled, "patch": patch}
        return {k: found[k].float().cpu() for k in kinds}

    return compute


def check(cfg: DictConfig, task: Task, accelerator: ResolvedAccelerator) -> None:
    c, fk = cfg.compression, cfg.compression.feature_kd
    size = int(cfg.dataset.image_size)
    choice(fk.projection, "compression.feature_kd.projection", PROJECTIONS)
    for key in ("cosine_weight", "smooth_l1_weight", "patch_weight"):
        require(fk[key] >= 0, f"compression.feature_kd.{key}={fk[key]} must be >= 0")
    require(
        fk.cosine_weight + fk.smooth_l1_weight > 0,
        "compression.feature_kd.cosine_weight and smooth_l1_weight are both 0: nothing would be learned",
    )
    require(fk.smooth_l1_beta > 0, f"compression.feature_kd.smooth_l1_beta={fk.smooth_l1_beta} must be > 0")
    require(fk.lr > 0, f"compression.feature_kd.lr={fk.lr} must be > 0")
    require(fk.epochs is None or fk.epochs >= 1, f"compression.feature_kd.epochs={fk.epochs} must be >= 1")
    require(fk.teacher_batch_size >= 1, "compression.feature_kd.teacher_batch_size must be >= 1")
    require(fk.augment.stain_sigma >= 0, "compression.feature_kd.augment.stain_sigma must be >= 0")
    choice(fk.tiles.kind, "compression.feature_kd.tiles.kind", KINDS)
    check_tile_source(fk.tiles)
    if fk.tiles.kind == "images":  # a walk of the folder: an empty tile source fails here, not mid-run
        unlabelled_tiles(fk.tiles, None, size)
    width = meta_width(cfg.model, size, f"the student model={cfg.model.name}")
    bad = [n for n in fk.nested if not 1 <= int(n) <= width]
    require(
        not bad,
        f"compression.feature_kd.nested={list(fk.nested)}: {bad} exceed the student's embedding width "
        f"{width} (model={cfg.model.name}); give sizes from 1 to {width}",
    )
    teachers = resolve_teachers(c)
    require(
        len(teachers) <= MAX_TEACHERS,
        f"compression.feature_kd.teachers lists {len(teachers)} teachers; at most {MAX_TEACHERS}",
    )
    for teacher in teachers:
        check_teacher_encoder(cfg, teacher)


def check_teacher_encoder(cfg: DictConfig, teacher: Teacher) -> None:
    """A teacher is an encoder whose embedding can be read at the student's input size."""
    size = int(cfg.dataset.image_size)
    if teacher.model.family not in ("vit", "cnn"):
        raise ConfigError(
            f"{teacher.named} is a {teacher.model.family} model, not an encoder: no tile embedding can be "
            "read from it; distil from a timm ViT or CNN (a trained run, a model option, a foundation model)"
        )
    if teacher.artifact is not None:
        theirs = int(read_sidecar(teacher.artifact).get("image_size") or size)
        require(
            theirs == size,
            f"{teacher.named} takes {theirs}-px tiles, the student {size}-px ones; set "
            f"dataset.image_size={theirs} or distil from a teacher trained at {size} px",
        )
    meta_width(teacher.model, size, teacher.named)
    if wants_hub(teacher.model):
        locate_hub_weights(teacher.model)  # in the local cache, or fetched now with download=true


STAGE = Stage(
    name="feature_kd",
    run=run,
    first=True,
    key="feature_kd",
    tasks=("encoders",),
    task="encoders",
    check=check,
    artifacts={
        **{name: "a frozen teacher encoder a student learned from, without labels" for name in TEACHER_NAMES},
        "student_fp32": "an encoder distilled from its teachers' embeddings without labels",
        "student_fp32_ema": "a distilled encoder with EMA-averaged weights",
    },
)
