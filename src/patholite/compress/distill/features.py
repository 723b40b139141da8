"""Feature distillation (R1): the output tokens of chosen blocks, the student's projected to the teacher's
width by a trained linear map where the widths differ, compared by mean squared error."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from patholite.compress.distill.align import TokenAlignment


def width(net: nn.Module, role: str) -> int:
    """The token width of a timm ViT (``embed_dim``, else ``num_features``)."""
    value = getattr(net, "embed_dim", None) or getattr(net, "num_features", None)
    if not isinstance(value, int):
        raise ValueError(f"cannot tell the token width of the {role} ({type(net).__name__} has no embed_dim)")
    return value


def feature_projections(student: nn.Module, teacher: nn.Module, count: int) -> nn.ModuleList:
    """One map per block pair from the student's width to the teacher's (identity when they agree)."""
    d_s, d_t = width(student, "student"), width(teacher, "teacher")
    return nn.ModuleList(nn.Linear(d_s, d_t) if d_s != d_t else nn.Identity() for _ in range(count))


def capture_features(block: nn.Module, index: int, into: dict[int, Tensor]) -> RemovableHandle:
    """Hook storing the block's output tokens [B, N, D] in ``into[index]``."""

    def hook(_m: nn.Module, _args: tuple[Tensor, ...], out: Tensor) -> None:
        into[index] = out

    return block.register_forward_hook(hook)


def feature_loss(
    s_feats: dict[int, Tensor],
    t_feats: dict[int, Tensor],
    projs: nn.ModuleList,
    pairs: Sequence[tuple[int, int]],
    align: TokenAlignment,
) -> Tensor:
    """Per sample [B]: MSE between projected student and teacher tokens, averaged over the block ``pairs``."""
    per_sample = []
    for proj, (si, ti) in zip(projs, pairs, strict=True):
        f_s, f_t = s_feats[si], t_feats[ti]
        align.check(f_s.shape[1], f_t.shape[1])
        f_s = align.student(f_s, (1,))
        f_t = align.teacher(f_t, (1,))
        diff = proj(f_s).float() - f_t.float()
        per_sample.append(diff.pow(2).mean((1, 2)))
    return torch.stack(per_sample).mean(0)
