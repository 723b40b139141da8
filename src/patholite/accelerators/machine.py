"""The machine a run measured on: CPU model, family/model/stepping, the ISA features INT8 and bf16 speed
depend on, cores, the CPUs this process may use, torch's threads, and a short ``machine_key`` to compare
machines by.

A speed figure means little without them: "AMD EPYC" alone is a Zen 3 with AVX2 only or a Zen 4 with AVX-512
VNNI and BF16, and INT8's gain over FP32 differs between the two. Every record's ``device`` block carries
these facts (``describe_machine``), and ``patholite.compare`` warns when a table mixes machines.

Linux is read from ``/proc/cpuinfo`` (x86 ``flags``, ARM ``Features``); elsewhere the features are
``"unknown"``. No Lightning here: the train, bench and slide records all call it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# The features that decide which INT8/bf16 kernels run, in the order a label names them. x86 names are the
# Linux kernel's /proc/cpuinfo flags; the ARM ones are its "Features" (dot product, int8 matmul, bf16, SVE).
X86_FEATURES = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
ARM_FEATURES = ("asimddp", "i8mm", "bf16", "sve")
# What a label shows first: the features that give fast INT8/bf16 (the rest is implied by them).
HEADLINE = ("amx_int8", "amx_bf16", "avx512_vnni", "avx512_bf16", "avx_vnni", "i8mm", "bf16", "asimddp")
UNKNOWN = "unknown"
UNKNOWN_MACHINE = "unknown machine"
# CPU flags that execute bf16 natively. x86: AVX512-BF16 (Cooper Lake, Zen 4) or AMX-BF16 (Sapphire Rapids+).
# ARM: the BF16 extension (Armv8.6 BFDOT/BFMMLA: Graviton3, Neoverse V1/N2), which torch's oneDNN + Arm
# Compute Library use for bf16 matmuls; OpenVINO's CPU plugin runs bf16 on x86-64 only (f32/f16 on ARM).
NATIVE_BF16_X86 = ("avx512_bf16", "amx_bf16")
NATIVE_BF16_ARM = ("bf16",)
CPUINFO = Path("/proc/cpuinfo")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


@dataclass(frozen=True)
class CpuInfo:
    """What ``/proc/cpuinfo`` says about the CPU (the first processor's identity; cores over all of them)."""

    model_name: str | None = None
    vendor: str | None = None
    family: int | None = None
    model: int | None = None
    stepping: int | None = None
    flags: frozenset[str] = field(default_factory=frozenset)
    logical_cpus: int | None = None
    physical_cores: int | None = None
    known: bool = False  # flags were read (False: another OS, or no cpuinfo)


def _int(value: str | None) -> int | None:
    """A cpuinfo number: decimal on x86 ("25"), hex on ARM ("0x41")."""
    if value is None:
        return None
    try:
        return int(value, 0) if value.lower().startswith("0x") else int(value)
    except ValueError:
        return None


def parse_cpuinfo(text: str) -> CpuInfo:
    """Parse the text of ``/proc/cpuinfo`` (x86 or ARM Linux); blocks are processors, blank-line separated."""
    blocks: list[dict[str, str]] = []
    for chunk in text.split("\n\n"):
        entry = {}
        for line in chunk.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                entry[key.strip().lower()] = value.strip()
        if "processor" in entry:
            blocks.append(entry)
    if not blocks:
        return CpuInfo()
    first = blocks[0]
    flags = first.get("flags", first.get("features"))
    # A physical core is a (package, core) pair: hyperthreads share one. ARM lists no core ids: each is one.
    cores = {(b.get("physical id", "0"), b["core id"]) for b in blocks if "core id" in b}
    return CpuInfo(
        model_name=first.get("model name"),  # ARM often has none: the caller falls back
        vendor=first.get("vendor_id") or first.get("cpu implementer"),
        family=_int(first.get("cpu family") or first.get("cpu architecture")),
        model=_int(first.get("model") or first.get("cpu part")),
        stepping=_int(first.get("stepping") or first.get("cpu variant")),
        flags=frozenset(flags.split()) if flags is not None else frozenset(),
        logical_cpus=len(blocks),
        physical_cores=len(cores) if cores else len(blocks),
        known=flags is not None,
    )


def read_cpuinfo(path: Path = CPUINFO) -> CpuInfo:
    """This machine's ``/proc/cpuinfo``, or an empty ``CpuInfo`` where there is none (macOS, Windows)."""
    try:
        return parse_cpuinfo(path.read_text())
    except OSError:
        return CpuInfo()


def microarchitecture(info: CpuInfo) -> str | None:
    """The core generation from vendor, family and model (AMD Zen, recent Intel Xeons); None if not known.

    The table is small on purpose: the features decide the kernels, this only names the generation so a reader
    sees that two "AMD EPYC" rows differ."""
    fam, mod = info.family, info.model
    if fam is None or mod is None:
        return None
    if info.vendor == "AuthenticAMD":
        if fam == 0x17:
            return "Zen 2" if mod >= 0x30 else "Zen/Zen+"
        if fam == 0x19:  # Zen 4: Genoa/Bergamo/Siena 10-1F and A0-AF, Raphael/Phoenix 60-7F; the rest Zen 3
            return "Zen 4" if 0x10 <= mod <= 0x1F or 0x60 <= mod <= 0x7F or 0xA0 <= mod <= 0xAF else "Zen 3"
        if fam == 0x1A:
            return "Zen 5"
    if info.vendor == "GenuineIntel" and fam == 6:
        if mod == 0x55:  # one model number for three generations, told apart by stepping
            step = info.stepping or 0
            return "Cooper Lake" if step >= 10 else "Cascade Lake" if step >= 5 else "Skylake-SP"
        return {
            0x6A: "Ice Lake-SP",
            0x6C: "Ice Lake-SP",
            0x8F: "Sapphire Rapids",
            0xCF: "Emerald Rapids",
            0xAD: "Granite Rapids",
            0xAE: "Granite Rapids",
        }.get(mod)
    return None


def isa_features(info: CpuInfo, machine: str | None = None) -> dict[str, bool] | str:
    """Each feature that matters for this architecture, present or not; ``"unknown"`` where none were read."""
    if not info.known:
        return UNKNOWN
    arch = (machine or platform.machine()).lower()
    names = ARM_FEATURES if arch.startswith(("arm", "aarch")) else X86_FEATURES
    return {name: name in info.flags for name in names}


def cpu_flags() -> set[str]:
    """This CPU's feature flags as Linux names them (empty where ``/proc/cpuinfo`` is not readable)."""
    return set(read_cpuinfo().flags)


def bf16_unsupported_reason(runtime: str = "torch", machine: str | None = None) -> str | None:
    """Why bf16 would not run natively on this CPU for ``runtime`` (``torch`` or ``openvino``); None: it does.

    Without native bf16 instructions torch and OpenVINO still run bf16, emulated (converted to FP32 around
    every op) and slower than FP32: patholite refuses that rather than run it silently. ``machine``: the
    architecture (default: this one)."""
    flags = cpu_flags()
    if not flags:
        return "the CPU's flags cannot be read (/proc/cpuinfo), so native bf16 cannot be confirmed"
    arm = (machine or platform.machine()).lower().startswith(("arm", "aarch"))
    if arm and runtime == "openvino":
        return "OpenVINO's CPU plugin runs bf16 on x86-64 only (f32 or f16 on ARM)"
    native = NATIVE_BF16_ARM if arm else NATIVE_BF16_X86
    if any(f in flags for f in native):
        return None
    wide = ("asimd", "sve") if arm else ("avx512", "avx2", "amx")
    have = sorted(f for f in flags if f.startswith(wide))
    return (
        f"this CPU has no native bf16 ({' or '.join(native)}; it has {have or 'neither'}): "
        "bf16 would be emulated, slower than FP32"
    )


def has_native_bf16(runtime: str = "torch") -> bool:
    """Whether ``runtime`` runs bf16 natively on this CPU (``bf16_unsupported_reason`` says why not)."""
    return bf16_unsupported_reason(runtime) is None


def usable_cpus() -> int | None:
    """The CPUs this process may run on (its affinity mask: taskset, SLURM's cgroup cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count()


def cpu_quota(path: Path = CGROUP_CPU_MAX) -> float | None:
    """The cgroup v2 CPU quota in CPUs (``cpu.max`` "200000 100000" -> 2.0); None when unlimited or absent.

    A container may see every CPU in its affinity mask yet be throttled to fewer by its quota."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return round(int(quota) / int(period), 2)
    except (ValueError, ZeroDivisionError):
        return None


def machine_key(facts: dict[str, Any]) -> str:
    """12 hex digits that change with the CPU model, its identity, its features that matter and the cores
    this process can use; not with threads or load. Flags outside the list are left out: a kernel update
    that names new flags is not a new machine."""
    identity = {
        k: facts.get(k)
        for k in (
            "cpu",
            "cpu_vendor",
            "cpu_family",
            "cpu_model",
            "cpu_stepping",
            "cpu_features",
            "cpu_physical_cores",
            "cpu_usable",
            "cpu_quota",
            "machine",
        )
    }
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def machine_label(device: dict[str, Any] | None) -> str:
    """A short name of a record's machine: "AMD EPYC (Zen 4: avx512_vnni, avx512_bf16), 2 cores"; "unknown
    machine" for a record written before machine facts were recorded."""
    device = device or {}
    if not device.get("machine_key"):
        return UNKNOWN_MACHINE
    features = device.get("cpu_features")
    if isinstance(features, dict):
        present = [f for f, on in features.items() if on]
        shown = [f for f in HEADLINE if f in present]
        if not shown:  # nothing fast for INT8/bf16: say what the widest vectors are
            shown = ["avx512f"] if "avx512f" in present else [f for f in ("avx2", "fma") if f in present]
        what = ", ".join(shown) or "no avx2"
    else:
        what = "features unknown"
    arch = device.get("cpu_microarchitecture")
    cpu = device.get("cpu") or "?"
    cores = device.get("cpu_usable") or device.get("cpu_count")
    label = f"{cpu} ({f'{arch}: ' if arch else ''}{what}), {cores} cores"
    if device.get("cpu_quota"):
        label += f" (quota {device['cpu_quota']:g})"
    if device.get("gpu"):
        label += f", {device['gpu']}"
    return label


def machine_identity(device: dict[str, Any] | None) -> str | None:
    """What tells two records' machines apart: the key, plus the GPU where one ran; None when unknown."""
    device = device or {}
    key = device.get("machine_key")
    if not key:
        return None
    return f"{key}+{device['gpu']}" if device.get("gpu") else key


def describe_cpu(info: CpuInfo | None = None) -> dict[str, Any]:
    """The machine facts of a record's ``device`` block (GPU facts are ``describe_machine``'s): the keys of
    older records (``cpu``, ``cpu_count``, ``torch_threads``, ``machine``) and the new ones."""
    import torch  # here, so that compare reads labels without loading torch

    info = info if info is not None else read_cpuinfo()
    facts: dict[str, Any] = {
        "cpu": info.model_name or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),  # logical CPUs of the machine
        "torch_threads": torch.get_num_threads(),  # intra-op threads of this process
        "machine": platform.machine(),
        "cpu_vendor": info.vendor,
        "cpu_family": info.family,
        "cpu_model": info.model,
        "cpu_stepping": info.stepping,
        "cpu_microarchitecture": microarchitecture(info),
        "cpu_features": isa_features(info),
        "cpu_physical_cores": info.physical_cores,
        "cpu_usable": usable_cpus(),
        "cpu_quota": cpu_quota(),
        # the widest vector kernels torch's CPU dispatch picked here (DEFAULT, AVX2, AVX512, ...)
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    facts["machine_key"] = machine_key(facts)
    facts["machine_label"] = machine_label(facts)
    return facts


def describe_machine(device: torch.device | None = None) -> dict[str, Any]:
    """The machine facts (``describe_cpu``), with the GPU's name and memory when ``device`` is a CUDA one."""
    import torch

    info = describe_cpu()
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["machine_label"] = machine_label(info)
    return info
