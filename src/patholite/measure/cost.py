"""What a model costs to run: size on disk, latency, throughput, memory (parameters and FLOPs:
``patholite.models.count``).

A short in-process measurement for the run record. Absolute CPU timings on a shared machine drift by up to
1.6x within minutes: compare artifacts by ratios measured in one process (``measure.timing``).
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from patholite.accelerators.runtime import synchronize


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` intra-op threads (None: unchanged), then restore the previous count."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def files_size(directory: str | Path, files: list[str]) -> int:
    return sum((Path(directory) / f).stat().st_size for f in files)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB). On Linux, VmHWM of its own address space:
    ``ru_maxrss`` carries the parent's high-water mark across fork/exec, so a child process of a big job
    would report the job's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _sync(device: torch.device) -> None:
    synchronize(device)


def time_block(
    model: nn.Module, x: torch.Tensor, warmup: int, iters: int, meter=None
) -> tuple[list[float], float | None]:
    """Latencies (ms) of ``iters`` synchronised calls after ``warmup``, and the joules they used (with a
    ``meter``)."""
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        _sync(x.device)
        times = []
        energy_start = meter.joules() if meter else None
        for _ in range(iters):
            start = time.perf_counter()
            model(x)
            _sync(x.device)
            times.append((time.perf_counter() - start) * 1000)
        joules = meter.joules() - energy_start if meter else None
    return times, joules


def latency_summary(times: list[float], batch: int) -> tuple[dict[str, float], float]:
    """``{"p50", "p90"}`` in ms and the throughput (images/s) at the median."""
    p50 = statistics.median(times)
    p90 = statistics.quantiles(times, n=10)[-1] if len(times) >= 2 else times[0]
    return {"p50": round(p50, 4), "p90": round(p90, 4)}, round(batch * 1000 / p50, 3)


def measure_latency(
    model: nn.Module,
    image_size: int,
    batch_sizes: list[int],
    warmup: int,
    iters: int,
    repeats: int = 1,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """p50/p90 latency (ms) and throughput (images/s) per batch size, in this process."""
    device = torch.device(device)
    latency, throughput = {}, {}
    for batch in batch_sizes:
        x = torch.randn(batch, 3, image_size, image_size, device=device)
        times = [t for _ in range(repeats) for t in time_block(model, x, warmup, iters)[0]]
        latency[str(batch)], throughput[str(batch)] = latency_summary(times, batch)
    return latency, throughput
