"""The stages a ``compression`` option lists, run in order, each handing its float model to the next.

Every module of this package but ``base`` is one stage (``STAGE``); this registry finds them, so a new
technique's stage is one new module here. The registry is the one list of stage names and of the artifact
names each records; ``check_stages`` validates a run's stage list and each stage's config block before any
work, and ``run_stages`` runs them. After each stage ``stages/state.json`` holds the records so far and
where the current model is; a resumed run skips finished stages and continues the interrupted one from its
checkpoint.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil

from omegaconf import DictConfig

from patholite.accelerators.resolve import ResolvedAccelerator
from patholite.config.checks import require
from patholite.measure.evaluate import time_together
from patholite.pipelines.context import RunContext
from patholite.pipelines.seed import seed_everything
from patholite.pipelines.stages.base import Stage, StageRun
from patholite.pipelines.tasks import Task
from patholite.records import ArtifactRecord

log = logging.getLogger(__name__)


def discover() -> dict[str, Stage]:
    """``{name: Stage}`` of every stage module of this package."""
    stages = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        stage = importlib.import_module(f"{__name__}.{info.name}").STAGE
        if stage.name in stages:
            raise RuntimeError(f"two stage modules define the stage {stage.name!r}")
        stages[stage.name] = stage
    return stages


STAGES: dict[str, Stage] = discover()


def artifact_names() -> dict[str, str]:
    """Every artifact name a stage records, with what it is (the artifact vocabulary)."""
    return {name: what for stage in STAGES.values() for name, what in stage.artifacts.items()}


def stage_list(c: DictConfig) -> list[str]:
    """The stages a run runs: ``compression.stages``, then ``export`` when ``compression.export.onnx``."""
    stages = list(c.stages)
    if c.export.onnx and "export" not in stages:
        stages.append("export")
    return stages


def stage_task(c: DictConfig) -> str | None:
    """The task the run's first stage makes its model (``Stage.task``), or None: the model family's."""
    first = STAGES.get(str(c.stages[0])) if len(c.stages) else None
    return first.task if first is not None else None


def check_stages(cfg: DictConfig, task: Task, accelerator: ResolvedAccelerator) -> None:
    """The stage list can run in this order for this task, and every stage's config block is valid."""
    c = cfg.compression
    stages = stage_list(c)
    for name in stages:
        require(name in STAGES, f"compression.stages[]={name!r} must be one of {sorted(STAGES)}")
    firsts = [n for n, s in STAGES.items() if s.first]
    require(
        stages[0] in firsts and not any(STAGES[s].first for s in stages[1:]),
        f"compression.stages={list(c.stages)}: must start with one of {firsts} (where the float model comes "
        f"from) and use it once; then any of {[n for n in STAGES if n not in firsts]}",
    )
    require(len(set(stages)) == len(stages), f"compression.stages={list(c.stages)} repeats a stage")
    for i, name in enumerate(stages):
        stage = STAGES[name]
        for earlier in stage.after:
            require(
                earlier not in stages[i + 1 :],
                f"compression.stages={list(c.stages)}: {earlier} must come before {name}",
            )
        require(
            not stage.last or i == len(stages) - 1, f"compression.stages={list(c.stages)}: {name} comes last"
        )
        require(
            task.name in stage.tasks,
            f"compression={c.name}: the {name} stage does not run on model={cfg.model.name} ({task.name}); "
            f"stages for it: {[n for n, s in STAGES.items() if task.name in s.tasks]}",
        )
    for name in stages:
        if STAGES[name].check is not None:
            STAGES[name].check(cfg, task, accelerator)


def run_stages(ctx: RunContext, task: Task) -> list[ArtifactRecord]:
    """Run the stages of ``ctx``'s compression option for ``task``; returns every artifact's record."""
    run = StageRun(ctx, task)
    run.load_state()
    for name in stage_list(ctx.cfg.compression):
        if name in run.done:
            continue
        log.info("stage %s", name)
        # Every stage starts from the run's seed (network init included), so its result does not depend on
        # what ran before it in this process, e.g. whether the teacher came from the cache or was trained.
        seed_everything(ctx.cfg.seed)
        run.stage = STAGES[name]
        run.stage.run(run)
        run.done.append(name)
        run.save_state()
    run.stage = None
    task.complete(run.records)
    if run.time_at_end:
        log.info("timing %d artifacts together, alternating", len(run.records))
        time_together(run.records, int(ctx.cfg.dataset.image_size), ctx.cfg.bench, "cpu")
    return run.records


__all__ = ["STAGES", "Stage", "StageRun", "artifact_names", "check_stages", "run_stages", "stage_task"]
