"""Turn the ``accelerator`` config into Lightning's settings and a torch device, failing early.

``cpu`` and ``gpu`` are what they say; ``auto`` picks what the machine has and records its pick; ``npu`` is
Ascend through torch_npu. More than one device (``gpu_ddp``, or ``devices=N``; on the CPU, N gloo processes)
trains with DDP in spawned processes (``ddp_spawn``): Lightning's default ``ddp`` relaunches the whole
command line per rank, which under Hydra ``-m`` re-runs the sweep; spawned ranks run only ``trainer.fit``,
and the job's own process (the driver) evaluates, benchmarks and writes the record, so nothing after
training needs rank guards.

Across nodes (``num_nodes``) a launcher has started one process per device on each node (srun, torchrun:
``cluster``); DDP then runs in Lightning's cluster environment for that launcher, rank 0 is the driver, and
the other ranks train what it hands them (``pipelines.ranks``).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from omegaconf import ListConfig

from patholite.accelerators.cluster import Launch, launched
from patholite.accelerators.machine import describe_machine
from patholite.accelerators.npu import NPUAccelerator, npu_device_count, register
from patholite.errors import AcceleratorError, ConfigError


@dataclass(frozen=True)
class Fresh:
    """A Lightning object made anew for each Trainer: a strategy, accelerator or plugin that has run is bound
    to its trainer, and the next one (a student after its teacher) refuses it."""

    make: Callable[[], Any]
    precision: str = ""  # the training precision of a precision plugin it makes (the NPU's), for the record


@dataclass
class ResolvedAccelerator:
    name: str  # what the config asked for
    kind: str  # what runs: cpu | gpu
    lightning: dict[str, Any]  # accelerator, devices, strategy, precision for lightning.Trainer
    device: torch.device  # where evaluation and cost measurement run
    pin_memory: bool
    int8_engine: str
    notes: list[str] = field(default_factory=list)
    world_size: int = 1  # training processes (DDP ranks) of every node; evaluation runs in the driver
    launch: Launch | None = None  # the launcher's ranks (multi-node, srun or torchrun); None: this process

    @property
    def spawns(self) -> bool:
        """Training spawns its DDP ranks from this process (``ddp_spawn``), which only waits for them."""
        return self.world_size > 1 and self.launch is None

    @property
    def precision(self) -> str:
        """The precision training runs in, resolved (never ``auto``): Lightning's ``precision`` setting, or
        the NPU's mixed-precision plugin's."""
        if "precision" in self.lightning:
            return str(self.lightning["precision"])
        return str(getattr(self.lightning.get("plugins"), "precision", "") or "32-true")

    def trainer_kwargs(self) -> dict[str, Any]:
        """``lightning`` for one new Trainer, its strategy and plugin objects freshly made."""
        return {k: v.make() if isinstance(v, Fresh) else v for k, v in self.lightning.items()}

    def describe(self) -> dict[str, Any]:
        # an Accelerator instance (the NPU's) is recorded by its class name
        lightning = {k: _plain(v) for k, v in self.trainer_kwargs().items()}
        return {
            "requested": self.name,
            "kind": self.kind,
            **lightning,
            "eval_device": str(self.device),
            "int8_engine": self.int8_engine,
            "world_size": self.world_size,
            **({"launch": self.launch.describe()} if self.launch else {}),
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


def _plain_devices(devices: Any) -> Any:
    return list(devices) if isinstance(devices, (list, tuple, ListConfig)) else devices


def _device_ids(cfg, available: int, what: str) -> list[int]:
    """The device ids ``accelerator.devices`` names: a count, a list of ids, or "auto"/-1 for every one."""
    devices = _plain_devices(cfg.devices)
    if devices in ("auto", -1):
        ids = list(range(available))
    elif isinstance(devices, int) and devices >= 1:
        ids = list(range(devices))
    elif isinstance(devices, list) and devices and all(isinstance(d, int) and d >= 0 for d in devices):
        ids = list(devices)
    else:
        raise ConfigError(
            f"accelerator.devices={devices!r}: give a count (2), a list of ids ([0,1]) or auto (every one)"
        )
    if len(set(ids)) != len(ids):
        raise ConfigError(f"accelerator.devices={devices}: each device may be named once")
    if not ids or max(ids) >= available:
        raise AcceleratorError(
            f"accelerator.devices={devices} but this machine has {available} {what}"
            + (f" (ids 0-{available - 1})" if available else "")
        )
    return ids


def _strategy(cfg, ids: list[int], backend: str, launch: Launch | None) -> Any:
    """One device: Lightning's choice. Several: DDP in spawned processes (safe under ``-m``, see above). A
    launcher's ranks: DDP in its cluster environment (the processes exist; nothing is spawned)."""
    if launch is not None:
        if cfg.strategy not in ("auto", "ddp"):
            raise ConfigError(
                f"accelerator.strategy={cfg.strategy} under {launch.launcher}: its {launch.world_size} ranks "
                "train with DDP in Lightning's cluster environment; leave accelerator.strategy=auto"
            )
        return Fresh(
            lambda: DDPStrategy(
                process_group_backend=backend,
                find_unused_parameters=bool(cfg.find_unused_parameters),
                cluster_environment=launch.environment(),
            )
        )
    if len(ids) == 1:
        return cfg.strategy
    if cfg.strategy not in ("auto", "ddp_spawn"):
        raise ConfigError(
            f"accelerator.strategy={cfg.strategy} with {len(ids)} devices: patholite trains on several "
            "devices with ddp_spawn (the subprocess 'ddp' launcher re-runs the command line, and with it "
            "a whole Hydra sweep, per rank); leave accelerator.strategy=auto"
        )

    def make() -> DDPStrategy:
        # LightningEnvironment: this job's process spawns every rank on this node, even inside a SLURM job,
        # whose environment Lightning would otherwise read as "the ranks are SLURM's tasks" (1 here)
        return DDPStrategy(
            start_method="spawn",
            process_group_backend=backend,
            find_unused_parameters=bool(cfg.find_unused_parameters),
            cluster_environment=LightningEnvironment(),
        )

    return Fresh(make)


