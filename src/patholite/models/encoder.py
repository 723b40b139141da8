"""Encoders: a network read for its embedding, not its logits.

An encoder is a timm network built with ``num_classes=0``, so its forward pass returns the pooled
pre-logits embedding (a ViT's normalised class token, a CNN's pooled features) of width ``embed_dim``.
Its artifacts are ordinary artifacts whose sidecar carries an ``encoder`` block (``ENCODER_KEY``:
``{"embed_dim": D}``), so every artifact kind (float, torch.ao INT8, ONNX) holds one unchanged and
``artifacts.torch_float.create_float_twin`` rebuilds it headless.

``embeddings(net, x)`` returns the two embeddings distillation and probes read: the pooled one (class
token) and the mean of the patch tokens.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from patholite.errors import ConfigError

ENCODER_KEY = "encoder"


def is_encoder_meta(meta: dict[str, Any]) -> bool:
    """Whether an artifact's sidecar describes an encoder (its forward returns embeddings)."""
    return bool(meta.get(ENCODER_KEY))


def as_encoder(net: nn.Module, named: str = "the network") -> nn.Module:
    """A copy of the timm classifier ``net`` with its head removed: its forward returns the embedding."""
    reset = getattr(net, "reset_classifier", None)
    if not callable(reset) or not hasattr(net, "forward_features") or not hasattr(net, "forward_head"):
        raise ConfigError(
            f"{named} ({type(net).__name__}) is not a timm network with a removable head, so no embedding "
            "can be read from it; use a timm model option (vit, deit, convnext, resnet, a hub encoder)"
        )
    encoder = copy.deepcopy(net)
    encoder.reset_classifier(0)
    return encoder


def _pooled(net: nn.Module, features: torch.Tensor, named: str) -> torch.Tensor:
    return as_pooled(net.forward_head(features, pre_logits=True), named)


def as_pooled(pooled: torch.Tensor, named: str = "the encoder") -> torch.Tensor:
    """A headless network's output as one embedding per image (B x width)."""
    if pooled.ndim == 3:  # a ViT configured with global_pool='' (Virchow2): the class token
        pooled = pooled[:, 0]
    if pooled.ndim != 2:
        raise ConfigError(
            f"{named} returns a {pooled.ndim}-D output {tuple(pooled.shape)} where an embedding (batch x "
            "width) was expected: it does not pool (e.g. a CNN with global_pool=''); set "
            "model.kwargs.global_pool=avg (CNN) or token (ViT)"
        )
    return pooled


def patch_mean(net: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The mean of the patch tokens (ViT: the tokens after the prefix tokens; CNN: the spatial mean)."""
    if features.ndim == 4:  # B x C x H x W
        return features.mean(dim=(2, 3))
    prefix = int(getattr(net, "num_prefix_tokens", 1))
    return features[:, prefix:].mean(dim=1)


def embeddings(
    net: nn.Module, x: torch.Tensor, named: str = "the encoder"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pooled, patch_mean)`` of a timm encoder on ``x``, from one pass through its trunk."""
    features = net.forward_features(x)
    return _pooled(net, features, named), patch_mean(net, features)


def embed_dim(net: nn.Module, image_size: int, named: str = "the encoder") -> int:
    """The width of ``net``'s pooled embedding: read from a pass when ``net`` lives on the meta device (what
    preflight builds: no compute, and a CNN that does not pool is caught), else from timm's attributes."""
    if not hasattr(net, "forward_features"):
        raise ConfigError(f"{named} ({type(net).__name__}) is not a timm network: no embedding to read")
    if _on_meta(net):
        was = net.training
        net.eval()
        with torch.no_grad():
            x = torch.empty(2, 3, image_size, image_size, device="meta")
            width = int(_pooled(net, net.forward_features(x), named).shape[1])
        net.train(was)
        return width
    return int(getattr(net, "head_hidden_size", None) or net.num_features)


def _on_meta(net: nn.Module) -> bool:
    first = next(iter(net.parameters()), None)
    return first is not None and first.device.type == "meta"
