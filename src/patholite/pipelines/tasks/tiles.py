"""Tile classifiers (``model.family`` vit or cnn): trained on labelled tiles with ``ClassifierModule``,
judged on the test split's tiles (quality, cost with the bench protocol, parity), and on the CPU timed
together at the run's end."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from patholite.artifacts.qat import save_qat_artifact
from patholite.artifacts.torch_float import load_float_artifact
from patholite.compress.distill import Distiller
from patholite.compress.qat import convert_qat, prepare_qat
from patholite.config.checks import require
from patholite.data import HistologyDataModule, build_datamodule
from patholite.measure.evaluate import artifact_record, predict
from patholite.models.fits import patch_size
from patholite.modules import ClassifierModule
from patholite.pipelines.cache import trained_plain
from patholite.pipelines.context import RunContext
from patholite.pipelines.fit import Fitted, fit
from patholite.pipelines.tasks.base import Task
from patholite.records import ArtifactRecord


def make_module(
    ctx: RunContext,
    net: nn.Module | None = None,
    distiller: nn.Module | None = None,
    lr: float | None = None,
    warmup_epochs: float | None = None,
) -> ClassifierModule:
    """The Lightning module of a tile classifier training (``net``: train this network instead of building
    ``model=``; ``distiller``: learn from its teacher)."""
    optim = ctx.plain("optim")
    if lr is not None:
        optim["lr"] = lr
    if warmup_epochs is not None:
        optim["warmup_epochs"] = warmup_epochs
    return ClassifierModule(
        model=ctx.plain("model"),
        class_names=ctx.datamodule.class_names,
        image_size=ctx.cfg.dataset.image_size,
        optim=optim,
        net=net,
        distiller=distiller,
    )


def distiller(ctx: RunContext, student: nn.Module, teacher: nn.Module) -> Distiller:
    """``compression.kd`` as a Distiller of ``student`` from ``teacher``."""
    kd = ctx.cfg.compression.kd
    return Distiller(
        student,
        teacher,
        kind=kd.kind,
        alpha=kd.alpha,
        temperature=kd.temperature,
        levels=tuple(kd.levels),
        student_blocks=list(kd.student_blocks) if kd.student_blocks is not None else None,
        teacher_blocks=list(kd.teacher_blocks) if kd.teacher_blocks is not None else None,
        attention_weight=kd.attention_weight,
        feature_weight=kd.feature_weight,
        entropy_weight=kd.entropy_weight,
        lesion_weight=kd.lesion_weight,
        label_smoothing=ctx.cfg.optim.label_smoothing,
    )


def _plain_fit(ctx: RunContext) -> nn.Module:
    """The plain recipe: ``model=`` of ``ctx`` fitted, its best weights (what the cache stores)."""
    return fit(ctx, make_module(ctx), "train").net


def _result(fitted: Fitted) -> nn.Module:
    return fitted.ema_net if fitted.ema_net is not None else fitted.net


class TileTask(Task):
    name = "tiles"
    publishes = True

    def check_teacher(self, cfg: DictConfig, teacher_model: DictConfig, named: str) -> None:
        kd = cfg.compression.kd
        require(
            teacher_model.family != "smt",
            f"{named} is an SMT slide model; a tile classifier learns from a tile classifier",
        )
        if "attention" in kd.levels or "features" in kd.levels:
            size = cfg.dataset.image_size
            student, teacher = patch_size(cfg.model, size), patch_size(teacher_model, size)
            require(
                student == teacher,
                f"compression.kd.levels={list(kd.levels)} compare tokens, but the student {cfg.model.name} "
                f"has patch {student} and the teacher {teacher_model.name} patch {teacher}; use "
                "levels=[logits] or models with the same patch size",
            )

    def datamodule(self, cfg: DictConfig, pin_memory: bool) -> HistologyDataModule:
        return build_datamodule(cfg.dataset, pin_memory=pin_memory)

    def train(self, ctx: RunContext, stage: str, ema: DictConfig | None = None) -> Fitted:
        return fit(ctx, make_module(ctx), stage, ema=ema)

    def plain_network(self, ctx: RunContext, model_cfg: DictConfig, role: str) -> nn.Module:
        if model_cfg.checkpoint:
            return self.new_network(ctx, model_cfg).eval()
        net, _ = load_float_artifact(trained_plain(ctx, model_cfg, role, train=_plain_fit))
        return net

    def distill(
        self, ctx: RunContext, student: nn.Module, teacher: nn.Module, ema: DictConfig | None = None
    ) -> Fitted:
        module = make_module(ctx, distiller=distiller(ctx, student, copy.deepcopy(teacher)))
        return fit(ctx, module, "distill", ema=ema)

    def finetune(
        self, ctx: RunContext, stage: str, net: nn.Module, ft: DictConfig, source: nn.Module
    ) -> nn.Module:
        if ft.epochs <= 0:
            return net
        kd = distiller(ctx, net, copy.deepcopy(source)) if ft.distill else None
        module = make_module(ctx, net=None if kd else net, distiller=kd, lr=ft.lr, warmup_epochs=0.0)
        return _result(fit(ctx, module, stage, epochs=int(ft.epochs), ema=ctx.cfg.compression.ema))

    def qat(
        self, ctx: RunContext, net: nn.Module, state: dict[str, Any], directory: Path, meta: dict[str, Any]
    ) -> list[str]:
        """R2's QAT-lite: FX fake quantization of Linear and the patch-embedding Conv, a fine-tune, then the
        real INT8 model (kind ``torch_int8_qat``)."""
        q, engine = ctx.cfg.compression.qat, ctx.accelerator.int8_engine
        size = int(ctx.cfg.dataset.image_size)
        prepared = prepare_qat(copy.deepcopy(net).train(), torch.zeros(1, 3, size, size), engine=engine)
        module = make_module(ctx, net=prepared, lr=q.finetune.lr, warmup_epochs=0.0)
        fitted = fit(ctx, module, "qat", epochs=int(q.finetune.epochs))  # EMA of observers is not meaningful
        return save_qat_artifact(convert_qat(fitted.net.cpu()), directory, {**meta, "engine": engine})

    def evaluate(
        self,
        ctx: RunContext,
        name: str,
        net: nn.Module,
        directory: Path,
        files: list[str],
        source: str | None = None,
        reference: torch.Tensor | None = None,
        cpu: bool = False,
        defer_timing: bool = False,
    ) -> tuple[ArtifactRecord, torch.Tensor]:
        dm = ctx.datamodule
        return artifact_record(
            name,
            net,
            directory,
            files,
            dm.test_dataloader(),  # in order: every artifact's logits line up image by image
            list(dm.class_names),
            int(ctx.cfg.dataset.image_size),
            ctx.cfg.bench,
            "cpu" if cpu else ctx.accelerator.device,
            source=source,
            reference=reference,
            defer_timing=defer_timing,
        )

    def outputs(self, ctx: RunContext, net: nn.Module) -> torch.Tensor:
        return predict(net, ctx.datamodule.test_dataloader(), "cpu")[0]

    def times_together(self, ctx: RunContext) -> bool:
        # On CPU every artifact runs on the same device: time them all together at the end, alternating.
        return ctx.cfg.bench.isolation == "child" and ctx.accelerator.device.type == "cpu"
