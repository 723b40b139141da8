"""R2's QAT-lite: fake-quantized fine-tuning through torch.ao FX, then a real INT8 model for the CPU.

``prepare_qat`` traces the network with torch.fx (timm ViTs trace as they are: no leaf modules or custom
tracer needed) and inserts fake quantization around the Linear layers and the patch-embedding Conv2d, the
ops with INT8 CPU kernels worth having; LayerNorm, Softmax (inside scaled-dot-product attention), GELU and the
residual adds stay float, as in R2. ``convert_qat`` turns it into quantized Linear/Conv modules (packed INT8
weights, x86/fbgemm kernels). The artifact is the INT8 state dict (read with ``weights_only=True``) plus the
sidecar (``patholite.artifacts.qat``).

Devices: fake-quant training runs on CPU or CUDA (torch.ao's fused fake-quant kernels exist for both); the
INT8 model always runs on CPU, so ``convert_qat`` moves a copy there. Other devices are refused early.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.ao.nn.qat import dynamic as nnqatd
from torch.ao.nn.quantized import dynamic as nnqd
from torch.ao.quantization import FakeQuantizeBase, QConfigMapping, convert, get_default_qat_qconfig
from torch.ao.quantization.qconfig import default_dynamic_qat_qconfig
from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

from patholite.errors import AcceleratorError, ConfigError

_QAT_DEVICES = ("cpu", "cuda")


@contextmanager
def quiet_quantization(*messages: str) -> Iterator[None]:
    """Silence torch.ao's deprecation notices (it still works in torch 2.14) and the given warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for message in (
            ".*quantized tensor creation",
            "Please use quant_min and quant_max",  # the engine's own default qconfig uses reduce_range
            *messages,
        ):
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield


