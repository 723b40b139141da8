"""``distill``: train ``model=`` (the student) from the frozen teacher the run resolved
(``compression.teacher``, ``pipelines.teacher``); the teacher is recorded too."""

from __future__ import annotations

from omegaconf import DictConfig

from patholite.accelerators.resolve import ResolvedAccelerator
from patholite.artifacts.torch_float import load_float_artifact
from patholite.compress.distill import DISTILLER_KINDS, LEVELS
from patholite.config.checks import choice, require
from patholite.pipelines.stages.base import Stage, StageRun
from patholite.pipelines.tasks import Task


def run(run: StageRun) -> None:
    ctx, teacher = run.ctx, run.ctx.teacher
    # The student is initialised first, from the stage's seed: training a missing teacher uses the RNG too.
    student = run.task.new_network(ctx)
    if teacher.artifact is not None:
        net, _ = load_float_artifact(teacher.artifact)
    else:
        net = run.task.plain_network(ctx, teacher.model, "teacher")
    recorded = run.record_float("teacher_fp32", net, model_cfg=teacher.model)
    fitted = run.task.distill(ctx, student, recorded.net, ema=run.c.ema)
    if fitted.ema_net is None:
        run.current = run.record_float("student_fp32", fitted.net, source=recorded, state=fitted.state)
        return
    raw = run.record_float("student_fp32", fitted.net, source=recorded) if run.c.ema.keep_raw else None
    run.current = run.record_float(
        "student_fp32_ema", fitted.ema_net, source=raw or recorded, state=fitted.state
    )


def check_kd(cfg: DictConfig) -> None:
    """``compression.kd``: what a Distiller is built from (the distill stage, and fine-tunes with
    ``finetune.distill``)."""
    kd, m, c = cfg.compression.kd, cfg.model, cfg.compression
    choice(kd.kind, "compression.kd.kind", DISTILLER_KINDS)
    require(bool(kd.levels), "compression.kd.levels is empty: name at least one of " + ", ".join(LEVELS))
    for level in kd.levels:
        choice(level, "compression.kd.levels[]", LEVELS)
    require(0 <= kd.alpha <= 1, f"compression.kd.alpha={kd.alpha} must lie in [0, 1]")
    require(kd.temperature > 0, f"compression.kd.temperature={kd.temperature} must be > 0")
    require(
        kd.entropy_weight >= 0
        and kd.lesion_weight >= 0
        and kd.attention_weight >= 0
        and kd.feature_weight >= 0,
        "compression.kd.entropy_weight, lesion_weight, attention_weight and feature_weight must be >= 0",
    )
    require(
        kd.lesion_weight == 0,
        f"compression.kd.lesion_weight={kd.lesion_weight}: weighing lesion area needs lesion masks with "
        "every batch, which no dataset hands to the classifier yet; set compression.kd.lesion_weight=0",
    )
    require(
        not kd.kind.startswith("token") or "logits" in kd.levels,
        f"compression.kd.kind={kd.kind} distils through the logits: keep logits in compression.kd.levels",
    )
    for key in ("student_blocks", "teacher_blocks"):
        require(
            kd[key] is None or len(kd[key]) > 0, f"compression.kd.{key}=[] is empty: give indices or null"
        )
    require(
        kd.student_blocks is None
        or kd.teacher_blocks is None
        or len(kd.student_blocks) == len(kd.teacher_blocks),
        f"compression.kd.student_blocks={kd.student_blocks} and teacher_blocks={kd.teacher_blocks} pair up: "
        "give as many of each",
    )
    deep = set(kd.levels) & {"attention", "features"}
    require(
        not deep or m.family == "vit",
        f"compression={c.name}: compression.kd.levels={list(kd.levels)} works on Vision Transformers (heads, "
        f"attention, tokens); model={m.name} is a {m.family}",
    )
    require(
        not deep or not m.pyramid.enabled,
        f"compression={c.name}: attention/feature distillation does not support model.pyramid.enabled=true "
        "yet; use the plain ViT head",
    )
    require(
        not kd.kind.startswith("token") or "distilled" in m.timm_name,
        f"compression.kd.kind=token needs a DeiT student with a distillation token (e.g. "
        f"model=deit_tiny_distilled); model={m.name} ({m.timm_name}) has none",
    )


def check(cfg: DictConfig, task: Task, accelerator: ResolvedAccelerator) -> None:
    check_kd(cfg)


STAGE = Stage(
    name="distill",
    run=run,
    first=True,
    key="kd",
    check=check,
    artifacts={
        "teacher_fp32": "the frozen teacher a student was distilled from",
        "student_fp32": "a distilled student in float",
        "student_fp32_ema": "a distilled student with EMA-averaged weights",
    },
)
