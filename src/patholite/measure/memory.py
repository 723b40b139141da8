"""Peak memory of one artifact, measured in a fresh child process so nothing else the job did counts.

``python -m patholite.measure.memory <artifact dir> --batch N --iters K --image-size S [--device D]`` loads
the artifact, runs K forward passes of a batch of N on device D, and prints one JSON line: the resident memory
right after imports, the peak over the whole child (``ru_maxrss``), and their difference (what the artifact
itself costs); beside them, on a GPU or NPU, the device's peak (torch's allocator, reset before the artifact
is loaded, so weights, batch and activations count).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from patholite.artifacts.load import load_artifact
from patholite.measure.cost import peak_rss_mb
from patholite.measure.devices import device_peak, open_device, reset_device_peak


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def measure_in_child(
    directory: str | Path, batch: int, iters: int, image_size: int, timeout: int = 600, device: str = "cpu"
) -> dict:
    """``{"peak_rss_mb", "rss_after_imports_mb", "peak_increase_mb", "batch", "device", "device_peak_mb",
    "device_peak_source" | "device_peak_absent_reason"}``, or ``{"error": ...}``."""
    cmd = [
        sys.executable,
        "-m",
        "patholite.measure.memory",
        str(directory),
        "--batch",
        str(batch),
        "--iters",
        str(iters),
        "--image-size",
        str(image_size),
        "--device",
        str(device),
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"memory child timed out after {timeout} s"}
    if done.returncode != 0:
        return {"error": f"memory child exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(args: argparse.Namespace) -> dict[str, Any]:
    import timm  # noqa: F401  (imported before the baseline: the artifact's cost excludes library imports)
    import torch

    device = open_device(args.device)
    reset_device_peak(device)  # before the artifact is loaded: its weights count
    after_imports = _rss_mb()
    net, _ = load_artifact(args.directory)
    net = net.to(device)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    with torch.inference_mode():
        for _ in range(args.iters):
            net(x)
    peak = peak_rss_mb()
    return {
        "peak_rss_mb": round(peak, 1),
        "rss_after_imports_mb": round(after_imports, 1),
        "peak_increase_mb": round(peak - after_imports, 1),
        "batch": args.batch,
        "device": str(device),
        **device_peak(device),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    print(json.dumps(_child(parser.parse_args())))
