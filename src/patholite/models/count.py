"""What a network's architecture costs: parameters and FLOPs of one image (attention counted)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def unfused_attention(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run timm attention without fused SDPA, whose FLOPs torch's counter cannot see on CPU."""
    modules = [m for m in model.modules() if hasattr(m, "fused_attn")] if enabled else []
    saved = [m.fused_attn for m in modules]
    for m in modules:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, value in zip(modules, saved, strict=True):
            m.fused_attn = value


def count_flops(model: nn.Module, image_size: int, device: torch.device | str = "cpu") -> dict[str, int]:
    """FLOPs of one image (2 per multiply-add). ``flops`` counts attention; ``flops_fused_uncounted`` is
    what the counter reports with fused attention (the figure R2 quotes)."""
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    out = {}
    for key, unfused in (("flops", True), ("flops_fused_uncounted", False)):
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), unfused_attention(model, unfused), counter:
            model(x)
        out[key] = int(counter.get_total_flops())
    return out
