"""Nystromformer low-rank attention (R5) as a drop-in for timm's ``Attention``.

Exact attention costs O(N^2) in the token count N. Nystromformer (Xiong et al., 2021) approximates the
softmax matrix from m landmarks, the segment means of the queries and of the keys:

    softmax(Q K~^T / s) pinv(softmax(Q~ K~^T / s)) softmax(Q~ K^T / s) V,

which costs O(N m) per head. ``NystromAttention`` reuses the timm module's own submodules (qkv, q_norm,
k_norm, norm, gate, proj and the dropouts), so the state dict keeps its keys and shapes: a checkpoint of the
exact network loads strictly into the approximated one and vice versa. The paper's optional depthwise
convolution skip on V is left out because it would add parameters.

Where the speed comes from: at 197 tokens (DeiT at 224 px) attention is a small share of the network's FLOPs,
so expect accuracy effects, not speed; the speed case is long sequences (thousands of tokens). The pinv costs
O(m^3) per image and head whatever N is, so at short sequences a large m can cost more than exact attention
(DeiT-Tiny at 224 px, counted by ``torch.utils.flop_counter``: exact 2.51 GFLOPs, m=24 2.31, m=32 2.39,
m=64 2.99).

ONNX: the forward exports with ``torch.onnx.export(dynamo=False, opset_version=17)`` (matmuls, softmax,
elementwise ops only); like the position embedding, the traced graph is fixed to the token count.
"""

from __future__ import annotations

import torch
from timm.layers import Attention
from torch import nn

from patholite.errors import ConfigError

# The submodules a timm ``Attention`` may hold (``gate`` is new in recent timm, absent in older ones).
_SHARED = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop")


def segment_means(n: int, m: int, like: torch.Tensor) -> torch.Tensor:
    """The (m, n) matrix whose rows average m contiguous segments of n tokens (needs m <= n).

    Token j belongs to segment floor(j * m / n) alone, so the segments partition the tokens, their sizes
    differ by at most one, and each row is a true mean. (Adaptive average pooling would let segments overlap
    when m does not divide n.) A matmul also exports to ONNX and is counted by ``torch.utils.flop_counter``.
    """
    seg = torch.arange(n, device=like.device) * m // n
    onehot = (seg.unsqueeze(0) == torch.arange(m, device=like.device).unsqueeze(1)).to(like.dtype)
    return onehot / onehot.sum(dim=1, keepdim=True)


