"""The pipelined tile stream: loading, inference and saving overlap (R1: throughput = N / max(T_load,
T_process, T_save)).

Loader worker processes read and normalise tiles (each opens the slide once, lazily, in its own process),
the calling thread runs the model on batches, and a writer thread appends the predictions to the tile CSV.
With ``embed=True`` the model is an embedder (an encoder, or a classifier's pre-logits): its (B, D) outputs
are kept in tile order and the CSV lists the tiles without class columns (``mode=features``).
Every stage's busy time is measured where it happens, so a report can say which stage bounds the run.
"""

from __future__ import annotations

import contextlib
import csv
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from patholite.errors import CheckpointError, SlideError, user_message
from patholite.io import atomic_path
from patholite.wsi.reader import forget_cached, open_cached, resize_rgb

WORKER_NICE = 5  # scheduling priority of loader workers below the model thread's
LOADER_TIMEOUT_S = 300  # seconds a batch may take to arrive from the workers


@dataclass(frozen=True)
class TileSpec:
    """How one slide's tiles are cut and prepared for the model."""

    path: str
    coords: np.ndarray  # (N, 2) level-0 top-left
    size0: int  # level-0 side of a tile
    patch_size: int  # tile side at the target resolution (what the model was trained on, before its resize)
    image_size: int  # the model's input side
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mpp: float | None = None  # reader override
    backend: str = "auto"


class SlideTiles(Dataset):
    """Tiles of one slide as 3xHxW uint8 tensors at the model's input size (normalised in batches by the
    model thread: a quarter of the bytes through worker IPC)."""

    def __init__(self, spec: TileSpec) -> None:
        self.spec = spec

    def __len__(self) -> int:
        return len(self.spec.coords)

    def read(self, index: int) -> np.ndarray:
        """The tile as HxWx3 uint8 at the model's input size."""
        s = self.spec
        x, y = (int(v) for v in s.coords[index])
        slide = open_cached(s.path, s.mpp, s.backend)  # once per worker process
        image = slide.read_scaled((x, y), (s.size0, s.size0), (s.patch_size, s.patch_size))
        return resize_rgb(image, (s.image_size, s.image_size))  # not OpenCV: see resize_rgb

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, float]:
        start = time.perf_counter()
        tensor = torch.from_numpy(np.ascontiguousarray(self.read(index).transpose(2, 0, 1)))
        return tensor, index, time.perf_counter() - start


def copies_async(device: str | torch.device) -> bool:
    """Whether host batches for ``device`` are pinned and copied with ``non_blocking``: on CUDA, so the copy
    of the next batch overlaps the model's work; a CPU run is unchanged (no copy to overlap)."""
    return torch.device(device).type == "cuda"


class Normalise:
    """uint8 batches to the model's normalised float input, in the model thread."""

    def __init__(self, mean, std, device: str) -> None:
        self.device = device
        self.non_blocking = copies_async(device)
        # kept on the host until the first batch arrives on the device, then moved there once
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.scale = 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # from pinned memory (the loader's, on CUDA) the copy is asynchronous; the model's kernels queue
        # behind it on the same stream, and reading the results back (.cpu()) waits for them
        images = images.to(self.device, non_blocking=self.non_blocking)
        if self.mean.device != images.device:
            self.mean, self.scale = self.mean.to(images.device), self.scale.to(images.device)
        return (images.float() - self.mean) * self.scale


def _worker_init(_: int) -> None:
    # workers read and decode; the model's threads belong to the main process. Loading is latency-tolerant
    # (batches are prefetched), so on a machine with no spare core the scheduler favours the model.
    torch.set_num_threads(1)
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICE)


