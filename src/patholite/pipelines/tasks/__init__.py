"""The task of a run, from its model config: the one place the pipeline branches on the model family.

``tiles`` (``tasks.tiles``): tile classifiers, judged on tiles. ``slides`` (``tasks.slides``): slide-level
models (SMT), judged by walking whole slides. ``encoders`` (``tasks.encoders``): encoders judged by linear
probes and kNN, chosen by the run's first stage (``Stage.task``: ``feature_kd``) rather than the model. A new
kind of model is a new task module and an entry here.
"""

from __future__ import annotations

from omegaconf import DictConfig

from patholite.pipelines.tasks.base import Task
from patholite.pipelines.tasks.encoders import EncoderTask
from patholite.pipelines.tasks.slides import SlideTask
from patholite.pipelines.tasks.tiles import TileTask

TASKS: dict[str, Task] = {"tiles": TileTask(), "slides": SlideTask(), "encoders": EncoderTask()}


def task_for(model_cfg: DictConfig, task: str | None = None) -> Task:
    """``task`` when the run's first stage names one (``encoders``); else ``slides`` for ``family: smt`` and
    ``tiles`` for everything else (vit, cnn)."""
    if task is not None:
        return TASKS[task]
    return TASKS["slides" if model_cfg.family == "smt" else "tiles"]


__all__ = ["TASKS", "Task", "task_for"]
