"""What a network's architecture costs: parameters and FLOPs of one image (attention counted)."""

from __future__ import annotations

import contextlib
import copy
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


def count_flops(model: nn.Module, image_size: int) -> dict[str, int]:
    """FLOPs of one image (2 per multiply-add). ``flops`` counts attention; ``flops_fused_uncounted`` is
    what the counter reports with fused attention on the CPU (the figure R2 quotes).

    Always counted on the CPU, on a CPU copy when ``model`` lives elsewhere: torch's counter sees fused
    attention's kernels on CUDA (and the meta device) but not on the CPU, so counting where the model runs
    would make ``flops_fused_uncounted`` depend on the run's device, and a GPU run's float rows disagree
    with its INT8 and ONNX rows (counted on CPU float twins)."""
    probe = model if _on_cpu(model) else _cpu_copy(model)
    x = torch.zeros(1, 3, image_size, image_size)
    out = {}
    for key, unfused in (("flops", True), ("flops_fused_uncounted", False)):
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), unfused_attention(probe, unfused), counter:
            probe(x)
        out[key] = int(counter.get_total_flops())
    return out


def count_unfused_flops(model: nn.Module, image_size: int) -> int:
    """``count_flops``' ``flops`` alone, counted on the meta device when ``model`` lives there (shapes without
    memory or arithmetic: how the pruning search counts its candidates), else on the CPU like
    ``count_flops``. With attention unfused, torch's counter sees every op on either device."""
    tensors = [*model.parameters(), *model.buffers()]
    on_meta = bool(tensors) and all(t.is_meta for t in tensors)
    probe = model if on_meta or _on_cpu(model) else _cpu_copy(model)
    x = torch.zeros(1, 3, image_size, image_size, device="meta" if on_meta else "cpu")
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), unfused_attention(probe), counter:
        probe(x)
    return int(counter.get_total_flops())


def _on_cpu(model: nn.Module) -> bool:
    return all(t.device.type == "cpu" for t in (*model.parameters(), *model.buffers()))


def _cpu_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the CPU, made without a second copy on its own device (values kept; zeros for
    meta tensors, which have none: FLOPs depend on shapes only)."""

    def cpu(t: torch.Tensor) -> torch.Tensor:
        return torch.zeros(t.shape, dtype=t.dtype) if t.is_meta else t.detach().cpu()

    memo: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(cpu(p), requires_grad=False)  # counted under inference_mode
    for b in model.buffers():
        memo[id(b)] = cpu(b)
    return copy.deepcopy(model, memo)
