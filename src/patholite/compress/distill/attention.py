"""Attention-map distillation (R1): the head-averaged attention maps of chosen blocks, read from timm's
attention modules, and KL(teacher || student) between them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from patholite.compress.distill.align import TokenAlignment
from patholite.errors import ConfigError

# log() of a student attention probability that underflowed to 0 must stay finite.
_EPS = 1e-8


def attention_of(block: nn.Module, role: str, index: int) -> nn.Module:
    """The module that computes the block's attention matrix (timm Attention, or the block itself)."""
    attn = getattr(block, "attn", block)
    if not (hasattr(attn, "fused_attn") and isinstance(getattr(attn, "attn_drop", None), nn.Module)):
        # A ConfigError: a ViT family can still lack timm's attention, seen only on the built network.
        raise ConfigError(
            f"{role} block {index} ({type(block).__name__}) has no timm-style attention (`attn.fused_attn`, "
            "`attn.attn_drop`) to read attention maps from: drop the attention level"
        )
    return attn


def materialise_attention(blocks: Sequence[nn.Module], indices: Sequence[int], role: str) -> None:
    """Make the chosen blocks compute their attention matrix explicitly, so that hooks can read it."""
    # The fused kernel never materialises the attention matrix; the explicit path does. Left set: the explicit
    # path computes the same function, and the student exports to ONNX more easily with it.
    for i in indices:
        attention_of(blocks[i], role, i).fused_attn = False


def capture_attention(block: nn.Module, index: int, into: dict[int, Tensor]) -> RemovableHandle:
    """Hook storing the block's attention probabilities [B, heads, N, N] in ``into[index]``."""

    # The input of attn_drop is the softmaxed attention before dropout.
    def hook(_m: nn.Module, args: tuple[Tensor, ...], _out: Tensor) -> None:
        into[index] = args[0]

    return attention_of(block, "", index).attn_drop.register_forward_hook(hook)


def attention_loss(
    s_maps: dict[int, Tensor],
    t_maps: dict[int, Tensor],
    pairs: Sequence[tuple[int, int]],
    align: TokenAlignment,
) -> Tensor:
    """Per sample [B]: KL(teacher || student) per query row of the head-averaged maps, averaged over the
    query rows and the (student block, teacher block) ``pairs``. Head counts may differ."""
    per_sample = []
    for si, ti in pairs:
        # Head average: a distribution over keys per query whatever the head count.
        a_s, a_t = s_maps[si].float().mean(1), t_maps[ti].float().mean(1)
        align.check(a_s.shape[-1], a_t.shape[-1])
        a_s = align.student(a_s, (1, 2))
        a_t = align.teacher(a_t, (1, 2))
        if align.prefixes_differ:
            # Dropped key columns took probability mass: renormalise each row to a distribution again.
            a_s = a_s / a_s.sum(-1, keepdim=True).clamp_min(_EPS)
            a_t = a_t / a_t.sum(-1, keepdim=True).clamp_min(_EPS)
        kl_rows = (torch.special.xlogy(a_t, a_t) - a_t * a_s.clamp_min(_EPS).log()).sum(-1)  # [B, N]
        per_sample.append(kl_rows.mean(-1))
    return torch.stack(per_sample).mean(0)
