"""R1's pyramid multi-scale fusion head for timm Vision Transformers.

The token features of a shallow, a middle and a deep block are each global-average pooled over the patch
tokens, layer-normed, concatenated and classified, so the decision sees cell-level and tissue-level context.
"""

from __future__ import annotations

import torch
from torch import nn


def default_pyramid_blocks(depth: int) -> list[int]:
    return sorted({depth // 4, depth // 2, depth - 1})


class PyramidViT(nn.Module):
    """Wraps a timm ``VisionTransformer``; its own ``head`` replaces the ViT's classifier."""

    def __init__(self, vit: nn.Module, num_classes: int, blocks: list[int]) -> None:
        super().__init__()
        depth = len(vit.blocks)
        if not blocks or any(not 0 <= b < depth for b in blocks):
            raise ValueError(f"pyramid blocks {blocks} must lie in [0, {depth - 1}]")
        vit.reset_classifier(0)
        self.vit = vit
        self.blocks = sorted(set(blocks))
        self.num_classes = num_classes
        dim = vit.embed_dim
        self.scale_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in self.blocks)
        self.head = nn.Linear(dim * len(self.blocks), num_classes)
        self._freeze_unused()

    def _used_modules(self) -> list[nn.Module]:
        """The ViT's parts that ``forward_features`` runs (its own tokens and position embedding aside)."""
        vit = self.vit
        return [vit.patch_embed, vit.norm_pre, *list(vit.blocks)[: self.blocks[-1] + 1]]

    def _freeze_unused(self) -> None:
        """Stop the ViT parameters that ``forward`` never reaches from training.

        The ViT's final ``norm``, its ``fc_norm``/attention pool/heads and the blocks deeper than the last
        pyramid block get no gradient: DDP (``find_unused_parameters=False``) then fails on the second step
        waiting for them. Frozen rather than removed, they stay in the state dict, so pyramid artifacts
        saved before load strictly as ever; and since an optimiser skips a parameter without a gradient,
        one process trains exactly what it trained before.
        """
        used = {id(p) for m in self._used_modules() for p in m.parameters()}
        # the ViT's own parameters (class, register and distillation tokens, position embedding) all enter
        # the token sequence in ``_pos_embed``
        used |= {id(p) for p in self.vit.parameters(recurse=False)}
        for param in self.vit.parameters():
            if id(param) not in used:
                param.requires_grad_(False)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Pooled patch-token features of each pyramid block, shallow to deep."""
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        pooled = []
        for i, block in enumerate(vit.blocks):
            x = block(x)
            if i in self.blocks:
                pooled.append(x[:, vit.num_prefix_tokens :].mean(dim=1))
            if i == self.blocks[-1]:
                break
        return [norm(p) for norm, p in zip(self.scale_norms, pooled, strict=True)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat(self.forward_features(x), dim=1))

    def get_classifier(self) -> nn.Module:
        return self.head
