"""The device a measuring child process (``measure.timing``, ``measure.memory``) runs on: opened by name, and
its peak memory.

A child is a fresh interpreter: whatever the parent imported, it has not. An Ascend NPU is known to torch only
once torch_npu is imported, and with ``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` (set by the Makefile, advised in the
README) torch does not import it by itself, so ``torch.device("npu:0")`` would fail there.
"""

from __future__ import annotations

import torch

from patholite.accelerators.runtime import import_torch_npu


def open_device(name: str) -> torch.device:
    """``name`` (``cpu``, ``cuda:1``, ``npu:0``) as a torch device, torch_npu imported first for an NPU (a
    clear AcceleratorError when it cannot be)."""
    if name.split(":", 1)[0] == "npu":
        import_torch_npu()
    return torch.device(name)


def _memory_api(device: torch.device):
    """torch.cuda or torch.npu (torch_npu mirrors torch.cuda's memory statistics), None for other devices."""
    if device.type == "cuda":
        return torch.cuda
    if device.type == "npu":
        return torch.npu
    return None


def reset_device_peak(device: torch.device) -> None:
    """Start the device's peak-memory statistic afresh (nothing to do on the CPU)."""
    api = _memory_api(device)
    if api is not None:
        api.reset_peak_memory_stats(device)


def device_peak(device: torch.device) -> dict[str, float | str | None]:
    """The most memory torch's allocator held on ``device`` since the last reset, in MiB, and where it comes
    from: ``{"device_peak_mb", "device_peak_source"}``; ``device_peak_mb`` None and
    ``device_peak_absent_reason`` where the device has no such counter (the CPU: its memory is the RSS)."""
    api = _memory_api(device)
    if api is None:
        reason = (
            "ran on the CPU: its memory is the process's resident memory (peak_rss_mb)"
            if device.type == "cpu"
            else f"no peak-memory counter for {device.type} devices"
        )
        return {"device_peak_mb": None, "device_peak_absent_reason": reason}
    return {
        # counted when the host allocates, before the kernels run: no synchronisation needed
        "device_peak_mb": round(api.max_memory_allocated(device) / 2**20, 1),
        # tensors only: the runtime's context and the allocator's cached blocks are not counted
        "device_peak_source": f"torch.{device.type}.max_memory_allocated",
    }