def iterative_pinv(a: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of each (m, m) matrix in ``a`` by Razavi et al.'s iteration.

    Z0 = A^T / (||A||_1 ||A||_inf) makes the iteration converge; each step is
    Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4. Only matmuls, so it exports and runs anywhere.
    """
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    # Per-matrix norms (not the batch-wide max the reference code uses) keep every head's start well scaled.
    norm_1 = a.abs().sum(dim=-2).amax(dim=-1, keepdim=True).unsqueeze(-1)
    norm_inf = a.abs().sum(dim=-1).amax(dim=-1, keepdim=True).unsqueeze(-1)
    z = a.transpose(-2, -1) / (norm_1 * norm_inf)
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


class NystromAttention(nn.Module):
    """Multi-head self-attention approximated with ``landmarks`` Nystrom landmarks.

    With ``landmarks >= N`` tokens there is nothing to save, so the forward falls back to exact softmax
    attention (identical to timm's). Build it with :meth:`from_attention`.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        landmarks: int,
        pinv_iters: int,
        modules: dict[str, nn.Module | None],
    ) -> None:
        super().__init__()
        if landmarks < 1:
            raise ValueError(f"nystrom landmarks must be >= 1, got {landmarks}; use e.g. 24, 32 or 64")
        if pinv_iters < 1:
            raise ValueError(f"nystrom pinv_iters must be >= 1, got {pinv_iters}; the paper uses 6")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim**-0.5
        self.landmarks = landmarks
        self.pinv_iters = pinv_iters
        # Assigned in timm's order so state-dict keys come out in the same order too.
        for name in _SHARED:
            setattr(self, name, modules.get(name))

    @classmethod
    def from_attention(cls, attn: nn.Module, landmarks: int, pinv_iters: int = 6) -> NystromAttention:
        """Wrap a timm ``Attention`` (or re-wrap a ``NystromAttention``), sharing its parameters."""
        if not isinstance(attn, Attention | NystromAttention):
            raise ConfigError(
                f"Nystrom attention replaces timm's Attention, got {type(attn).__name__}; "
                "choose a timm ViT/DeiT whose blocks use timm.layers.Attention"
            )
        # An older timm may lack an identity slot (norm, q_norm); the gate alone is optional by design.
        modules = {name: getattr(attn, name, None) for name in _SHARED}
        for name in _SHARED:
            if modules[name] is None and name != "gate":
                modules[name] = nn.Identity()
        # Modules beyond those we know would be silently dropped (and their weights with them).
        extra = sorted(set(dict(attn.named_children())) - set(_SHARED))
        if extra:
            raise ConfigError(
                f"this timm Attention has submodules {extra} that Nystrom attention does not know; "
                "use a timm version whose Attention holds only " + ", ".join(_SHARED)
            )
        return cls(attn.num_heads, attn.head_dim, landmarks, pinv_iters, modules)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, landmarks={self.landmarks}"

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """Same signature as timm's ``Attention.forward``; masks are not supported."""
        if attn_mask is not None or is_causal:
            raise ConfigError(
                "Nystrom attention approximates full (unmasked) self-attention; attention masks and causal "
                "attention are not supported, use exact attention for this model"
            )
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q = q * self.scale

        if self.landmarks >= n:
            attn = self.attn_drop((q @ k.transpose(-2, -1)).softmax(dim=-1))
            out = attn @ v
        else:
            out = self._nystrom(q, k, v)

        out = out.transpose(1, 2).reshape(b, n, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    def _nystrom(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V for scaled q; shapes (B, H, N, D)."""
        means = segment_means(q.shape[-2], self.landmarks, q)
        q_l, k_l = means @ q, means @ k  # (B, H, m, D)
        left = self.attn_drop((q @ k_l.transpose(-2, -1)).softmax(dim=-1))  # (B, H, N, m)
        right = (q_l @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, m, N)
        # The iterative inverse multiplies cubes of the kernel: in half precision it diverges, so it runs in
        # float32 whatever the autocast or model dtype.
        with torch.autocast(device_type=q.device.type, enabled=False):
            core = (q_l.float() @ k_l.float().transpose(-2, -1)).softmax(dim=-1)
            core_inv = iterative_pinv(core, self.pinv_iters).to(q.dtype)
        # Right-to-left association keeps every product O(N m), never N x N.
        return left @ (core_inv @ (right @ v))


def _transformer_blocks(net: nn.Module) -> nn.Module:
    """The block sequence of a timm ViT, or of one wrapped as ``net.vit`` (the pyramid head)."""
    for owner in (net, getattr(net, "vit", None)):
        blocks = getattr(owner, "blocks", None)
        is_seq = isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks) > 0
        if is_seq and all(isinstance(getattr(b, "attn", None), Attention | NystromAttention) for b in blocks):
            return blocks
    raise ConfigError(
        f"Nystrom attention needs a timm Vision Transformer whose .blocks hold timm Attention modules; "
        f"{type(net).__name__} has none. Use a ViT/DeiT model family, not a CNN"
    )


def apply_nystrom(
    net: nn.Module, landmarks: int, blocks: list[int] | None = None, pinv_iters: int = 6
) -> nn.Module:
    """Replace ``net.blocks[i].attn`` with Nystrom attention for the chosen blocks (None: all), in place.

    The parameters are shared, not copied, so a state dict of the exact network loads with ``strict=True``.
    Returns ``net``.
    """
    if isinstance(landmarks, bool) or not isinstance(landmarks, int) or landmarks < 1:
        raise ValueError(f"nystrom landmarks must be an integer >= 1, got {landmarks!r}; R5 uses 24, 32, 64")
    seq = _transformer_blocks(net)
    depth = len(seq)
    chosen = list(range(depth)) if blocks is None else list(blocks)
    bad = [i for i in chosen if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth]
    if bad or (blocks is not None and not chosen):
        raise ValueError(
            f"nystrom blocks {blocks!r} must be a non-empty list of indices in [0, {depth - 1}] "
            "(or null for all blocks)"
        )
    for i in sorted(set(chosen)):
        seq[i].attn = NystromAttention.from_attention(seq[i].attn, landmarks, pinv_iters)
    return net
