"""Huawei Ascend NPUs through torch_npu: a Lightning accelerator registered as ``"npu"``.

Lightning has no NPU accelerator; this one drives torch_npu's device API (``torch.npu.device_count``,
``set_device``, ``synchronize``, ``memory_stats``). torch_npu is the optional ``npu`` extra and is imported
only here, on request: installed without Ascend's CANN toolkit it breaks ``import torch`` itself through
torch's device-backend autoload (``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` disables the autoload), so patholite
never imports it unless ``accelerator=npu`` asks for it.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.accelerators import Accelerator, AcceleratorRegistry

from patholite.accelerators.runtime import INSTALL, import_torch_npu, npu_device_count
from patholite.errors import AcceleratorError

__all__ = ["INSTALL", "NPUAccelerator", "import_torch_npu", "npu_device_count", "register"]


class NPUAccelerator(Accelerator):
    """Ascend NPU devices for Lightning, through torch_npu."""

    def setup_device(self, device: torch.device) -> None:
        if device.type != "npu":
            raise AcceleratorError(f"the NPU accelerator was given device {device}, not an NPU")
        torch.npu.set_device(device)

    def teardown(self) -> None:
        if hasattr(torch, "npu"):
            torch.npu.empty_cache()

    def get_device_stats(self, device: Any) -> dict[str, Any]:
        return dict(torch.npu.memory_stats(device))

    @staticmethod
    def parse_devices(devices: int | str | list[int]) -> list[int]:
        available = npu_device_count()
        if devices == "auto" or devices == -1:
            ids = list(range(available))
        elif isinstance(devices, int):
            ids = list(range(devices))
        elif isinstance(devices, str):
            ids = [int(d) for d in devices.split(",") if d.strip()]
        else:
            ids = [int(d) for d in devices]
        bad = [i for i in ids if not 0 <= i < available]
        if not ids or bad:
            raise AcceleratorError(
                f"accelerator.devices={devices}: this machine has {available} NPU(s) (ids 0-{available - 1})"
            )
        return ids

    @staticmethod
    def get_parallel_devices(devices: list[int]) -> list[torch.device]:
        return [torch.device("npu", i) for i in devices]

    @staticmethod
    def auto_device_count() -> int:
        return npu_device_count()

    @staticmethod
    def is_available() -> bool:
        try:
            return npu_device_count() > 0
        except AcceleratorError:
            return False

    @staticmethod
    def name() -> str:
        return "npu"

    @classmethod
    def register_accelerators(cls, accelerator_registry) -> None:
        accelerator_registry.register(cls.name(), cls, description=cls.__name__)


def register() -> None:
    """Make ``Trainer(accelerator="npu")`` mean this accelerator (idempotent)."""
    if "npu" not in AcceleratorRegistry:
        NPUAccelerator.register_accelerators(AcceleratorRegistry)
