"""Kind ``torch_autocast``: the float network run by torch under ``torch.autocast("cpu", dtype=bfloat16)``.

The files are a float artifact's (``model.safetensors`` in FP32, the sidecar) plus ``autocast: bfloat16`` in
the sidecar; loading rebuilds the float network (``torch_float``) and wraps it so every call runs under
autocast. Why FP32 weights and not bf16 ones:

- autocast's numerics are the ones meant: matmuls and convolutions in bf16 (FP32 accumulation), LayerNorm,
  softmax and the residual sum in FP32. A network whose parameters were bf16 would carry its residual
  stream, positional embedding and norms in bf16 too (a bf16 ``pos_embed`` added to a bf16 patch embedding
  stays bf16), and lose more accuracy; casting bf16 weights back to FP32 on load keeps autocast's numerics
  but then holds FP32 in memory anyway, so only the file would shrink;
- the weights are exactly the source's: the artifact is the float model plus how to run it, and any FP32
  path (a teacher, ONNX export) can read them;
- the cost is the file: FP32's size. bf16 here is for speed, not size (INT8 and INT4 are the size paths).

On load, the weights of the layers autocast runs in bf16 (Linear, convolutions) are cast to bf16 once: the
cast autocast would otherwise make on every call, with the same rounding, so the outputs are bit for bit
autocast's (a test checks it); LayerNorm's parameters, the embeddings and tokens stay FP32.

A kind of its own, not a ``torch_float`` with a flag, because every ``torch_float`` check in the code means
"an FP32 torch module that may move to any device", which this is not: autocast here is the CPU's, and the
native-bf16 test is the CPU's. So it runs on the CPU only (like INT8 and ONNX), is counted on its float twin,
and is not taken as a run's float model or as a teacher.

Refused, never emulated: on a CPU without native bf16 (``accelerators.machine.bf16_unsupported_reason``),
``load`` raises before building anything, and ``check_autocast`` is what the ptq stage's preflight and the
bench call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from patholite.accelerators import machine
from patholite.artifacts.torch_float import load_float_artifact, save_float_artifact
from patholite.errors import AcceleratorError, ConfigError

KIND = "torch_autocast"
# sidecar value -> torch dtype; bf16 only: CPU autocast's float16 has no native kernels on the CPUs here
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16}


def check_autocast(autocast: str, what: str) -> None:
    """Refuse an unknown autocast dtype, and bf16 on a CPU without native bf16, naming ``what`` asked."""
    if autocast not in AUTOCAST_DTYPES:
        raise ConfigError(f"{what}: autocast {autocast!r} is not one of {list(AUTOCAST_DTYPES)}")
    reason = machine.bf16_unsupported_reason("torch")
    if reason:
        raise AcceleratorError(
            f"{what} runs torch under bf16 autocast, but {reason}; use the fp32 artifact or an INT8 one here"
        )


def save_autocast_artifact(
    model: nn.Module, directory: str | Path, meta: dict[str, Any], autocast: str = "bfloat16"
) -> list[str]:
    """``model``'s FP32 weights and a sidecar saying it runs under ``autocast``; returns the file names."""
    if autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast {autocast!r} is not one of {list(AUTOCAST_DTYPES)}")
    return save_float_artifact(model, directory, {**meta, "autocast": autocast}, kind=KIND)


# layers whose weights autocast casts to the lower precision on every call (its lower-precision op list)
CAST_ONCE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def cast_matmul_weights(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``net`` with the weights and biases of its ``CAST_ONCE`` layers in ``dtype``, in place: what autocast
    casts them to anyway, done once instead of per call."""
    for module in net.modules():
        if isinstance(module, CAST_ONCE):
            module.to(dtype)
    return net


class AutocastModule(nn.Module):
    """A float network whose every call runs under CPU autocast; outputs come back as FP32, so parity,
    softmax and the slide engine see what they see from any other artifact."""

    def __init__(self, net: nn.Module, dtype: torch.dtype, name: str = "this artifact") -> None:
        super().__init__()
        self.net = net
        self.dtype = dtype
        self.name = name

    def forward(self, x: torch.Tensor) -> Any:
        if x.device.type != "cpu":  # CPU autocast would leave CUDA ops in FP32: not what was recorded
            raise AcceleratorError(
                f"{self.name} runs torch bf16 autocast on the CPU only, but got a tensor on {x.device}: "
                "run it on the CPU (engine.device=cpu)"
            )
        with torch.autocast("cpu", dtype=self.dtype):
            out = self.net(x)
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()

    def get_classifier(self) -> Any:
        """The float network's classifier head (timm's), so its pre-logits can be tapped."""
        return self.net.get_classifier()


def load(directory: str | Path, meta: dict[str, Any]) -> nn.Module:
    autocast = meta.get("autocast", "bfloat16")
    check_autocast(autocast, f"artifact {directory}")  # refused before anything is built
    net, _ = load_float_artifact(directory)
    dtype = AUTOCAST_DTYPES[autocast]
    return AutocastModule(cast_matmul_weights(net, dtype), dtype, f"artifact {directory}")