class PredictionWriter:
    """Appends per-tile predictions to a CSV from a background thread; the file appears complete or not at
    all (written to a temporary file, renamed on ``close``). No ``class_names``: the tiles alone (index,
    x, y, extra columns), what an embedding run lists."""

    def __init__(self, path: Path, class_names: list[str], coords: np.ndarray, extra: dict[str, np.ndarray]):
        self.path = path
        self.class_names = class_names
        self.coords = coords
        self.extra = extra
        self.busy_s = 0.0
        self.rows = 0
        self._queue: queue.Queue = queue.Queue(maxsize=64)
        self._error: BaseException | None = None
        self._atomic = atomic_path(path)
        self._tmp = self._atomic.__enter__()
        self._file = open(self._tmp, "w", newline="")  # noqa: SIM115 - closed in close()
        self._csv = csv.writer(self._file)
        classes = ["prediction", "label", *[f"p_{c}" for c in class_names]] if class_names else []
        self._csv.writerow(["tile", "x", "y", *extra, *classes])
        self._thread = threading.Thread(target=self._run, name="tile-writer", daemon=True)
        self._thread.start()

    def put(self, indices: np.ndarray, probs: np.ndarray | None) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((indices, probs))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue
            start = time.perf_counter()
            try:
                indices, probs = item
                if probs is None:  # tiles only (embeddings)
                    for i in indices:
                        x, y = self.coords[i]
                        extra = [f"{v[i]:.4f}" for v in self.extra.values()]
                        self._csv.writerow([int(i), int(x), int(y), *extra])
                else:
                    preds = probs.argmax(1)
                    for i, p, row in zip(indices, preds, probs, strict=True):
                        x, y = self.coords[i]
                        extra = [f"{v[i]:.4f}" for v in self.extra.values()]
                        name = self.class_names[p]
                        self._csv.writerow([int(i), int(x), int(y), *extra, int(p), name, *np.round(row, 5)])
                self.rows += len(indices)
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                self._error = err
            self.busy_s += time.perf_counter() - start

    def close(self, ok: bool = True) -> None:
        """Finish the file (``ok``), or drop it when the run failed; the writer's own error is raised only
        when nothing else failed first."""
        self._queue.put(None)
        self._thread.join()
        self._file.close()
        if self._error is not None or not ok:
            self._atomic.__exit__(RuntimeError, None, None)  # drops the temporary file
            if self._error is not None and ok:
                raise self._error
            return
        self._atomic.__exit__(None, None, None)


@dataclass
class StreamResult:
    probs: np.ndarray  # (N, C) in tile order; (N, 0) with embed=True
    timings: dict[str, float] = field(default_factory=dict)
    # (N, d) float32 in tile order, when the model returns (logits, features) or with embed=True
    embeddings: np.ndarray | None = None


def _loader(
    dataset: SlideTiles, batch_size: int, workers: int, prefetch: int, device: str = "cpu"
) -> DataLoader:
    kwargs = {}
    if workers > 0:
        kwargs = {
            "prefetch_factor": prefetch,
            "worker_init_fn": _worker_init,
            "persistent_workers": False,
            "timeout": LOADER_TIMEOUT_S,  # a stalled read (network storage, a deadlock) fails, never hangs
        }
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=copies_async(device),  # page-locked host batches: what a non-blocking copy needs
        **kwargs,
    )


def _unwrap_worker_error(err: BaseException, path: str) -> SlideError:
    """A loader worker's error, as our error naming the slide (without the worker's traceback)."""
    text = user_message(err)
    if isinstance(err, SlideError):
        return SlideError(text)
    return SlideError(f"slide {path}: reading tiles failed in a loader worker: {type(err).__name__}: {text}")


def _embedding_rows(output, path: str) -> np.ndarray:
    """An embedder's batch output as (B, D) float32 rows, checked finite."""
    if isinstance(output, tuple) or output.ndim != 2:
        shape = [tuple(o.shape) for o in output] if isinstance(output, tuple) else tuple(output.shape)
        raise CheckpointError(
            f"the embedding model returned {shape} on tiles of slide {path}, not one (batch, width) embedding"
        )
    rows = output.float().cpu().numpy()
    if not np.isfinite(rows).all():
        raise CheckpointError(
            f"the model's embeddings of tiles of slide {path} are not finite (NaN or inf): the artifact is "
            "broken (diverged training, or a bad INT8 conversion)"
        )
    return rows


