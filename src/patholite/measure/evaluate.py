"""Evaluate and cost one artifact on the run's test split: one function for every technique."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from patholite import artifacts as art
from patholite.artifacts.sidecar import read_sidecar
from patholite.measure.cost import files_size, measure_latency, peak_rss_mb, torch_threads
from patholite.measure.devices import device_peak
from patholite.measure.memory import measure_in_child
from patholite.measure.metrics import QualityMeter
from patholite.measure.stats import bootstrap
from patholite.measure.timing import energy_block, time_artifacts, timing_block
from patholite.models.count import count_flops, count_params
from patholite.records import COST_KEYS, QUALITY_KEYS, ArtifactRecord


@torch.inference_mode()
def predict(
    model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's float logits and the labels over ``loader``, in loader order (test loaders do not
    shuffle, so two artifacts' logits line up image by image)."""
    model.eval()
    logits, labels = [], []
    for images, y in loader:
        logits.append(model(images.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def bootstrap_accuracy_ci(
    correct: torch.Tensor, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> list[float]:
    """Percentile bootstrap interval of the accuracy (images resampled with replacement, fixed seed)."""
    hits = correct.float()
    return bootstrap(lambda idx: hits[idx].mean(dim=1), hits.numel(), resamples, level, seed)["ci"]


def quality_from_logits(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    meter = QualityMeter(class_names)
    meter.update(torch.softmax(logits, dim=1), labels)
    quality = meter.compute()
    quality["accuracy_ci95"] = bootstrap_accuracy_ci(logits.argmax(1) == labels)
    return quality


def evaluate_quality(
    model: nn.Module, loader: DataLoader, class_names: list[str], device: torch.device | str = "cpu"
) -> dict[str, Any]:
    return quality_from_logits(*predict(model, loader, device), class_names)


def parity(logits: torch.Tensor, reference: torch.Tensor, against: str) -> dict[str, Any]:
    """How far an artifact's outputs are from its source's on the same images: the share of top-1
    predictions that changed (flip rate) and the largest absolute logit difference."""
    if logits.shape != reference.shape:
        raise ValueError(f"parity: logits {tuple(logits.shape)} vs reference {tuple(reference.shape)}")
    return {
        "against": against,
        "flip_rate": float((logits.argmax(1) != reference.argmax(1)).float().mean()),
        "max_abs_logit_diff": float((logits - reference).abs().max()),
        "n_samples": int(logits.shape[0]),
    }


def count_architecture(model: nn.Module, image_size: int, directory: Path | None = None) -> dict[str, Any]:
    """Parameters and FLOPs, counted on the CPU whatever device the run uses (``count_flops``), so every row
    counts alike. Packed INT8 weights and ONNX graphs are invisible to torch's counters, so a non-float
    artifact is counted on its float twin (same architecture, surgery replayed)."""
    if directory is not None:
        meta = art.read_sidecar(directory)
        if meta["kind"] != "torch_float" or meta.get("runtime"):
            twin = art.create_float_twin(meta)
            return {"params": count_params(twin), **count_flops(twin, image_size)}
    return {"params": count_params(model), **count_flops(model, image_size)}


def measure_cost(
    model: nn.Module,
    image_size: int,
    bench,
    device: torch.device | str = "cpu",
    directory: Path | None = None,
    defer_timing: bool = False,
) -> dict[str, Any]:
    """Parameters, FLOPs, latency and throughput with the ``bench`` protocol: timed in a fresh child from the
    artifact ``directory`` (``bench.isolation=child``), else in this process. ``defer_timing``: the caller
    times this artifact later, together with its run's others (``time_together``)."""
    model.eval()
    static = count_architecture(model, image_size, directory)
    protocol = {"warmup": bench.warmup, "iters": bench.iters, "repeats": bench.repeats}
    if defer_timing:
        return {
            **static,
            "latency_ms": {},
            "throughput_ips": {},
            "device": str(device),
            "threads": None,
            "protocol": protocol,
            "timing": {"method": "pending"},
        }
    if bench.isolation == "child" and directory is not None:
        timing = time_artifacts([directory], image_size, bench, str(device))
        timed = timing["artifacts"][Path(directory).name]
        return {
            **static,
            "latency_ms": timed["latency_ms"],
            "throughput_ips": timed["throughput_ips"],
            "device": timing["device"],
            "threads": timing["threads"],
            "protocol": protocol,
            "timing": {"method": "child", "sync": timing["sync"], **energy_block(timing, directory)},
        }
    with torch_threads(bench.threads):
        threads = torch.get_num_threads()
        latency, throughput = measure_latency(
            model, image_size, list(bench.batch_sizes), bench.warmup, bench.iters, bench.repeats, device
        )
    return {
        **static,
        "latency_ms": latency,
        "throughput_ips": throughput,
        "device": str(device),
        "threads": threads,
        "protocol": protocol,
        "timing": {"method": "process"},
    }


def measure_memory(
    directory: str | Path, image_size: int, bench, device: torch.device | str
) -> dict[str, Any]:
    """``peak_rss_mb`` and how it was measured: a fresh child process per artifact at the largest batch, on
    the run's device (beside the RSS, a GPU's or NPU's own peak: ``memory.device_peak_mb``), or this process's
    peaks so far (``bench.isolation=process``)."""
    if bench.isolation == "child":
        batch = max(bench.batch_sizes)
        child = measure_in_child(directory, batch, iters=3, image_size=image_size, device=str(device))
        return {"peak_rss_mb": child.get("peak_rss_mb"), "memory": {"method": "child", **child}}
    return {
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "memory": {
            "method": "process",
            "note": "the job's peak so far, training included",
            **device_peak(torch.device(device)),
        },
    }


def artifact_cost(
    model: nn.Module,
    directory: str | Path,
    files: list[str],
    image_size: int,
    bench,
    device: torch.device | str = "cpu",
    defer_timing: bool = False,
) -> dict[str, Any]:
    """A saved artifact's cost block: parameters, FLOPs, timing (``measure_cost``), its files' bytes and peak
    memory, whatever kind of model it holds."""
    cost = measure_cost(model, image_size, bench, device, Path(directory), defer_timing)
    cost["size_bytes"] = files_size(directory, files)
    cost.update(measure_memory(directory, image_size, bench, device))
    return cost


def artifact_record(
    name: str,
    model: nn.Module,
    directory: str | Path,
    files: list[str],
    loader: DataLoader,
    class_names: list[str],
    image_size: int,
    bench,
    device: torch.device | str = "cpu",
    source: str | None = None,
    reference: torch.Tensor | None = None,
    defer_timing: bool = False,
) -> tuple[ArtifactRecord, torch.Tensor]:
    """Quality on ``loader`` and cost of a saved artifact, as one record row, and its logits on ``loader``.

    ``reference``: the ``source`` artifact's logits on the same loader; the row then holds their parity.
    """
    model = model.to(device)
    logits, labels = predict(model, loader, device)
    quality = quality_from_logits(logits, labels, class_names)
    cost = artifact_cost(model, directory, files, image_size, bench, device, defer_timing)
    assert set(quality) == set(QUALITY_KEYS) and set(cost) == set(COST_KEYS), "record schema drifted"
    record = ArtifactRecord(
        name=name,
        path=str(directory),
        files=files,
        quality=quality,
        cost=cost,
        source=source,
        parity=parity(logits, reference, source or "reference") if reference is not None else None,
        model=(read_sidecar(directory).get("model") or {}).get("name"),
    )
    return record, logits


def time_together(records: list[ArtifactRecord], image_size: int, bench, device: str = "cpu") -> None:
    """Time all of a run's artifacts in one fresh child, alternating (A B C A B C ...), and write each one's
    latency, throughput and per-repeat ratio to the first artifact into its record: the only comparison that
    survives a machine whose speed drifts between runs."""
    timing = time_artifacts([r.path for r in records], image_size, bench, device)
    for record in records:
        timed = timing["artifacts"][Path(record.path).name]
        record.cost.update(
            latency_ms=timed["latency_ms"],
            throughput_ips=timed["throughput_ips"],
            device=timing["device"],
            threads=timing["threads"],
        )
        record.cost["timing"] = timing_block(timing, record.path, [r.name for r in records])
