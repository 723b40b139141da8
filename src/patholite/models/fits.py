"""Whether a model config can take a dataset's images and classes, checked on the ``meta`` device (no weights
allocated): patch size against the image size, a checkpoint's (or hub weights') head and every tensor
shape."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from patholite.errors import ConfigError
from patholite.models.factory import (
    checkpoint_num_classes,
    create_network,
    init_smt_encoders,
    load_hub_weights,
    load_weights,
    read_state_dict,
)
from patholite.models.hub import wants_hub


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
    elif wants_hub(model_cfg):  # the head is replaced; every other tensor must fit (read from the header)
        load_hub_weights(net, model_cfg, shapes_only=True)


def patch_size(model_cfg: DictConfig, image_size: int) -> tuple[int, ...] | None:
    """The ViT patch size of ``model_cfg`` at ``image_size`` (None: no patch embedding, e.g. a CNN)."""
    with torch.device("meta"):
        net = create_network(model_cfg, 2, image_size)
    embed = getattr(net, "patch_embed", None)
    return tuple(embed.patch_size) if embed is not None else None
