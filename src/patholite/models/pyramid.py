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
