"""A stage of a compression option, and the run of stages it takes part in.

A stage module defines ``STAGE = Stage(...)``: its name (what ``compression.stages`` lists), the function
that runs it, the artifact names it records (the artifact vocabulary), whether it makes the run's first
float model, the tasks it runs for, the stages that must come before it, and the checks of its config
block. ``StageRun`` is what every stage function gets: the context, the task, the float model the previous
stage handed on (``current``), and the records so far, with the save-reload-record path every artifact
takes and the state a resumed run continues from.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from patholite.accelerators.resolve import ResolvedAccelerator
from patholite.artifacts.load import load_artifact
from patholite.artifacts.torch_float import load_float_artifact, save_float_artifact
from patholite.errors import PatholiteError
from patholite.io import atomic_path, write_json
from patholite.pipelines.context import RunContext
from patholite.pipelines.tasks import Task
from patholite.records import ArtifactRecord

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
CURRENT_FILE = "current.pt"  # the current model's outputs on the test data, and what its training left


@dataclass(frozen=True)
class Stage:
    """One technique's step. ``artifacts``: the names it records, as the stage calls them (a task may
    rename them, e.g. ``fp32`` -> ``smt_fp32``), with what each is. ``check(cfg, task, accelerator)``
    raises ConfigError for a value or combination it cannot run, before any work."""

    name: str
    run: Callable[[StageRun], None]
    artifacts: Mapping[str, str] = field(default_factory=dict)
    first: bool = False  # makes the run's first float model (exactly one such stage, listed first)
    key: str | None = None  # its block in the compression config (compression.<key>)
    tasks: tuple[str, ...] = ("tiles", "slides")
    after: tuple[str, ...] = ()  # stages that, when also listed, must come before this one
    last: bool = False  # listed last when listed at all
    check: Callable[[DictConfig, Task, ResolvedAccelerator], None] | None = None
    task: str | None = None  # a first stage whose model is judged as this task (feature_kd: encoders)


@dataclass
class Current:
    """The float model the next stage works on, as saved and reloaded, with its outputs on the test data
    (what parity compares against) and what its training left for later stages (``Fitted.state``)."""

    name: str
    net: nn.Module
    directory: Path
    logits: torch.Tensor
    surgery: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"  # where ``logits`` were taken (its row's ``cost.device``)
    cpu_logits: torch.Tensor | None = field(default=None, repr=False)  # its outputs on the CPU, once asked


class StageRun:
    def __init__(self, ctx: RunContext, task: Task) -> None:
        self.ctx = ctx
        self.task = task
        self.records: list[ArtifactRecord] = []
        self.current: Current | None = None
        self.done: list[str] = []
        self.stage: Stage | None = None  # the stage running now
        self.time_at_end = self.task.times_together(ctx)

    @property
    def c(self) -> DictConfig:
        return self.ctx.cfg.compression

    def meta(self, surgery: list[dict[str, Any]] | None = None, model_cfg: DictConfig | None = None) -> dict:
        """The sidecar of an artifact of this run (``model_cfg``: another network's, e.g. the teacher's)."""
        return {**self.task.meta(self.ctx, model_cfg), "surgery": list(surgery or [])}

    def name(self, name: str) -> str:
        """The record name of the running stage's artifact ``name`` (one it declares), in the task's words."""
        if self.stage is not None and name not in self.stage.artifacts:
            raise PatholiteError(
                f"stage {self.stage.name} records {name!r}, which its STAGE.artifacts does not declare "
                f"({sorted(self.stage.artifacts)}): add it there"
            )
        return self.task.artifact_name(name)

    # --------------------------------------------------------------------------------------- recording
    def record(
        self,
        name: str,
        net: nn.Module,
        directory: Path,
        files: list[str],
        source: Current | None = None,
        cpu: bool = False,
    ) -> torch.Tensor:
        """Evaluate and cost a reloaded artifact (``name``: its record name); returns its test outputs."""
        log.info("recording artifact %s (%s)", name, directory)
        record, logits = self.task.evaluate(
            self.ctx,
            name,
            net,
            directory,
            files,
            source=source.name if source else None,
            reference=self.reference(source, cpu) if source else None,
            cpu=cpu,
            defer_timing=self.time_at_end,
        )
        self.records.append(record)
        if getattr(self.ctx.accelerator, "world_size", 1) > 1:
            # a later spawned fit (a student of this teacher, a fine-tune of this network) puts rank 0 on
            # the first device: what the driver evaluated there must not hold its memory meanwhile
            net.cpu()
        return logits

    def reference(self, source: Current, cpu: bool) -> torch.Tensor:
        """``source``'s outputs for a row's parity, taken where that row runs: an INT8 or ONNX row (``cpu``)
        against its source's outputs on the CPU, not on the run's GPU (TF32 on) or NPU, whose numerics would
        add to the quantization error that parity reports. A row on the run's device is held against the
        source's outputs there, as they were recorded."""
        if not cpu or torch.device(source.device).type == "cpu":
            return source.logits
        if source.cpu_logits is None:
            source.cpu_logits = self.task.outputs(self.ctx, source.net)  # every task's ``outputs``: the CPU
        return source.cpu_logits

    def record_float(
        self,
        name: str,
        net: nn.Module,
        surgery: list[dict[str, Any]] | None = None,
        source: Current | None = None,
        model_cfg: DictConfig | None = None,
        state: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Current:
        """Save ``net`` as the float artifact ``name`` (a name the stage declares), reload it from its files,
        record it, and return it as the model the next stage works on (``meta``: sidecar keys that differ
        from the run's, e.g. a teacher's own normalisation)."""
        name = self.name(name)
        directory = self.ctx.artifact_dir(name)
        sidecar = {**self.meta(surgery, model_cfg), **(meta or {})}
        files = save_float_artifact(net.cpu().eval(), directory, sidecar)
        loaded, _ = load_float_artifact(directory)
        logits = self.record(name, loaded, directory, files, source)
        device = str(self.records[-1].cost.get("device", "cpu"))
        return Current(
            name, loaded.cpu().eval(), directory, logits, list(surgery or []), dict(state or {}), device
        )

    def record_file_artifact(self, name: str, files: list[str], source: Current, cpu: bool = True) -> None:
        """Record the artifact ``name`` a stage wrote into ``artifact_dir(name)`` (INT8, ONNX), reloaded."""
        name = self.name(name)
        directory = self.ctx.artifact_dir(name)
        loaded, _ = load_artifact(directory)
        self.record(name, loaded, directory, files, source, cpu=cpu)

    def artifact_dir(self, name: str) -> Path:
        """Where the running stage writes its artifact ``name``."""
        return self.ctx.artifact_dir(self.name(name))

    # ------------------------------------------------------------------------------------------ resume
    @property
    def state_path(self) -> Path:
        return self.ctx.run_dir / "stages" / STATE_FILE

    def save_state(self) -> None:
        cur = self.current
        if cur is not None:
            with atomic_path(self.state_path.parent / CURRENT_FILE) as tmp:
                torch.save({"logits": cur.logits, "state": cur.state}, tmp)
        write_json(
            self.state_path,
            {
                "done": self.done,
                "records": [asdict(r) for r in self.records],
                "current": None
                if cur is None
                else {
                    "name": cur.name,
                    "directory": str(cur.directory),
                    "surgery": cur.surgery,
                    "device": cur.device,
                },
            },
        )

    def load_state(self) -> None:
        if not self.ctx.resuming or not self.state_path.is_file():
            return
        state = json.loads(self.state_path.read_text())
        self.done = list(state["done"])
        self.records = [ArtifactRecord(**r) for r in state["records"]]
        cur = state["current"]
        if cur is not None:
            net, _ = load_float_artifact(cur["directory"])
            saved_path = self.state_path.parent / CURRENT_FILE
            if saved_path.is_file():
                saved = torch.load(saved_path, map_location="cpu", weights_only=True)
            else:  # a run interrupted before this file existed: its outputs again
                saved = {"logits": self.task.outputs(self.ctx, net), "state": {}}
            # a state saved before ``device`` was: its outputs were taken on the run's device
            device = cur.get("device", str(self.ctx.accelerator.device))
            self.current = Current(
                cur["name"],
                net,
                Path(cur["directory"]),
                saved["logits"],
                cur["surgery"],
                saved["state"],
                device,
            )
        log.info("resuming after the finished stages %s", self.done)
