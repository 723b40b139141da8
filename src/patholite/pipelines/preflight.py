"""Everything checked before any heavy work: the config, the machine, the data's classes, the model's fit."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from patholite.accelerators import ResolvedAccelerator, resolve_accelerator
from patholite.config import check_config
from patholite.data import HistologyDataModule, build_datamodule
from patholite.errors import ConfigError
from patholite.models.factory import checkpoint_num_classes, create_network, load_weights, read_state_dict


def check_model_fits(model_cfg: DictConfig, num_classes: int, image_size: int) -> None:
    """The model can take the dataset's images and classes, and its checkpoint fits both."""
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
    if embed is not None:
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
                f"model.checkpoint={model_cfg.checkpoint} has a {head}-class head but the dataset has "
                f"{num_classes} classes; set model.checkpoint_skip_head=true to train a new head"
            )
        load_weights(net, model_cfg.checkpoint, skip_head=bool(model_cfg.checkpoint_skip_head))  # every shape


def preflight(cfg: DictConfig) -> tuple[HistologyDataModule, ResolvedAccelerator]:
    """Validate ``cfg`` against itself, this machine and the data; return the datamodule and accelerator."""
    from patholite.pipelines import PIPELINES

    check_config(cfg)
    if cfg.compression.pipeline not in PIPELINES:
        raise ConfigError(
            f"compression.pipeline={cfg.compression.pipeline!r} is not one of {sorted(PIPELINES)}"
        )
    accelerator = resolve_accelerator(cfg.accelerator)
    datamodule = build_datamodule(cfg.dataset, pin_memory=accelerator.pin_memory)
    check_model_fits(cfg.model, datamodule.num_classes, cfg.dataset.image_size)
    datamodule.setup("fit")  # reads the splits: missing files, bad CSVs and empty splits fail here
    return datamodule, accelerator
