"""Everything checked before any heavy work: the config, the machine, the data's classes, the model's fit."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from patholite.accelerators import ResolvedAccelerator, resolve_accelerator
from patholite.artifacts.sidecar import read_sidecar
from patholite.config import check_config
from patholite.data import HistologyDataModule, build_datamodule
from patholite.data.base import check_global_batch
from patholite.errors import ConfigError
from patholite.models.factory import (
    checkpoint_num_classes,
    create_network,
    init_smt_encoders,
    load_weights,
    read_state_dict,
)
from patholite.pipelines.stages import teacher_config
from patholite.pipelines.teacher import check_smt_teacher, smt_teacher_model, teacher_artifact

log = logging.getLogger(__name__)


def check_model_fits(model_cfg: DictConfig, num_classes: int, image_size: int, key: str = "model") -> None:
    """The model can take the dataset's images and classes, and its checkpoint fits both (``key``: where the
    model is configured, for the messages: ``model`` or ``compression.teacher``)."""
    if model_cfg.family == "smt":  # its images are model.smt.image_size; SMTNet checks its own geometry
        image_size = int(model_cfg.smt.image_size)
    if "img_size" in (model_cfg.kwargs or {}):
        raise ConfigError(
            "model.kwargs.img_size is set by the dataset: use dataset.image_size=<pixels> instead"
        )
    if model_cfg.num_classes is not None and model_cfg.num_classes != num_classes:
        raise ConfigError(
            f"model.num_classes={model_cfg.num_classes} but the dataset has {num_classes} classes; "
            "remove model.num_classes (it defaults to the dataset's) or pick the matching dataset"
        )
    with torch.device("meta"):
        net = create_network(model_cfg, num_classes, image_size)
    embed = getattr(net, "patch_embed", None) or getattr(getattr(net, "vit", None), "patch_embed", None)
    if model_cfg.family == "smt":
        if model_cfg.smt.encoder_checkpoint and not model_cfg.checkpoint:  # every encoder fits it, or say so
            init_smt_encoders(net, model_cfg.smt.encoder_checkpoint)
    elif embed is not None:
        patch = embed.patch_size[0] if isinstance(embed.patch_size, (tuple, list)) else embed.patch_size
        if image_size % patch:
            raise ConfigError(
                f"dataset.image_size={image_size} is not a multiple of {model_cfg.name}'s patch size "
                f"{patch}; use a multiple such as {max(patch, image_size - image_size % patch)}"
            )
    elif image_size < 32:
        raise ConfigError(f"{model_cfg.name} downsamples 32x: dataset.image_size={image_size} must be >= 32")
    if model_cfg.checkpoint:
        head = checkpoint_num_classes(read_state_dict(model_cfg.checkpoint), net)
        if head is not None and head != num_classes and not model_cfg.checkpoint_skip_head:
            raise ConfigError(
                f"{key}.checkpoint={model_cfg.checkpoint} has a {head}-class head but the dataset has "
                f"{num_classes} classes; set model.checkpoint_skip_head=true to train a new head"
            )
        load_weights(net, model_cfg.checkpoint, skip_head=bool(model_cfg.checkpoint_skip_head))  # every shape


def check_compression_fits(cfg: DictConfig, accelerator: ResolvedAccelerator) -> None:
    """Each stage can run on this model and machine."""
    c, m = cfg.compression, cfg.model
    stages = list(c.stages)
    structural = [s for s in stages if s in ("prune", "lowrank")]
    deep_kd = "distill" in stages and set(c.kd.levels) & {"attention", "features"}
    if (structural or deep_kd) and m.family != "vit":
        what = structural[0] if structural else f"compression.kd.levels={list(c.kd.levels)}"
        raise ConfigError(
            f"compression={c.name}: {what} works on Vision Transformers (heads, attention, tokens); "
            f"model={m.name} is a {m.family}"
        )
    if m.pyramid.enabled and (structural or deep_kd):
        raise ConfigError(
            f"compression={c.name}: pruning, low-rank attention and attention/feature distillation do not "
            "support model.pyramid.enabled=true yet; use the plain ViT head"
        )
    if "distill" in stages and c.kd.kind.startswith("token") and "distilled" not in m.timm_name:
        raise ConfigError(
            f"compression.kd.kind=token needs a DeiT student with a distillation token (e.g. "
            f"model=deit_tiny_distilled); model={m.name} ({m.timm_name}) has none"
        )
    if "qat" in stages and accelerator.device.type != "cpu":
        raise ConfigError(
            f"compression={c.name}: QAT converts to torch.ao INT8 kernels, which run on CPU only; "
            "use accelerator=cpu for this option"
        )
    if accelerator.device.type != "cpu" and set(c.ptq.methods) & {"dynamic", "mixed"} and "ptq" in stages:
        log.info("INT8 artifacts are evaluated and timed on the CPU; float ones on %s", accelerator.device)


def check_teacher(cfg: DictConfig, class_names: list[str]) -> None:
    """The teacher option exists, fits the data, and its checkpoint (if any) exists and fits."""

    c, num_classes = cfg.compression, len(class_names)
    if cfg.model.family == "smt":  # an SMT teacher may be a model=smt run or artifact folder
        check_smt_teacher(cfg)

        directory = teacher_artifact(c.teacher.checkpoint)  # raises for a run without a float SMT
        if directory is not None:
            sidecar = read_sidecar(directory)
            theirs = list(sidecar.get("class_names") or [])
            if theirs != list(class_names):
                raise ConfigError(
                    f"compression.teacher.checkpoint={c.teacher.checkpoint} was trained on classes {theirs}, "
                    f"this dataset has {list(class_names)}; distil from a teacher of the same classes"
                )
            for key in ("mean", "std"):  # the teacher sees the student's normalised images
                ours = [float(v) for v in cfg.dataset[key]]
                if [float(v) for v in sidecar.get(key) or ours] != ours:
                    raise ConfigError(
                        f"compression.teacher.checkpoint={c.teacher.checkpoint} normalises with {key} "
                        f"{sidecar.get(key)}, this dataset with {ours}; set dataset.{key} to the teacher's"
                    )
            teacher, _ = smt_teacher_model(c)
            check_model_fits(teacher, num_classes, int(teacher.smt.image_size), key="compression.teacher")
            return
    teacher = teacher_config(c)
    if c.teacher.checkpoint and not Path(c.teacher.checkpoint).is_file():
        raise ConfigError(
            f"compression.teacher.checkpoint={c.teacher.checkpoint} does not exist; give a trained teacher's "
            "weights, or null to train the teacher once with the plain recipe (cached)"
        )
    check_model_fits(teacher, num_classes, cfg.dataset.image_size, key="compression.teacher")
    if "attention" in c.kd.levels or "features" in c.kd.levels:
        student_patch = _patch_size(cfg.model, num_classes, cfg.dataset.image_size)
        teacher_patch = _patch_size(teacher, num_classes, cfg.dataset.image_size)
        if student_patch != teacher_patch:
            raise ConfigError(
                f"compression.kd.levels={list(c.kd.levels)} compare tokens, but the student {cfg.model.name} "
                f"has patch {student_patch} and the teacher {teacher.name} patch {teacher_patch}; use "
                "levels=[logits] or models with the same patch size"
            )


def _patch_size(model_cfg: DictConfig, num_classes: int, image_size: int) -> Any:
    with torch.device("meta"):
        net = create_network(model_cfg, num_classes, image_size)
    embed = getattr(net, "patch_embed", None)
    return tuple(embed.patch_size) if embed is not None else None


def preflight(cfg: DictConfig) -> tuple[HistologyDataModule, ResolvedAccelerator]:
    """Validate ``cfg`` against itself, this machine and the data; return the datamodule and accelerator."""
    check_config(cfg)
    accelerator = resolve_accelerator(cfg.accelerator)
    check_global_batch(cfg.dataset, accelerator.world_size)
    if cfg.model.family == "smt" and accelerator.world_size > 1:
        raise ConfigError(
            f"model={cfg.model.name} trains in one process: its focusing memory (the per-slide temporal "
            "ensemble of focusing scores) would split across DDP ranks that see different slides each epoch; "
            "use accelerator.devices=1"
        )
    check_compression_fits(cfg, accelerator)
    datamodule = build_datamodule(cfg.dataset, pin_memory=accelerator.pin_memory, model=cfg.model)
    check_model_fits(cfg.model, datamodule.num_classes, cfg.dataset.image_size)
    if "distill" in cfg.compression.stages:
        check_teacher(cfg, list(datamodule.class_names))
    datamodule.setup("fit")  # reads the splits: missing files, bad CSVs and empty splits fail here
    return datamodule, accelerator
