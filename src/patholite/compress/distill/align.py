"""Lining up the student with the teacher for the attention and feature levels: which blocks pair up, and
which tokens.

Blocks pair up by relative depth (R1's shallow, middle and deep levels by default). Extra prefix tokens
(DeiT's distillation token, registers) are dropped from the comparison so that a distilled DeiT student can
learn from a plain ViT teacher; patch tokens must match in number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from patholite.errors import ConfigError

# ---------------------------------------------------------------------------------------------------- blocks


def default_blocks(depth: int) -> list[int]:
    """R1's shallow, middle and deep levels: blocks depth//4, depth//2 and depth-1."""
    return [depth // 4, depth // 2, depth - 1]


def _blocks_of(net: nn.Module, role: str) -> Sequence[nn.Module]:
    blocks = getattr(net, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise ValueError(
            f"levels attention/features need a ViT-like {role} with `.blocks`; "
            f"{type(net).__name__} has none: use levels=[logits]"
        )
    return blocks


def _resolve_indices(indices: Sequence[int], depth: int, role: str) -> list[int]:
    out = []
    for i in indices:
        i = int(i)
        if not -depth <= i < depth:
            # A ConfigError: the config cannot know the network's depth.
            raise ConfigError(f"{role}_blocks has {i}, but the {role} has {depth} blocks (0..{depth - 1})")
        out.append(i % depth)
    return out


def _relative(indices: Sequence[int], depth_from: int, depth_to: int) -> list[int]:
    """Same relative depth in the other network; first maps to first, last to last."""
    if depth_from == 1:
        return [depth_to - 1 for _ in indices]
    return [round(i * (depth_to - 1) / (depth_from - 1)) for i in indices]


def block_pairs(
    student: nn.Module,
    teacher: nn.Module,
    student_blocks: Sequence[int] | None,
    teacher_blocks: Sequence[int] | None,
) -> list[tuple[int, int]]:
    """(student block, teacher block) pairs, each once; an index left out is the other's relative depth."""
    d_s, d_t = len(_blocks_of(student, "student")), len(_blocks_of(teacher, "teacher"))
    if student_blocks is None and teacher_blocks is None:
        s_idx, t_idx = default_blocks(d_s), default_blocks(d_t)
    elif teacher_blocks is None:
        s_idx = _resolve_indices(student_blocks, d_s, "student")
        t_idx = _relative(s_idx, d_s, d_t)
    elif student_blocks is None:
        t_idx = _resolve_indices(teacher_blocks, d_t, "teacher")
        s_idx = _relative(t_idx, d_t, d_s)
    else:
        s_idx = _resolve_indices(student_blocks, d_s, "student")
        t_idx = _resolve_indices(teacher_blocks, d_t, "teacher")
    if len(s_idx) != len(t_idx) or not s_idx:
        raise ValueError(
            f"student_blocks {list(s_idx)} and teacher_blocks {list(t_idx)} must pair up one to one "
            "(same non-zero length)"
        )
    # Shallow nets repeat an index in the defaults (depth 2: [0, 1, 1]): keep each pair once.
    return list(dict.fromkeys(zip(s_idx, t_idx, strict=True)))


# ---------------------------------------------------------------------------------------------------- tokens


def num_patches(net: nn.Module) -> int | None:
    """Patch tokens a timm ViT makes at its configured image size; None if it cannot tell statically."""
    patch_embed = getattr(net, "patch_embed", None)
    n = getattr(patch_embed, "num_patches", None)
    if getattr(net, "dynamic_img_size", False) or not isinstance(n, int):
        return None
    return n


def _shape_hint(net: nn.Module) -> str:
    pe = getattr(net, "patch_embed", None)
    return f"img_size={getattr(pe, 'img_size', '?')}, patch_size={getattr(pe, 'patch_size', '?')}"


@dataclass(frozen=True)
class TokenAlignment:
    """Prefix-token counts of both networks, and their image and patch sizes for error messages."""

    student_prefix: int
    teacher_prefix: int
    student_shape: str
    teacher_shape: str

    @classmethod
    def of(cls, student: nn.Module, teacher: nn.Module) -> TokenAlignment:
        """The alignment of two timm ViTs; networks without prefix tokens count 0."""
        return cls(
            int(getattr(student, "num_prefix_tokens", 0)),
            int(getattr(teacher, "num_prefix_tokens", 0)),
            _shape_hint(student),
            _shape_hint(teacher),
        )

    @property
    def prefixes_differ(self) -> bool:
        return self.student_prefix != self.teacher_prefix

    def mismatch(self, p_s: int, p_t: int) -> ConfigError:
        """The error for ``p_s`` student patch tokens against ``p_t`` teacher ones."""
        # A ConfigError: seen only on the built networks, and fixed by a setting (sizes or levels).
        return ConfigError(
            f"the student sees {p_s} patch tokens ({self.student_shape}) but the teacher {p_t} "
            f"({self.teacher_shape}): attention and feature distillation compare token by token, so "
            "both need the same image size and patch size; align them or use levels=[logits]"
        )

    def check(self, n_s: int, n_t: int) -> None:
        """Raise the mismatch error unless ``n_s`` student and ``n_t`` teacher tokens hold as many patches."""
        p_s, p_t = n_s - self.student_prefix, n_t - self.teacher_prefix
        if p_s != p_t:
            raise self.mismatch(p_s, p_t)

    def student(self, x: Tensor, dims: Sequence[int]) -> Tensor:
        """The student's tokens along ``dims`` without the prefix tokens the teacher lacks."""
        return self._drop(x, self.student_prefix, dims)

    def teacher(self, x: Tensor, dims: Sequence[int]) -> Tensor:
        """The teacher's tokens along ``dims`` without the prefix tokens the student lacks."""
        return self._drop(x, self.teacher_prefix, dims)

    def _drop(self, x: Tensor, prefix: int, dims: Sequence[int]) -> Tensor:
        # Keep the first min(P_s, P_t) prefix tokens and all patch tokens.
        keep = min(self.student_prefix, self.teacher_prefix)
        if prefix == keep:
            return x
        for d in dims:
            x = torch.cat((x.narrow(d, 0, keep), x.narrow(d, prefix, x.shape[d] - prefix)), dim=d)
        return x
