"""Turn the ``accelerator`` config into Lightning's settings and a torch device, failing early.

``cpu`` and ``gpu`` are what they say; ``auto`` picks what the machine has and records its pick. New
backends (the Ascend NPU, multi-GPU strategies) add a branch to ``_RESOLVERS``.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from patholite.errors import AcceleratorError, ConfigError


@dataclass
class ResolvedAccelerator:
    name: str  # what the config asked for
    kind: str  # what runs: cpu | gpu
    lightning: dict[str, Any]  # accelerator, devices, strategy, precision for lightning.Trainer
    device: torch.device  # where evaluation and cost measurement run
    pin_memory: bool
    int8_engine: str
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        # an Accelerator instance (the NPU's) is recorded by its class name
        lightning = {k: _plain(v) for k, v in self.lightning.items()}
        return {
            "requested": self.name,
            "kind": self.kind,
            **lightning,
            "eval_device": str(self.device),
            "int8_engine": self.int8_engine,
            "notes": self.notes,
            **describe_machine(self.device),
        }


def default_int8_engine(machine: str | None = None) -> str:
    """torch.ao's quantized engine for this CPU: qnnpack on ARM, x86 (fbgemm with oneDNN) elsewhere."""
    machine = (machine or platform.machine()).lower()
    return "qnnpack" if machine.startswith(("arm", "aarch")) else "x86"


def _plain(value: Any) -> Any:
    """A Lightning setting as a record can hold it: objects (the NPU accelerator, precision plugins) by
    their class name and precision."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    precision = getattr(value, "precision", None)
    return type(value).__name__ + (f"({precision})" if precision else "")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
    return info


def _count_devices(devices: Any) -> int | None:
    if isinstance(devices, int):
        return devices
    if isinstance(devices, (list, tuple)):
        return len(devices)
    return None  # "auto"


def _one_device(cfg) -> None:
    # Several devices make Lightning relaunch the command per rank (and, under -m, the whole sweep);
    # the accelerators issue brings DDP with a launcher that is safe under Hydra.
    n = _count_devices(cfg.devices)
    if n is not None and n != 1:
        raise AcceleratorError(
            f"accelerator.devices={cfg.devices}: this version trains on one device; multi-device (DDP) "
            "training comes with the accelerators issue. Use accelerator.devices=1"
        )


def _resolve_cpu(cfg) -> tuple[str, dict[str, Any], torch.device]:
    precision = "32-true" if cfg.precision == "auto" else cfg.precision
    if precision not in ("32-true", "32", "bf16-mixed", "bf16-true", "64-true"):
        raise ConfigError(f"accelerator.precision={precision} does not run on CPU; use 32-true or bf16-mixed")
    _one_device(cfg)
    return (
        "cpu",
        {"accelerator": "cpu", "devices": 1, "strategy": cfg.strategy, "precision": precision},
        torch.device("cpu"),
    )


def _resolve_gpu(cfg) -> tuple[str, dict[str, Any], torch.device]:
    if not torch.cuda.is_available():
        raise AcceleratorError(
            "accelerator=gpu but torch sees no CUDA device on this machine; run with accelerator=cpu, "
            "or accelerator=auto to use a GPU only where there is one"
        )
    available = torch.cuda.device_count()
    n = _count_devices(cfg.devices)
    if n is not None and n > available:
        raise AcceleratorError(
            f"accelerator.devices={cfg.devices} but this machine has {available} CUDA device(s)"
        )
    _one_device(cfg)
    first = int(cfg.devices[0]) if isinstance(cfg.devices, (list, tuple)) else 0
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    lightning = {
        "accelerator": "gpu",
        "devices": [first],
        "strategy": cfg.strategy,
        "precision": precision,
    }
    return "gpu", lightning, torch.device("cuda", first)


def _resolve_npu(cfg) -> tuple[str, dict[str, Any], torch.device]:
    """Ascend NPUs through torch_npu (the ``npu`` extra): fp16 mixed precision by default."""
    from patholite.accelerators.npu import NPUAccelerator, npu_device_count, register

    available = npu_device_count()  # imports torch_npu, or says what to install
    if available == 0:
        raise AcceleratorError("accelerator=npu: torch_npu sees no NPU on this machine (check npu-smi info)")
    n = _count_devices(cfg.devices)
    if n is not None and n > available:
        raise AcceleratorError(f"accelerator.devices={cfg.devices} but this machine has {available} NPU(s)")
    _one_device(cfg)
    register()
    first = int(cfg.devices[0]) if isinstance(cfg.devices, (list, tuple)) else 0
    precision = "16-mixed" if cfg.precision == "auto" else cfg.precision
    lightning: dict[str, Any] = {"accelerator": NPUAccelerator(), "devices": [first]}
    lightning["strategy"] = cfg.strategy
    if cfg.strategy == "auto":
        from lightning.pytorch.strategies import SingleDeviceStrategy

        # Lightning's "auto" puts a custom accelerator's single device on the CPU: name the NPU
        lightning["strategy"] = SingleDeviceStrategy(device=torch.device("npu", first))
    if precision in ("16-mixed", "bf16-mixed"):
        from lightning.pytorch.plugins.precision import MixedPrecision

        # Lightning would autocast a custom accelerator as "cuda": name the device type for autocast and
        # the gradient scaler explicitly
        lightning["plugins"] = [MixedPrecision(precision, device="npu")]
    else:
        lightning["precision"] = precision
    return "npu", lightning, torch.device("npu", first)


_RESOLVERS: dict[str, Callable] = {"cpu": _resolve_cpu, "gpu": _resolve_gpu, "npu": _resolve_npu}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: what a timer must do before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def sync_name(device: torch.device) -> str:
    names = {"cuda": "cuda.synchronize", "npu": "npu.synchronize"}
    return names.get(device.type, "none (CPU is synchronous)")


def resolve_accelerator(cfg) -> ResolvedAccelerator:
    """Check the ``accelerator`` node against this machine and resolve it; raises before any work."""
    asked = cfg.accelerator
    notes = []
    if asked == "auto":
        asked = "gpu" if torch.cuda.is_available() else "cpu"
        notes.append(f"auto picked {asked}")
    if asked not in _RESOLVERS:
        raise ConfigError(
            f"accelerator.accelerator={cfg.accelerator!r} is not one of {sorted(_RESOLVERS) + ['auto']}"
            " (multi-GPU support comes with the accelerators issue)"
        )
    kind, lightning, device = _RESOLVERS[asked](cfg)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    engine = default_int8_engine() if cfg.int8_engine == "auto" else cfg.int8_engine
    supported = torch.backends.quantized.supported_engines
    if engine not in supported:
        raise AcceleratorError(
            f"accelerator.int8_engine={engine} is not supported here; this torch has {supported}"
        )
    torch.backends.quantized.engine = engine
    return ResolvedAccelerator(
        name=cfg.name,
        kind=kind,
        lightning=lightning,
        device=device,
        pin_memory=bool(cfg.pin_memory) and kind == "gpu",
        int8_engine=engine,
        notes=notes,
    )
