"""Energy counters, where this machine exposes one: RAPL on x86 CPUs, NVML on NVIDIA GPUs.

RAPL reports the whole CPU package: on a shared machine or VM it includes everyone's load, so energy per
image is an upper bound there. Where no counter is readable, callers record why instead of a number.
"""

from __future__ import annotations

import os
from pathlib import Path


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
    def __init__(self, index: int) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)

    def joules(self) -> float:
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1e3  # mJ


def open_meter(device_type: str, index: int = 0) -> tuple[RaplMeter | NvmlMeter | None, str]:
    """A meter for the device and what it measures, or None and the reason there is none."""
    if device_type == "cuda":
        try:
            return NvmlMeter(index), "NVML total energy of the GPU"
        except Exception as err:  # noqa: BLE001 - pynvml missing, or the driver refuses
            return None, f"NVML energy not readable ({type(err).__name__}: {err}); install pynvml"
    root = Path(os.environ.get("PATHOLITE_RAPL_ROOT", "/sys/class/powercap"))
    zones = sorted(z for z in root.glob("intel-rapl:*") if z.name.count(":") == 1)  # packages, not sub-zones
    if not zones:
        return None, f"no RAPL zones under {root} (not an x86 host that exposes RAPL, or a VM that hides it)"
    try:
        meter = RaplMeter(zones)
    except (OSError, ValueError) as err:
        return None, f"RAPL not readable ({err}); reading energy_uj usually needs root"
    return meter, "RAPL CPU package energy: the whole package, so on a shared machine other load counts too"
