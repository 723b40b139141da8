"""The shapes of a pruned timm ViT as JSON, and their replay on a freshly built network.

``describe_structure`` records each block's heads, head width and MLP width; ``apply_structure`` slices a
fresh network of the same model config to those shapes, so the pruned state dict (safetensors) loads with
``strict=True`` and no pickled code. Loading an artifact needs only this module, not Torch-Pruning.

Errors: a network whose blocks cannot be pruned is a ``ConfigError`` (the model config must change); a
description that is malformed or does not fit the network it is replayed on is a ``CheckpointError``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from patholite.errors import CheckpointError, ConfigError

STRUCTURE_FORMAT = "patholite.vit_structure"
STRUCTURE_VERSION = 1

__all__ = [
    "STRUCTURE_FORMAT",
    "STRUCTURE_VERSION",
    "apply_structure",
    "block_shapes",
    "describe_structure",
    "find_blocks",
    "reshape_block",
    "set_heads",
]


# --------------------------------------------------------------------------------------------------------
# Finding and checking the transformer blocks


def find_blocks(net: nn.Module) -> tuple[str, list[nn.Module]]:
    """The dotted path and the list of the network's ViT blocks (``net.blocks``, or a wrapped ViT's, such
    as ``PyramidViT.vit.blocks``). Raises ConfigError when there are none or they cannot be pruned."""
    for name, module in net.named_modules():
        blocks = getattr(module, "blocks", None)
        if (
            isinstance(blocks, (nn.Sequential, nn.ModuleList))
            and len(blocks) > 0
            and all(hasattr(b, "attn") and hasattr(b, "mlp") for b in blocks)
        ):
            path = f"{name}.blocks" if name else "blocks"
            for i, block in enumerate(blocks):
                _check_block(block, f"{path}.{i}")
            return path, list(blocks)
    raise ConfigError(
        f"{type(net).__name__} has no Vision Transformer blocks (a `.blocks` list whose items have `.attn` "
        "and `.mlp`): pruning removes attention heads and MLP channels of a timm VisionTransformer; "
        "choose a ViT model (e.g. deit_tiny) or disable pruning"
    )


def _check_block(block: nn.Module, where: str) -> None:
    attn, mlp = block.attn, block.mlp
    for owner, names in ((attn, ("qkv", "proj")), (mlp, ("fc1", "fc2"))):
        for n in names:
            if not isinstance(getattr(owner, n, None), nn.Linear):
                raise ConfigError(
                    f"{where}: expected a timm Attention (qkv, proj) and Mlp (fc1, fc2) made of nn.Linear; "
                    f"{type(owner).__name__}.{n} is missing or not nn.Linear. Only standard timm ViT blocks "
                    "can be pruned"
                )
    # timm before attn_dim reshapes the attention output to the input width, which breaks once heads go.
    if not all(hasattr(attn, a) for a in ("num_heads", "head_dim", "attn_dim")):
        raise ConfigError(
            f"{where}.attn ({type(attn).__name__}) lacks num_heads/head_dim/attn_dim: head pruning needs "
            "timm >= 1.0 Attention; upgrade timm"
        )
    if attn.qkv.out_features != 3 * attn.num_heads * attn.head_dim:
        raise ConfigError(
            f"{where}.attn: qkv has {attn.qkv.out_features} outputs, not 3 x {attn.num_heads} heads x "
            f"{attn.head_dim}; only fused-qkv timm attention can be pruned"
        )
    extras = {
        "qk_norm": not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity),
        "scale_attn_norm": not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity),
        "gated attention": getattr(attn, "gate", None) is not None,
        "scale_mlp_norm": not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity),
        "gated MLP (fc1 wider than fc2's input)": mlp.fc1.out_features != mlp.fc2.in_features,
    }
    unsupported = [k for k, v in extras.items() if v]
    if unsupported:
        raise ConfigError(
            f"{where}: pruning does not support {', '.join(unsupported)}; use a plain timm ViT/DeiT "
            "or disable pruning"
        )


def block_shapes(blocks: list[nn.Module]) -> list[dict[str, int]]:
    """Each block's ``num_heads``, ``head_dim`` and ``mlp_hidden``: the per-block entries of a structure."""
    return [
        {
            "num_heads": int(b.attn.num_heads),
            "head_dim": int(b.attn.head_dim),
            "mlp_hidden": b.mlp.fc1.out_features,
        }
        for b in blocks
    ]


# --------------------------------------------------------------------------------------------------------
# Describing and checking a structure


def describe_structure(net: nn.Module) -> dict[str, Any]:
    """JSON-serialisable shapes of every ViT block: what ``apply_structure`` needs to rebuild the network."""
    path, blocks = find_blocks(net)
    return {
        "format": STRUCTURE_FORMAT,
        "version": STRUCTURE_VERSION,
        "blocks_path": path,
        "embed_dim": blocks[0].attn.qkv.in_features,
        "blocks": block_shapes(blocks),
    }


