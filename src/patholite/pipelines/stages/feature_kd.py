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

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from patholite.accelerators.resolve import ResolvedAccelerator
from patholite.artifacts.sidecar import read_sidecar
from patholite.artifacts.torch_float import load_float_artifact
from patholite.compress.feature_kd import PROJECTIONS
from patholite.config.checks import choice, require
from patholite.data.unlabelled import KINDS, check_tile_source, unlabelled_tiles
from patholite.errors import ConfigError
from patholite.measure.probe import mean_cosine
from patholite.models.encoder import as_encoder, is_encoder_meta
from patholite.models.factory import build_model
from patholite.models.hub import locate_hub_weights, model_normalisation, wants_hub
from patholite.pipelines.context import RunContext
from patholite.pipelines.stages.base import Stage, StageRun
from patholite.pipelines.tasks import TASKS, Task
from patholite.pipelines.tasks.encoder_fit import Distilled, FrozenEncoder, distil_features
from patholite.pipelines.tasks.encoders import meta_width
from patholite.pipelines.teacher import Teacher, resolve_teachers

log = logging.getLogger(__name__)

MAX_TEACHERS = 4
TEACHER_NAMES = ("teacher_fp32", *(f"teacher_{i}_fp32" for i in range(1, MAX_TEACHERS)))


def teacher_encoder(ctx: RunContext, teacher: Teacher) -> FrozenEncoder:
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
    return FrozenEncoder(
        teacher.named, str(teacher.model.name), net.eval(), [float(v) for v in mean], [float(v) for v in std]
    )


def teacher_sidecar(teacher: Teacher, enc: FrozenEncoder) -> dict[str, Any]:
    """What a teacher's recorded artifact states beyond the run's sidecar: its own normalisation and, for a
    teacher read from an artifact, that artifact's hub provenance (the students inherit its licence)."""
    extra: dict[str, Any] = {"mean": enc.mean, "std": enc.std}
    if teacher.artifact is not None and read_sidecar(teacher.artifact).get("weights_source"):
        extra["weights_source"] = read_sidecar(teacher.artifact)["weights_source"]
    return extra


def run(run: StageRun) -> None:
    ctx, fk = run.ctx, run.c.feature_kd
    # The student is initialised first, from the stage's seed: training a missing teacher uses the RNG too.
    student = run.task.new_network(ctx)
    teachers = resolve_teachers(run.c)
    encoders = [teacher_encoder(ctx, t) for t in teachers]
    recorded = [
        run.record_float(name, enc.net, model_cfg=t.model, meta=teacher_sidecar(t, enc))
        for name, enc, t in zip(TEACHER_NAMES, encoders, teachers, strict=False)
    ]
    width = meta_width(ctx.cfg.model, int(ctx.cfg.dataset.image_size), "the student")
    epochs = int(fk.epochs) if fk.epochs is not None else None
    done = distil_features(ctx, "feature_kd", student, width, encoders, epochs, float(fk.lr), ema=run.c.ema)
    fitted = done.fitted
    net = fitted.ema_net if fitted.ema_net is not None else fitted.net
    name = "student_fp32_ema" if fitted.ema_net is not None else "student_fp32"
    if fitted.ema_net is not None and run.c.ema.keep_raw:
        run.record_float("student_fp32", fitted.net, source=recorded[0])
    run.current = run.record_float(name, net, source=recorded[0])
    run.records[-1].parity["projected_cosine"] = projected_agreement(done, run.current, recorded)


def projected_agreement(done: Distilled, student: Any, teachers: list[Any]) -> dict[str, float]:
    """Mean cosine on the test tiles between the student's embedding through its distillation head and each
    teacher's (standardised as in training): how far the student learned each teacher."""
    out = {}
    with torch.inference_mode():
        for i, rec in enumerate(teachers):
            head = done.distiller.heads[f"t{i}@{done.distiller.sizes[-1]}"].cpu().eval()
            mu, sd = (torch.from_numpy(v) for v in done.stats[f"t{i}"]["cls"])
            out[rec.name] = mean_cosine(head(student.logits.float()), (rec.logits.float() - mu) / sd)
    return out


def check(cfg: DictConfig, task: Task, accelerator: ResolvedAccelerator) -> None:
    c, fk = cfg.compression, cfg.compression.feature_kd
    size = int(cfg.dataset.image_size)
    require(
        accelerator.world_size == 1,
        f"compression={c.name}: feature distillation runs in one process for now (its unlabelled tiles are "
        f"not sharded over {accelerator.world_size} DDP processes); use one device (accelerator=cpu or gpu)",
    )
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
