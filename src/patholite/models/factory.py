"""Build any ``model=`` option through timm and load its weights into it.

Weights come from a local file (safetensors, torch state dicts, Lightning checkpoints, foundation-model
weights) through ``model.checkpoint``, or, when the user asks (``model.pretrained``, ``model.hub``), from
the local Hugging Face cache (``models/hub.py``; preflight fetches them first only with ``model.download``);
ViT position embeddings are resampled when the weights were trained at another image size, and a hub
model's classifier head is always new.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import timm
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from patholite.errors import CheckpointError, ConfigError
from patholite.models.hub import (
    locate_hub_weights,
    network_spec,
    resolve_layers,
    wants_hub,
    weights_shapes,
)
from patholite.models.pyramid import PyramidViT, default_pyramid_blocks
from patholite.models.smt import smt_from_config
from patholite.models.stain import attach_stain

# Lightning modules (ours keep the network as `net`), DDP and torch.compile wrap keys in these prefixes.
_PREFIXES = ("net.", "model.", "module.", "_orig_mod.")


def _plain(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def create_network(model_cfg: Any, num_classes: int, image_size: int) -> nn.Module:
    """The bare network of ``model_cfg`` (no weights loaded). Works under ``torch.device("meta")``."""
    cfg = _plain(model_cfg)
    if cfg.get("family") == "smt":  # R3's multilayer network; its image size is model.smt.image_size
        return smt_from_config(cfg, num_classes)
    name, kwargs = network_spec(cfg)  # a hub model's architecture comes from its cached config.json
    if cfg.get("family", "vit") == "vit":
        kwargs.setdefault("img_size", image_size)
    if cfg.get("drop_path_rate"):
        kwargs["drop_path_rate"] = cfg["drop_path_rate"]
    if kwargs.get("global_pool") == "" and num_classes:  # feature extractors (Virchow2) pool nothing
        raise ConfigError(
            f"model={cfg.get('name')}: {name} is configured with global_pool='' (a feature extractor): its "
            "head would classify every token; set model.kwargs.global_pool=token (or avg)"
        )
    try:
        net = timm.create_model(name, pretrained=False, num_classes=num_classes, **resolve_layers(kwargs))
    except (TypeError, RuntimeError, AssertionError, ValueError) as err:
        raise ConfigError(
            f"model={cfg.get('name')}: timm could not build {name!r} with model.kwargs={kwargs} "
            f"at image size {image_size}: {err}"
        ) from err
    pyramid = cfg.get("pyramid") or {}
    if pyramid.get("enabled"):
        if not hasattr(net, "blocks") or not hasattr(net, "_pos_embed"):
            raise ConfigError(
                f"model.pyramid.enabled=true needs a Vision Transformer; {cfg['name']} is not one"
            )
        blocks = pyramid.get("blocks") or default_pyramid_blocks(len(net.blocks))
        net = PyramidViT(net, num_classes, list(blocks))
    return attach_stain(net, cfg)  # model.stain: the learnable stain front-end (models/stain.py)


def build_model(model_cfg: Any, num_classes: int, image_size: int) -> nn.Module:
    """The network of ``model_cfg``, with the local checkpoint's weights when one is named, else its hub
    weights (head new) when it asks for them."""
    net = create_network(model_cfg, num_classes, image_size)
    cfg = _plain(model_cfg)
    if cfg.get("checkpoint"):
        load_weights(net, cfg["checkpoint"], skip_head=bool(cfg.get("checkpoint_skip_head")))
    elif wants_hub(cfg):
        load_hub_weights(net, cfg)
    elif cfg.get("family") == "smt" and (cfg.get("smt") or {}).get("encoder_checkpoint"):
        init_smt_encoders(net, cfg["smt"]["encoder_checkpoint"])
    return net


def init_smt_encoders(net: nn.Module, source: str | Path) -> None:
    """Start every SMT encoder from one tile classifier's weights (its head dropped): a patch classifier of
    the same architecture, or a foundation model's weights. ``source``: a float artifact folder or a weights
    file (preflight resolves a tile classifier's run folder to its ``fp32`` artifact first)."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(
            f"model.smt.encoder_checkpoint={source}: no weights there; give a tile classifier's run folder "
            "or float artifact folder (the encoders' architecture), or its .safetensors/.pth file"
        )
    for encoder in net.encoders:
        load_weights(encoder, path, skip_head=True)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file; never unpickles code (``weights_only=True``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"model.checkpoint={path} does not exist; give a local .safetensors/.pth/.ckpt file"
        )
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            try:  # mmap: multi-GB foundation weights are not read into memory twice
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure is the same user problem
        raise CheckpointError(f"cannot read weights from {path}: {err}") from err
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def without_absent_head(net: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the classifier tensors (timm's ``pretrained_cfg["classifier"]`` names) that ``net``
    has no place for, as when a foundation model's hub file keeps a head its headless encoder drops."""
    names = (getattr(net, "pretrained_cfg", None) or {}).get("classifier") or "head"
    names = [names] if isinstance(names, str) else list(names)
    own = net.state_dict()
    return {
        k: v for k, v in state.items() if k in own or not any(k == n or k.startswith(n + ".") for n in names)
    }


def classifier_keys(net: nn.Module) -> list[str]:
    """State-dict keys of the network's classification head(s)."""
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    heads = list(head) if isinstance(head, tuple) else [head]  # distilled DeiT returns (head, head_dist)
    ids = {id(m) for m in heads if isinstance(m, nn.Module)}
    keys = []
    for name, module in net.named_modules():
        if id(module) in ids:
            keys += [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=True)]
    return keys


def adapt_to_pyramid(
    state: dict[str, torch.Tensor], net: nn.Module
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """A plain ViT checkpoint (foundation-model weights) made to fit a ``PyramidViT``.

    Returns the state and the keys that stay freshly initialised: the pyramid's head and scale norms, which
    a plain ViT cannot provide (its own classifier is dropped).
    """
    if not isinstance(net, PyramidViT) or any(k.startswith("vit.") for k in state):
        return state, set()
    adapted = {f"vit.{k}": v for k, v in state.items() if not k.startswith(("head.", "head_dist."))}
    fresh = {k for k in net.state_dict() if k.startswith(("head.", "scale_norms."))}
    return adapted, fresh


def checkpoint_num_classes(state: dict[str, torch.Tensor], net: nn.Module) -> int | None:
    """The class count of the checkpoint's head, read by the network's head keys (None: no head)."""
    state, fresh = adapt_to_pyramid(state, net)
    for key in classifier_keys(net):
        if key.endswith("weight") and key in state and key not in fresh:
            return int(state[key].shape[0])
    return None


def load_hub_weights(net: nn.Module, model_cfg: Any, shapes_only: bool = False) -> None:
    """Load ``model_cfg``'s cached hub weights into ``net``, the head replaced and every other tensor
    required to fit. ``shapes_only``: check the fit from the file's header (``net`` on the meta device)."""
    from_hub = locate_hub_weights(model_cfg, download=False)
    path = from_hub.weights
    state = weights_shapes(path) if shapes_only else read_state_dict(path)
    load_state(net, state, f"{from_hub.source.key} ({path})", skip_head=True)


def load_weights(net: nn.Module, path: str | Path, skip_head: bool = False) -> None:
    """Load a local checkpoint into ``net``; position embeddings are resampled to the network's grid.

    Works on a network on the ``meta`` device too, which checks the fit without allocating weights.
    """
    load_state(net, read_state_dict(path), str(path), skip_head=skip_head)


def load_state(net: nn.Module, state: dict[str, torch.Tensor], named: str, skip_head: bool = False) -> None:
    """Load ``state`` (from ``named``, for messages) into ``net``, position embeddings resampled."""
    state, fresh = adapt_to_pyramid(state, net)
    head = set(classifier_keys(net)) | fresh
    if skip_head or fresh:
        state = {k: v for k, v in state.items() if k not in head}
    if skip_head:  # a headless network (an encoder: num_classes=0) has no head for the file's to go to
        state = without_absent_head(net, state)
    target = net.vit if isinstance(net, PyramidViT) else net
    prefix = "vit." if isinstance(net, PyramidViT) else ""
    if hasattr(target, "pos_embed") and (prefix + "pos_embed") in state:
        sub = checkpoint_filter_fn(
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, target
        )
        state = {
            **{k: v for k, v in state.items() if not k.startswith(prefix)},
            **{prefix + k: v for k, v in sub.items()},
        }
    own = net.state_dict()
    wrong = [
        f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong:
        raise CheckpointError(
            f"{named} does not fit the model (its shapes vs the model's): " + "; ".join(wrong[:5])
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # loading into meta tensors is a no-op that torch warns about
        result = net.load_state_dict(state, strict=False)
    # weights trained without the stain front-end: it keeps its initialisation (the identity)
    missing = [
        k
        for k in result.missing_keys
        if not ((skip_head or fresh) and k in head) and not k.startswith("stain.")
    ]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{named} does not match the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
            + (" (set model.checkpoint_skip_head=true to train a new head)" if set(missing) <= head else "")
        )
