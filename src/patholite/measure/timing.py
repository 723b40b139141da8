"""Latency of several artifacts timed in ONE fresh process, alternating, so machine drift hits all alike.

CPU speed on a shared machine drifts by up to 1.6x within minutes: absolute numbers from separate
processes do not compare, ratios measured side by side do. Each repeat times every artifact in turn at every
batch size (the order reversed on odd repeats); the ratio of each artifact to the first (the baseline) is
taken per repeat, and reported as its median with its spread (min, max) over repeats.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from patholite.accelerators.machine import describe_machine
from patholite.accelerators.runtime import sync_name
from patholite.artifacts.load import load_artifact
from patholite.errors import PatholiteError
from patholite.measure.cost import latency_summary, time_block
from patholite.measure.devices import open_device
from patholite.measure.energy import open_meter
from patholite.progress import Progress

# The child's progress lines on its stderr start with this; everything else there is an error's text.
PROGRESS_PREFIX = "patholite-progress "


def time_artifacts(
    directories: list[str | Path], image_size: int, bench, device: str = "cpu", timeout: int = 3600
) -> dict[str, Any]:
    """Run the alternating protocol in a child process; returns its JSON result."""
    spec = {
        "directories": [str(d) for d in directories],
        "image_size": image_size,
        "device": device,
        "batch_sizes": list(bench.batch_sizes),
        "warmup": bench.warmup,
        "iters": bench.iters,
        "repeats": bench.repeats,
        "threads": bench.threads,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    blocks = len(spec["directories"]) * len(spec["batch_sizes"]) * spec["repeats"]
    try:
        description = f"timing {len(directories)} artifacts"
        with Progress(description, blocks, "blocks", rate_of="images") as progress:
            command = [sys.executable, "-m", "patholite.measure.timing", f.name]
            code, stdout, stderr = run_reporting_child(command, progress, timeout)
    finally:
        Path(f.name).unlink(missing_ok=True)
    if code != 0:
        raise PatholiteError(f"the timing process failed: {stderr.strip()[-2000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def run_reporting_child(command: list[str], progress: Progress, timeout: float) -> tuple[int, str, str]:
    """Run ``command`` (the timing child), showing its progress lines (``PROGRESS_PREFIX`` + JSON with
    ``images``, on its stderr) through ``progress`` as they come; returns its exit code, stdout and the rest
    of its stderr. Killed after ``timeout`` seconds."""
    child = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out: list[str] = []
    errors: list[str] = []

    def read_stdout() -> None:
        out.append(child.stdout.read())

    def read_stderr() -> None:
        for line in child.stderr:
            try:
                if line.startswith(PROGRESS_PREFIX):
                    progress.advance(1, images=json.loads(line[len(PROGRESS_PREFIX) :])["images"])
                    continue
            except (ValueError, KeyError, TypeError):
                pass  # not a progress line after all: kept as error text; the pipe must keep draining
            errors.append(line)

    # both pipes drained by threads, so neither fills while the child runs for up to ``timeout``
    readers = [threading.Thread(target=f, daemon=True) for f in (read_stdout, read_stderr)]
    for reader in readers:
        reader.start()
    try:
        child.wait(timeout=timeout)
    except subprocess.TimeoutExpired as err:
        child.kill()
        child.wait()
        raise PatholiteError(
            f"the timing process ran past {timeout:.0f} s and was stopped; time fewer artifacts, batch sizes "
            "or repeats (bench.batch_sizes, bench.iters, bench.repeats)"
        ) from err
    finally:
        for reader in readers:
            # a grandchild (torch.compile's workers) may still hold the pipes after a kill; the readers are
            # daemons, so what they have read by then is what the error shows
            reader.join(timeout=5)
    stdout = "".join(out)
    return child.returncode, stdout, "".join(errors)


def timing_block(timing: dict[str, Any], directory: str | Path, names: list[str]) -> dict[str, Any]:
    """The record's ``cost.timing`` of the artifact in ``directory`` from ``time_artifacts``' result:
    how it was timed, with which artifacts (``names``), and its per-repeat ratio to the first."""
    timed = timing["artifacts"][Path(directory).name]
    block = {
        "method": "child_alternating",
        "sync": timing["sync"],
        "timed_with": list(names),
        "baseline": timing["baseline"],
        "ratio_to_baseline": timed["ratio_to_baseline"],
    }
    return {**block, **energy_block(timing, directory)}


def energy_block(timing: dict[str, Any], directory: str | Path) -> dict[str, Any]:
    """The energy part of a record's ``cost.timing`` from ``time_artifacts``' result: joules per image of the
    artifact in ``directory`` and what measured them, or why nothing did."""
    timed = timing["artifacts"][Path(directory).name]
    block = {"energy_source": timing["energy_source"], "energy_absent_reason": timing["energy_absent_reason"]}
    if "energy_j_per_image" in timed:
        block["energy_j_per_image"] = timed["energy_j_per_image"]
    return block


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = open_device(spec["device"])  # a fresh interpreter: torch_npu imported here for an NPU
    meter, energy_source = open_meter(device.type, device.index or 0)
    names, nets = [], []
    for directory in spec["directories"]:
        net, meta = load_artifact(directory)
        names.append(Path(directory).name)
        nets.append(net.to(device))
    times = {n: {b: [] for b in spec["batch_sizes"]} for n in names}
    p50s = {n: {b: [] for b in spec["batch_sizes"]} for n in names}
    joules_per_image = {n: {b: [] for b in spec["batch_sizes"]} for n in names}
    for repeat in range(spec["repeats"]):
        for batch in spec["batch_sizes"]:
            x = torch.randn(batch, 3, spec["image_size"], spec["image_size"], device=device)
            order = list(range(len(nets)))[:: -1 if repeat % 2 else 1]
            for i in order:
                block, joules = time_block(nets[i], x, spec["warmup"], spec["iters"], meter)
                if joules is not None:
                    joules_per_image[names[i]][batch].append(joules / (spec["iters"] * batch))
                times[names[i]][batch] += block
                p50s[names[i]][batch].append(statistics.median(block))
                # one line per timed block on stderr, which the parent turns into its progress display
                images = (spec["warmup"] + spec["iters"]) * batch
                event = {"repeat": repeat, "batch": batch, "artifact": names[i], "images": images}
                print(PROGRESS_PREFIX + json.dumps(event), file=sys.stderr, flush=True)
    result: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "device": str(device),
        "sync": sync_name(device),
        "machine": describe_machine(device),  # the child's own facts: its threads, its CPUs
        "energy_source": energy_source if meter else None,
        "energy_absent_reason": None if meter else energy_source,
        "artifacts": {},
    }
    base = names[0]
    for n in names:
        entry: dict[str, Any] = {"latency_ms": {}, "throughput_ips": {}, "ratio_to_baseline": {}}
        for b in spec["batch_sizes"]:
            entry["latency_ms"][str(b)], entry["throughput_ips"][str(b)] = latency_summary(times[n][b], b)
            ratios = [a / r for a, r in zip(p50s[n][b], p50s[base][b], strict=True)]
            entry["ratio_to_baseline"][str(b)] = {
                "median": round(statistics.median(ratios), 4),
                "min": round(min(ratios), 4),
                "max": round(max(ratios), 4),
                "per_repeat": [round(r, 4) for r in ratios],
            }
        if meter:
            entry["energy_j_per_image"] = {
                str(b): round(statistics.median(joules_per_image[n][b]), 6) for b in spec["batch_sizes"]
            }
        result["artifacts"][n] = entry
    result["baseline"] = base
    return result


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(Path(sys.argv[1]).read_text()))))