def _check_structure(structure: Any, path: str, blocks: list[nn.Module]) -> list[dict[str, int]]:
    """The per-block shapes of ``structure``, after checking that it is well formed and fits ``blocks``."""
    if not isinstance(structure, dict) or structure.get("format") != STRUCTURE_FORMAT:
        raise CheckpointError(
            f"the pruned-structure description is not a {STRUCTURE_FORMAT!r} dict (got "
            f"{type(structure).__name__}); give the JSON that describe_structure wrote beside the weights"
        )
    if structure.get("version") != STRUCTURE_VERSION:
        raise CheckpointError(
            f"pruned-structure version {structure.get('version')!r} is not {STRUCTURE_VERSION}; "
            "re-export the pruned model with this patholite"
        )
    wanted = structure.get("blocks")
    if structure.get("blocks_path") != path or not isinstance(wanted, list) or len(wanted) != len(blocks):
        raise CheckpointError(
            f"the pruned structure describes {len(wanted) if isinstance(wanted, list) else '?'} blocks at "
            f"{structure.get('blocks_path')!r}, but this network has {len(blocks)} at {path!r}: build the "
            "same model config (model=, image size, classes) the pruned model came from"
        )
    if structure.get("embed_dim") != blocks[0].attn.qkv.in_features:
        raise CheckpointError(
            f"the pruned structure has embed_dim {structure.get('embed_dim')}, this network "
            f"{blocks[0].attn.qkv.in_features}: build the model config the pruned model came from"
        )
    for i, (shape, have) in enumerate(zip(wanted, block_shapes(blocks), strict=True)):
        if (
            not isinstance(shape, dict)
            or set(shape) != set(have)
            or not all(isinstance(v, int) and v >= 1 for v in shape.values())
        ):
            raise CheckpointError(
                f"pruned structure block {i}: {shape!r} is not {{num_heads, head_dim, mlp_hidden}}"
            )
        if shape["head_dim"] != have["head_dim"]:
            raise CheckpointError(
                f"pruned structure block {i}: head_dim {shape['head_dim']} differs from the network's "
                f"{have['head_dim']}; only whole heads are pruned, so build the same model config"
            )
        if shape["num_heads"] > have["num_heads"] or shape["mlp_hidden"] > have["mlp_hidden"]:
            raise CheckpointError(
                f"pruned structure block {i}: {shape['num_heads']} heads / {shape['mlp_hidden']} MLP "
                f"channels do not fit a block with {have['num_heads']} / {have['mlp_hidden']}: apply it to a "
                "fresh, unpruned network of the same model config"
            )
    return wanted


# --------------------------------------------------------------------------------------------------------
# Replaying a structure


def _sliced_linear(layer: nn.Linear, out_idx: Tensor | None, in_idx: Tensor | None) -> nn.Linear:
    """A new Linear holding the chosen rows/columns of ``layer`` (dtype, device and bias kept)."""
    weight = layer.weight.detach()
    if out_idx is not None:
        weight = weight[out_idx]
    if in_idx is not None:
        weight = weight[:, in_idx]
    new = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=layer.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach() if out_idx is None else layer.bias.detach()[out_idx])
    new.weight.requires_grad_(layer.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(layer.bias.requires_grad)
    return new


def reshape_block(block: nn.Module, num_heads: int, mlp_hidden: int) -> None:
    """Keep the first ``num_heads`` heads and ``mlp_hidden`` MLP channels (values are placeholders until a
    state dict is loaded; the shapes are what matters)."""
    attn, mlp = block.attn, block.mlp
    if num_heads != attn.num_heads:
        d, old_attn_dim = attn.head_dim, attn.attn_dim
        dev = attn.qkv.weight.device
        kept = torch.arange(num_heads * d, device=dev)
        # qkv rows are laid out [q | k | v], each num_heads x head_dim.
        qkv_rows = torch.cat([kept + i * old_attn_dim for i in range(3)])
        attn.qkv = _sliced_linear(attn.qkv, qkv_rows, None)
        attn.proj = _sliced_linear(attn.proj, None, kept)
        set_heads(attn, num_heads)
    if mlp_hidden != mlp.fc1.out_features:
        kept = torch.arange(mlp_hidden, device=mlp.fc1.weight.device)
        mlp.fc1 = _sliced_linear(mlp.fc1, kept, None)
        mlp.fc2 = _sliced_linear(mlp.fc2, None, kept)


def set_heads(attn: nn.Module, num_heads: int) -> None:
    """Tell a timm Attention it now has ``num_heads`` heads (its Linear layers must already match)."""
    # timm's forward reshapes qkv with num_heads/head_dim and the output with attn_dim: all three must agree
    # with the Linear shapes (head_dim, hence the softmax scale, is unchanged by whole-head pruning).
    attn.num_heads = num_heads
    attn.attn_dim = num_heads * attn.head_dim


def apply_structure(net: nn.Module, structure: dict[str, Any]) -> nn.Module:
    """Reshape a fresh network of the same config to ``structure`` (from ``describe_structure``), in place,
    so that the pruned state dict loads with ``strict=True``. Returns ``net``.

    Raises CheckpointError when the description is malformed or does not fit ``net`` (including a network
    without prunable ViT blocks: the artifact then records pruning of a model it cannot have come from)."""
    try:
        path, blocks = find_blocks(net)
    except ConfigError as err:
        raise CheckpointError(f"cannot replay a pruned structure on this network: {err}") from err
    wanted = _check_structure(structure, path, blocks)
    for block, shape in zip(blocks, wanted, strict=True):
        reshape_block(block, shape["num_heads"], shape["mlp_hidden"])
    return net