def _resolve_cpu(cfg, notes: list[str], launch: Launch | None) -> tuple[str, dict[str, Any], torch.device]:
    precision = "32-true" if cfg.precision == "auto" else cfg.precision
    if precision not in ("32-true", "32", "bf16-mixed", "bf16-true", "64-true"):
        raise ConfigError(f"accelerator.precision={precision} does not run on CPU; use 32-true or bf16-mixed")
    # On the CPU a "device" is a training process; gloo runs DDP between them (tests, CPU clusters).
    cores = os.cpu_count() or 1
    if isinstance(_plain_devices(cfg.devices), list):
        raise ConfigError(f"accelerator.devices={cfg.devices}: on the CPU give a process count, e.g. 2")
    ids = _device_ids(cfg, cores, "CPU cores")
    lightning = {
        "accelerator": "cpu",
        "devices": len(ids),
        "strategy": _strategy(cfg, ids, "gloo", launch),
        "precision": precision,
    }
    return "cpu", lightning, torch.device("cpu")


# bf16 arithmetic in hardware: Ampere (compute capability 8.0) and later. torch.cuda.is_bf16_supported()
# also says yes where it is emulated (V100, T4: slower than fp32), and answers for the current device only.
NATIVE_BF16_CAPABILITY = (8, 0)


def _emulated_bf16(ids: list[int]) -> str:
    """The devices among ``ids`` without native bf16, as "cuda:i (name, capability x.y)"; "" if none."""
    slow = []
    for i in ids:
        capability = tuple(torch.cuda.get_device_capability(i))
        if capability < NATIVE_BF16_CAPABILITY:
            name = torch.cuda.get_device_name(i)
            slow.append(f"cuda:{i} ({name}, compute capability {capability[0]}.{capability[1]})")
    return ", ".join(slow)


def _auto_gpu_precision(ids: list[int]) -> tuple[str, str]:
    """``precision: auto`` on the CUDA devices ``ids``: bf16-mixed only when every one of them has native bf16
    (compute capability >= 8.0), else 16-mixed; and why, for the record's notes."""
    if slow := _emulated_bf16(ids):
        return "16-mixed", f"{slow} has no native bf16 (needs compute capability >= 8.0)"
    devices = ", ".join(f"cuda:{i}" for i in ids)
    return "bf16-mixed", f"native bf16 on {devices} (compute capability >= 8.0)"


def _resolve_gpu(cfg, notes: list[str], launch: Launch | None) -> tuple[str, dict[str, Any], torch.device]:
    if not torch.cuda.is_available():
        raise AcceleratorError(
            f"accelerator={cfg.name} but torch sees no CUDA device on this machine; run with "
            "accelerator=cpu, or accelerator=auto to use a GPU only where there is one"
        )
    ids = _device_ids(cfg, torch.cuda.device_count(), "CUDA device(s)")
    precision = cfg.precision
    if precision == "auto":
        precision, why = _auto_gpu_precision(ids)
        notes.append(f"precision auto -> {precision}: {why}")
    elif precision in ("bf16-mixed", "bf16-true") and (slow := _emulated_bf16(ids)):
        notes.append(f"{precision} asked for, but {slow}: bf16 is emulated there (slow)")
    lightning = {
        "accelerator": "gpu",
        "devices": ids,
        "strategy": _strategy(cfg, ids, "nccl", launch),
        "precision": precision,
    }
    # a launcher's rank trains on its node's device ids[local rank]; rank 0 (local rank 0) evaluates on ids[0]
    return "gpu", lightning, torch.device("cuda", ids[0])


