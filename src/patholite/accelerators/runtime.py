"""Device helpers in torch alone, no Lightning, so that models and the measuring children (fresh processes
whose memory is the measurement) can import them: torch_npu loaded on request (torch knows no ``npu``
device before), and waiting for a device's queued work.
"""

from __future__ import annotations

import importlib

import torch

from patholite.errors import AcceleratorError

INSTALL = (
    "install Ascend's CANN toolkit for your NPU and driver (source its set_env.sh), then "
    "pip install 'patholite[npu]' (torch_npu matching torch " + torch.__version__.split("+")[0] + ")"
)


def import_torch_npu():
    """torch_npu, imported (which adds ``torch.npu``); a clear error when it or CANN is missing."""
    try:
        module = importlib.import_module("torch_npu")
    except ImportError as err:
        raise AcceleratorError(f"accelerator=npu needs torch_npu, which is not installed: {INSTALL}") from err
    except (OSError, RuntimeError) as err:  # the library is there but CANN's shared libraries are not
        raise AcceleratorError(f"torch_npu is installed but cannot load ({err}): {INSTALL}") from err
    if not hasattr(torch, "npu"):
        raise AcceleratorError(f"torch_npu imported but torch.npu is missing; reinstall it: {INSTALL}")
    return module


def npu_device_count() -> int:
    import_torch_npu()
    try:
        return int(torch.npu.device_count())
    except RuntimeError as err:  # the driver answers errors, not zero, when it cannot reach a device
        raise AcceleratorError(f"torch_npu cannot query the NPUs ({err}); check the Ascend driver") from err


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: what a timer must do before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def sync_name(device: torch.device) -> str:
    names = {"cuda": "cuda.synchronize", "npu": "npu.synchronize"}
    return names.get(device.type, "none (CPU is synchronous)")
