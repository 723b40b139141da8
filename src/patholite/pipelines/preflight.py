"""Everything checked before any heavy work, once: the config, the task, the stages, the machine, the
teacher, the data's classes and splits, and the model's fit. User input is validated here and only here;
library code below may assert, but does not check config again."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from omegaconf import DictConfig

from patholite.accelerators.resolve import ResolvedAccelerator, resolve_accelerator
from patholite.config import check_config
from patholite.data import HistologyDataModule
from patholite.data.base import check_global_batch
from patholite.errors import ConfigError
from patholite.models.fits import check_model_fits
from patholite.models.hub import locate_hub_weights, model_normalisation
from patholite.models.stain import prepare_stain
from patholite.pipelines.stages import check_stages, stage_task
from patholite.pipelines.tasks import Task, task_for
from patholite.pipelines.teacher import Teacher, check_teacher_fits, resolve_teacher

log = logging.getLogger(__name__)


@dataclass
class Checked:
    """What preflight resolved and checked, for the run to use: nothing is resolved twice."""

    datamodule: HistologyDataModule
    accelerator: ResolvedAccelerator
    task: Task
    teacher: Teacher | None = None


def check_run(cfg: DictConfig) -> tuple[Task, ResolvedAccelerator, Teacher | None]:
    """The checks that need the config, this machine and the files the config names, but no data: the
    config's keys, the task's model and data settings, every stage and its block, the teacher."""
    check_config(cfg)
    task = task_for(cfg.model, stage_task(cfg.compression))
    task.check(cfg)
    prepare_hub_weights(cfg)
    prepare_stain(cfg)
    accelerator = resolve_accelerator(cfg.accelerator)
    check_global_batch(cfg.dataset, accelerator.world_size)
    task.check_machine(cfg, accelerator.world_size)
    check_stages(cfg, task, accelerator)
    teacher = None
    if "distill" in cfg.compression.stages:
        teacher = resolve_teacher(cfg.compression)
        task.check_teacher(cfg, teacher.model, teacher.named)
        check_teacher_normalisation(cfg, teacher)
    return task, accelerator, teacher


def prepare_hub_weights(cfg: DictConfig) -> None:
    """The hub weights ``model=`` asks for are in the local cache (fetched now only with model.download=true),
    and the normalisation they expect replaces dataset.mean/std: weights trained on inputs normalised one
    way are wrong on inputs normalised another, so the model's wins, and everything downstream (transforms,
    sidecars, slide engines) reads it from the dataset config."""
    weights = locate_hub_weights(cfg.model)
    normalisation = model_normalisation(cfg.model, weights)
    if normalisation is None:
        return
    mean, std = normalisation
    if [float(v) for v in cfg.dataset.mean] != mean or [float(v) for v in cfg.dataset.std] != std:
        log.info(
            "model=%s expects mean %s std %s: they replace dataset.mean %s and dataset.std %s",
            cfg.model.name,
            mean,
            std,
            list(cfg.dataset.mean),
            list(cfg.dataset.std),
        )
        cfg.dataset.mean, cfg.dataset.std = mean, std


def check_teacher_normalisation(cfg: DictConfig, teacher: Teacher) -> None:
    """A teacher with hub weights gets them ready too, and it must expect the student's normalisation: it
    scores the student's images."""
    normalisation = model_normalisation(teacher.model, locate_hub_weights(teacher.model))
    ours = [float(v) for v in cfg.dataset.mean], [float(v) for v in cfg.dataset.std]
    if normalisation is not None and tuple(normalisation) != ours:
        raise ConfigError(
            f"{teacher.named} expects mean {normalisation[0]} std {normalisation[1]}, the student's images "
            f"are normalised with {ours[0]} {ours[1]}; set model.mean and model.std to the teacher's"
        )


def preflight(cfg: DictConfig) -> Checked:
    """Validate ``cfg`` against itself, this machine and the data; return what the run needs."""
    task, accelerator, teacher = check_run(cfg)
    datamodule = task.datamodule(cfg, accelerator.pin_memory)
    size = task.input_size(cfg.model, cfg)
    check_model_fits(cfg.model, datamodule.num_classes, size)
    if teacher is not None:
        check_teacher_fits(cfg, teacher, list(datamodule.class_names), size)
    datamodule.setup("fit")  # reads the splits: missing files, bad CSVs and empty splits fail here
    return Checked(datamodule, accelerator, task, teacher)