def _resolve_npu(cfg, notes: list[str], launch: Launch | None) -> tuple[str, dict[str, Any], torch.device]:
    """Ascend NPUs through torch_npu (the ``npu`` extra): fp16 mixed precision by default."""
    if launch is not None:
        raise AcceleratorError(
            f"accelerator=npu under {launch.launcher} with {launch.world_size} ranks: patholite trains on "
            "one NPU (HCCL multi-NPU DDP is not wired); run one process with accelerator.devices=1"
        )
    available = npu_device_count()  # imports torch_npu, or says what to install
    if available == 0:
        raise AcceleratorError("accelerator=npu: torch_npu sees no NPU on this machine (check npu-smi info)")
    ids = _device_ids(cfg, available, "NPU(s)")
    if len(ids) > 1:
        raise AcceleratorError(
            f"accelerator=npu with devices={cfg.devices}: patholite trains on one NPU (HCCL multi-NPU DDP is "
            "not wired); use accelerator.devices=1, or a list with one id"
        )
    register()
    first = ids[0]
    precision = "16-mixed" if cfg.precision == "auto" else cfg.precision
    lightning: dict[str, Any] = {"accelerator": Fresh(NPUAccelerator), "devices": [first]}
    lightning["strategy"] = cfg.strategy
    if cfg.strategy == "auto":
        # Lightning's "auto" puts a custom accelerator's single device on the CPU: name the NPU
        lightning["strategy"] = Fresh(partial(SingleDeviceStrategy, device=torch.device("npu", first)))
    if precision in ("16-mixed", "bf16-mixed"):
        # Lightning would autocast a custom accelerator as "cuda": name the device type for autocast and
        # the gradient scaler explicitly
        lightning["plugins"] = Fresh(lambda: [MixedPrecision(precision, device="npu")], precision=precision)
    else:
        lightning["precision"] = precision
    return "npu", lightning, torch.device("npu", first)


def process_group_backend(cfg) -> str:
    """The ``torch.distributed`` backend the ranks train with: nccl on CUDA GPUs, gloo on CPUs. Read from
    the config alone, before resolving, so that a launched job's ranks can join before any check fails."""
    asked = cfg.accelerator
    if asked == "auto":
        asked = "gpu" if torch.cuda.is_available() else "cpu"
    return "nccl" if asked == "gpu" else "gloo"


_RESOLVERS: dict[str, Callable] = {"cpu": _resolve_cpu, "gpu": _resolve_gpu, "npu": _resolve_npu}


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
        )
    num_nodes = int(cfg.num_nodes)
    if num_nodes < 1:
        raise ConfigError(f"accelerator.num_nodes={cfg.num_nodes}: give a node count, 1 or more")
    launch = launched()
    if launch is None and num_nodes > 1:
        raise AcceleratorError(
            f"accelerator.num_nodes={num_nodes}, but no cluster launcher started this process: neither the "
            "tasks of an srun step (SLURM_NTASKS, SLURM_PROCID, SLURM_STEP_NUM_TASKS) nor torchrun's workers "
            "(TORCHELASTIC_RUN_ID, RANK, WORLD_SIZE) are in its environment. Submit it with "
            "hydra/launcher=slurm (one task per device on each node), run it under srun or torchrun "
            f"--nnodes={num_nodes}; on one machine use accelerator.devices=N (ddp_spawn)"
        )
    kind, lightning, device = _RESOLVERS[asked](cfg, notes, launch)
    devices = lightning["devices"]
    world = devices if isinstance(devices, int) else len(devices)
    if launch is not None:
        launch.check(world, num_nodes)
        lightning["num_nodes"] = num_nodes
        world = launch.world_size
        notes.append(
            f"DDP over {world} {kind} processes on {num_nodes} node(s), started by {launch.launcher} "
            f"(Lightning's {type(launch.environment()).__name__}); rank 0 evaluates and writes the record"
        )
    elif world > 1:
        notes.append(f"DDP over {world} {kind} processes (ddp_spawn); evaluation runs in the driver")
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
        world_size=world,
        launch=launch,
    )