@torch.inference_mode()
def stream_tiles(
    model: nn.Module,
    spec: TileSpec,
    class_names: list[str],
    csv_path: Path | None,
    batch_size: int = 32,
    workers: int = 2,
    prefetch: int = 4,
    device: str = "cpu",
    extra_columns: dict[str, np.ndarray] | None = None,
    embed: bool = False,
) -> StreamResult:
    """Run ``model`` over every tile of ``spec``; per-tile predictions go to ``csv_path`` (None: no file).

    ``model`` returns logits, or a tuple ``(logits, features)`` whose per-tile features are kept in tile
    order as the result's ``embeddings`` (``slides.baselines.EmbeddingTap`` makes one of a classifier).
    ``embed``: ``model`` returns embeddings (B, D) alone; they are the result's ``embeddings``, ``probs`` is
    (N, 0) and the CSV lists the tiles without class columns (pass no ``class_names``)."""
    dataset = SlideTiles(spec)
    normalise = Normalise(spec.mean, spec.std, device)
    n = len(dataset)
    probs = np.zeros((n, 0 if embed else len(class_names)), np.float32)
    embeddings = None
    load_busy = wait = process = 0.0
    start = time.perf_counter()
    ok, writer = False, None
    try:
        # workers fork here, before the writer thread exists: a fork copies no running thread's locks
        batches = iter(_loader(dataset, batch_size, workers, prefetch, device))
        if csv_path is not None:
            names = [] if embed else class_names
            writer = PredictionWriter(csv_path, names, spec.coords, extra_columns or {})
        while True:
            t0 = time.perf_counter()
            try:
                images, indices, read_s = next(batches)
            except StopIteration:
                break
            except SlideError as err:
                raise _unwrap_worker_error(err, spec.path) from None
            except Exception as err:
                if workers > 0:  # a worker's error, or its timeout
                    raise _unwrap_worker_error(err, spec.path) from None
                raise
            t1 = time.perf_counter()
            wait += t1 - t0
            load_busy += float(read_s.sum())
            logits = model(normalise(images))
            idx = indices.numpy()
            if embed:
                features = _embedding_rows(logits, spec.path)
                if embeddings is None:
                    embeddings = np.zeros((n, features.shape[1]), np.float32)
                embeddings[idx] = features
                process += time.perf_counter() - t1
                if writer is not None:
                    writer.put(idx, None)
                continue
            if isinstance(logits, tuple):
                logits, features = logits
                features = features.float().flatten(1).cpu().numpy()
                if embeddings is None:
                    embeddings = np.zeros((n, features.shape[1]), np.float32)
                embeddings[indices.numpy()] = features
            logits = logits.float()
            batch_probs = torch.softmax(logits, dim=1).cpu().numpy()
            process += time.perf_counter() - t1
            if not np.isfinite(batch_probs).all():
                raise CheckpointError(
                    f"the model's scores on tiles of slide {spec.path} are not finite (NaN or inf): the "
                    "artifact is broken (diverged training, or a bad INT8 conversion)"
                )
            probs[idx] = batch_probs
            if writer is not None:
                writer.put(idx, batch_probs)
        ok = True
    finally:
        if writer is not None:
            writer.close(ok)
        if workers == 0:
            forget_cached(spec.path)  # the main process keeps no slide open between slides
    total = time.perf_counter() - start
    timings = {
        "tiles": n,
        "wall_s": total,
        "load_busy_s": load_busy,  # summed over workers: reading, decoding, resizing, normalising
        "load_wait_s": wait,  # the model thread waiting for a batch: loading not hidden by the overlap
        "process_s": process,
        "save_busy_s": writer.busy_s if writer is not None else 0.0,
        "workers": workers,
        "tiles_per_s": n / total if total > 0 else float("nan"),
    }
    # R1's bound: the slowest stage, the loading spread over its workers
    slowest = max(load_busy / max(1, workers), process, timings["save_busy_s"])
    timings["bound_tiles_per_s"] = n / slowest if slowest > 0 else float("nan")
    return StreamResult(probs=probs, timings=timings, embeddings=embeddings)