def check_qat_device(device: str | torch.device) -> torch.device:
    """The device fake-quant training may use: cpu, or cuda when present. INT8 conversion is always on CPU.

    Raises ConfigError for device types QAT cannot train on (e.g. "mps", "npu": torch.ao's fused fake-quant
    ops have no kernels there) and AcceleratorError for cuda on a machine without it.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(
            f"QAT device {device!r} is not a torch device ({err}); QAT trains on cpu or cuda"
        ) from err
    if dev.type not in _QAT_DEVICES:
        raise ConfigError(
            f"QAT cannot train on device type {dev.type!r}: torch.ao fake quantization runs on "
            f"{' and '.join(_QAT_DEVICES)} only, and the INT8 model on CPU. Run the qat stage with "
            "accelerator=cpu (or gpu)."
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AcceleratorError(f"QAT device {dev} asked for, but this machine has no CUDA GPU; use cpu")
    return dev


def _check_engine(engine: str) -> None:
    supported = torch.backends.quantized.supported_engines
    if engine not in supported:
        raise ValueError(f"INT8 engine {engine!r} is not supported by this torch; it has {supported}")


def qat_qconfig_mapping(engine: str = "x86") -> Any:
    """Fake quantization for nn.Linear and nn.Conv2d only (engine's default QAT qconfig), nothing else.

    The engine's default QAT qconfig: per-channel symmetric INT8 weights, uint8 activations with a 7-bit
    range on x86 (reduce_range: no saturation on CPUs without VNNI). Everything else has no qconfig and
    stays float.
    """
    qconfig = get_default_qat_qconfig(engine)
    return QConfigMapping().set_object_type(nn.Linear, qconfig).set_object_type(nn.Conv2d, qconfig)


def prepare_qat(net: nn.Module, example: torch.Tensor, engine: str = "x86") -> nn.Module:
    """A fake-quantized, trainable copy of ``net`` (train mode, same device); ``net`` is left untouched.

    ``example`` is one input batch (any batch size: the traced graph keeps the batch dimension symbolic).
    """
    _check_engine(engine)
    torch.backends.quantized.engine = engine
    device = next(net.parameters(), torch.empty(0)).device
    check_qat_device(device)
    copy_ = copy.deepcopy(net).train()
    with quiet_quantization():
        try:
            prepared = prepare_qat_fx(copy_, qat_qconfig_mapping(engine), (example.to(device),))
        except Exception as err:  # noqa: BLE001 - torch.fx raises TraceError, TypeError, ... on untraceable code
            raise ConfigError(
                f"QAT needs a network torch.fx can trace; {type(net).__name__} cannot be ({err}). Use "
                "post-training quantization (ptq) for it instead."
            ) from err
    prepared.patholite_qat_engine = engine  # convert_qat packs the weights for this engine
    return prepared.train()


def _is_prepared(net: nn.Module) -> bool:
    return any(isinstance(m, FakeQuantizeBase) for m in net.modules())


def convert_qat(qat_net: nn.Module) -> nn.Module:
    """The real INT8 model (CPU, eval) of a ``prepare_qat`` network; the QAT network is left as it was."""
    if not _is_prepared(qat_net):
        raise ConfigError("convert_qat needs a network from prepare_qat (it has no fake-quantize modules)")
    engine = getattr(qat_net, "patholite_qat_engine", torch.backends.quantized.engine)
    _check_engine(engine)
    torch.backends.quantized.engine = engine  # weights are packed for the engine active at conversion
    with quiet_quantization():
        qnet = convert_fx(copy.deepcopy(qat_net).cpu().eval())
    qnet.patholite_qat_engine = engine
    return qnet.eval()


def is_converted(net: nn.Module) -> bool:
    """Whether ``net`` is a converted INT8 model (``convert_qat``): quantized modules, no fake quantizers."""
    return not _is_prepared(net) and any(
        type(m).__module__.startswith("torch.ao.nn.quantized") for m in net.modules()
    )


# ---------------------------------------------------------------------------------------- dynamic QAT
# For networks torch.fx cannot trace as they must run (SMT reads block 1's attention weights through a hook
# and switches its attention to the unfused path): eager-mode QAT that targets *dynamic* INT8. Every Linear
# becomes torch.ao's dynamic-QAT Linear (per-tensor symmetric INT8 fake-quantized weights, the observer
# dynamic INT8 uses at conversion); activations stay float in training and are quantized per batch at run
# time, as in any dynamic INT8 model. The converted network is exactly what ``quantize_dynamic`` makes of
# the float twin (same modules, same state-dict keys), so it saves and reloads as a dynamic INT8 artifact.
def prepare_dynamic_qat(net: nn.Module, engine: str = "x86") -> nn.Module:
    """A trainable copy of ``net`` whose Linear layers fake-quantize their weights (``net`` is untouched)."""
    _check_engine(engine)
    torch.backends.quantized.engine = engine
    check_qat_device(next(net.parameters(), torch.empty(0)).device)
    prepared = copy.deepcopy(net).train()
    linears = [m for m in prepared.modules() if type(m) is nn.Linear]
    if not linears:
        raise ConfigError(f"dynamic QAT quantizes Linear layers; {type(net).__name__} has none")
    for m in linears:
        m.qconfig = default_dynamic_qat_qconfig
    with quiet_quantization():
        convert(prepared, mapping={nn.Linear: nnqatd.Linear}, inplace=True, remove_qconfig=False)
    prepared.patholite_qat_engine = engine
    return prepared


def convert_dynamic_qat(qat_net: nn.Module) -> nn.Module:
    """The dynamic INT8 model (CPU, eval) of a ``prepare_dynamic_qat`` network, which is left as it was."""
    if not any(isinstance(m, nnqatd.Linear) for m in qat_net.modules()):
        raise ConfigError("convert_dynamic_qat needs a network from prepare_dynamic_qat (no QAT Linears)")
    engine = getattr(qat_net, "patholite_qat_engine", torch.backends.quantized.engine)
    _check_engine(engine)
    torch.backends.quantized.engine = engine
    with quiet_quantization():
        qnet = convert(copy.deepcopy(qat_net).cpu().eval(), mapping={nnqatd.Linear: nnqd.Linear})
    for m in qnet.modules():  # as quantize_dynamic leaves it: no qconfig attributes on the float modules
        if hasattr(m, "qconfig"):
            del m.qconfig
    return qnet.eval()
