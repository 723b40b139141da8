"""The task of a run, from its model config: the one place the pipeline branches on the model family.

``tiles`` (``tasks.tiles``): tile classifiers, judged on tiles. ``slides`` (``tasks.slides``): slide-level
models (SMT), judged by walking whole slides. A new kind of model (e.g. encoders judged by probes) is a new
task module and an entry here.
"""

from __future__ import annotations

from omegaconf import DictConfig

from patholite.pipelines.tasks.base import Task
from patholite.pipelines.tasks.slides import SlideTask
from patholite.pipelines.tasks.tiles import TileTask

TASKS: dict[str, Task] = {"tiles": TileTask(), "slides": SlideTask()}


def task_for(model_cfg: DictConfig) -> Task:
    """``slides`` for ``family: smt``, ``tiles`` for everything else (vit, cnn)."""
    return TASKS["slides" if model_cfg.family == "smt" else "tiles"]


__all__ = ["TASKS", "Task", "task_for"]
