"""Energy counters, where this machine exposes one: RAPL on x86 CPUs, NVML on NVIDIA GPUs.

RAPL reports the whole CPU package: on a shared machine or VM it includes everyone's load, so energy per
image is an upper bound there. Where no counter is readable, callers record why instead of a number.
"""

from __future__ import annotations

import os
from pathlib import Path

from patholite.errors import PatholiteError


class RaplMeter:
    """Cumulative joules of every RAPL package zone, corrected for counter wrap-around."""

    def __init__(self, zones: list[Path]) -> None:
        self.zones = zones
        self.ranges = [int((z / "max_energy_range_uj").read_text()) for z in zones]
        self.last = [self._raw(z) for z in zones]
        self.total_uj = 0

    @staticmethod
    def _raw(zone: Path) -> int:
        return int((zone / "energy_uj").read_text())

    def joules(self) -> float:
        for i, zone in enumerate(self.zones):
            now = self._raw(zone)
            delta = now - self.last[i]
            self.total_uj += delta if delta >= 0 else delta + self.ranges[i]  # the counter wrapped
            self.last[i] = now
        return self.total_uj / 1e6


class NvmlMeter:
    """Cumulative joules of one GPU from NVML's total-energy counter (Volta and newer)."""

    def __init__(self, index: int) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = nvml_handle(pynvml, index)
        # GPUs without the counter (older ones, MIG slices) refuse the first read: refuse here, inside the
        # caller's guard, not in the middle of a timing run
        self.joules()

    def joules(self) -> float:
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1e3  # mJ


def nvml_handle(pynvml, index: int):
    """NVML's handle of torch's CUDA device ``index``.

    NVML numbers every GPU of the machine and ignores ``CUDA_VISIBLE_DEVICES`` (which SLURM sets), so torch's
    index is mapped: by the device's UUID where torch reports one, else through the variable's entries
    (ordinals, ``GPU-`` UUIDs or unique prefixes of them, ``MIG-`` UUIDs)."""
    uuid = _torch_uuid(index)
    if uuid is not None:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(uuid)
        except Exception:  # noqa: BLE001 - e.g. a MIG slice: its UUID is MIG-..., torch prints it bare
            pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if index >= len(entries):
        raise PatholiteError(f"CUDA device {index} is not among CUDA_VISIBLE_DEVICES={visible}")
    entry = entries[index]
    if entry.isdigit():
        # CUDA's ordinal; NVML's is the PCI order, the same with CUDA_DEVICE_ORDER=PCI_BUS_ID (as SLURM's
        # GPU binding assumes) or identical GPUs. The UUID above is exact whenever torch reports one.
        return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
    if entry.startswith("MIG-"):
        return pynvml.nvmlDeviceGetHandleByUUID(entry)
    prefix = entry if entry.startswith("GPU-") else f"GPU-{entry}"
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    matches = [h for h in handles if _text(pynvml.nvmlDeviceGetUUID(h)).startswith(prefix)]
    if len(matches) != 1:
        raise PatholiteError(
            f"CUDA_VISIBLE_DEVICES entry {entry!r} matches {len(matches)} of NVML's GPUs, not one"
        )
    return matches[0]


def _torch_uuid(index: int) -> str | None:
    """The UUID torch reports for CUDA device ``index`` as NVML spells it (``GPU-...``), if any."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    except Exception:  # noqa: BLE001 - an older torch, or a driver that refuses: map through the variable
        return None
    text = str(uuid or "")
    if not text:
        return None
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def open_meter(device_type: str, index: int = 0) -> tuple[RaplMeter | NvmlMeter | None, str]:
    """A meter for the device and what it measures, or None and the reason there is none. RAPL measures the
    CPU package, so it stands only for the CPU: another device without its own meter gets none."""
    if device_type == "cuda":
        try:
            return NvmlMeter(index), "NVML total energy of the GPU"
        except ImportError:
            return None, "NVML energy needs pynvml: pip install nvidia-ml-py"
        except Exception as err:  # noqa: BLE001 - the driver refuses, or the GPU has no energy counter
            return None, f"NVML energy not readable on this GPU ({type(err).__name__}: {err})"
    if device_type != "cpu":
        return None, (
            f"no energy meter for {device_type} devices (RAPL would measure the CPU package, not the "
            f"{device_type})"
        )
    root = Path(os.environ.get("PATHOLITE_RAPL_ROOT", "/sys/class/powercap"))
    zones = sorted(z for z in root.glob("intel-rapl:*") if z.name.count(":") == 1)  # packages, not sub-zones
    if not zones:
        return None, f"no RAPL zones under {root} (not an x86 host that exposes RAPL, or a VM that hides it)"
    try:
        meter = RaplMeter(zones)
    except (OSError, ValueError) as err:
        return None, f"RAPL not readable ({err}); reading energy_uj usually needs root"
    return meter, "RAPL CPU package energy: the whole package, so on a shared machine other load counts too"
