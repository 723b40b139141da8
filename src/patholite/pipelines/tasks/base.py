"""A task: how one kind of model is trained, saved and judged. The stages (``pipelines.stages``) are the same
for every kind; what differs (the datamodule, the Lightning module, the sidecar, the evaluation of an
artifact, the INT8 path of QAT) is the task's. ``pipelines.tasks.task_for`` picks it from the model config:
the one place the pipeline branches on the model family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from patholite.data import HistologyDataModule
from patholite.models.factory import build_model
from patholite.pipelines.context import RunContext
from patholite.pipelines.fit import Fitted
from patholite.records import ArtifactRecord


class Task:
    """The base: what every kind of model shares. Subclasses override what differs."""

    name = "base"
    # float artifact names as the stages call them -> this task's names (SMT's are smt_fp32, ...)
    artifact_names: dict[str, str] = {}
    publishes: bool = False  # plain trainings go to the trained-model cache, so sweeps share them

    # ----------------------------------------------------------------------------------------- checks
    def check(self, cfg: DictConfig) -> None:
        """Config checks of the model and data this task needs (before any work)."""

    def check_machine(self, cfg: DictConfig, world_size: int) -> None:
        """Checks against the resolved accelerator (``world_size``: training processes)."""

    def check_teacher(self, cfg: DictConfig, teacher_model: DictConfig, named: str) -> None:
        """Config checks of a distillation teacher for this task's students."""

    def input_size(self, model_cfg: DictConfig, cfg: DictConfig) -> int:
        """The side of the images the network takes."""
        return int(cfg.dataset.image_size)

    # ------------------------------------------------------------------------------------------- data
    def datamodule(self, cfg: DictConfig, pin_memory: bool) -> HistologyDataModule:
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- models
    def artifact_name(self, name: str) -> str:
        return self.artifact_names.get(name, name)

    def new_network(self, ctx: RunContext, model_cfg: DictConfig | None = None) -> nn.Module:
        """``model_cfg`` (default ``model=``) built and initialised (its checkpoint loaded, if any)."""
        model_cfg = ctx.cfg.model if model_cfg is None else model_cfg
        return build_model(model_cfg, ctx.datamodule.num_classes, self.input_size(model_cfg, ctx.cfg))

    def meta(self, ctx: RunContext, model_cfg: DictConfig | None = None) -> dict[str, Any]:
        """The sidecar of this task's artifacts (``model_cfg``: another network's, e.g. the teacher's)."""
        return ctx.artifact_meta(model_cfg)

    # -------------------------------------------------------------------------------------- training
    def train(self, ctx: RunContext, stage: str, ema: DictConfig | None = None) -> Fitted:
        """Fit ``model=`` with the plain recipe."""
        raise NotImplementedError

    def plain_network(self, ctx: RunContext, model_cfg: DictConfig, role: str) -> nn.Module:
        """A trained plain network of ``model_cfg``: its checkpoint, else trained with the plain recipe
        (``role`` names it in logs and stage folders: "starting point", "teacher")."""
        raise NotImplementedError

    def distill(
        self, ctx: RunContext, student: nn.Module, teacher: nn.Module, ema: DictConfig | None = None
    ) -> Fitted:
        """Fit ``student`` from the frozen ``teacher``."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ evaluation
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
        """Quality and cost of a reloaded artifact as one record row, and its outputs on the test data
        (logits or log-probabilities: what parity compares)."""
        raise NotImplementedError

    def finetune(
        self, ctx: RunContext, stage: str, net: nn.Module, ft: DictConfig, source: nn.Module
    ) -> nn.Module:
        """A short fine-tune of ``net`` after a structural change (``ft``: the technique's ``finetune``
        block; with ``ft.distill``, learning from ``source``)."""
        raise NotImplementedError

    def qat(
        self, ctx: RunContext, net: nn.Module, state: dict[str, Any], directory: Path, meta: dict[str, Any]
    ) -> list[str]:
        """Quantization-aware fine-tuning of the float ``net`` (``state``: what its training left, see
        ``Fitted.state``), converted to INT8 and saved as an artifact in ``directory``; returns its files."""
        raise NotImplementedError

    def outputs(self, ctx: RunContext, net: nn.Module) -> torch.Tensor:
        """``net``'s outputs on the test data, as ``evaluate`` returns them (without recording)."""
        raise NotImplementedError

    def complete(self, records: list[ArtifactRecord]) -> None:
        """Finish the rows once every artifact of the run is recorded (what needs two rows at once)."""

    def times_together(self, ctx: RunContext) -> bool:
        """Whether a run's artifacts are timed together at its end (one child, alternating)."""
        return False
