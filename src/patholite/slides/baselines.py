"""The slide-level baselines SMT is measured against, on the same slides through the same slide engine.

Full tiling (R3's "Baseline"): every tissue tile of a slide at one resolution goes through the tile
classifier (``tile_outputs``: the engine's tissue detection, tiling and pipelined loader workers), and the
tile scores are pooled into a slide score (``pool_scores``, max or mean). The same pass keeps each tile's
pre-logits features, the bag a gated-attention MIL model (``patholite.models.mil``) is trained on from slide
labels. ``tile_outputs`` also counts what the pass costs: level-0-equivalent pixels read, and the reading,
model and wall seconds, the figures SMT's 1 + K + K^2 regions are compared with.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from patholite.config.slide_schema import EngineConfig, ReaderConfig, TileConfig, TissueConfig
from patholite.errors import CheckpointError, ConfigError
from patholite.slides.engine import stream_tiles
from patholite.slides.inference import TileGeometry, tile_geometry, tile_spec
from patholite.wsi.cache import slide_cache_dir, tissue_for
from patholite.wsi.reader import open_slide
from patholite.wsi.tiling import cached_tiles, check_request, tile_grid
from patholite.wsi.tissue import detect_tissue

POOLING = ("max", "mean")


# ------------------------------------------------------------------------------------------ embeddings
def classifier_head(model: nn.Module) -> nn.Module:
    """The module that turns a tile classifier's pre-logits features into its logits (timm's
    ``get_classifier``; a distilled DeiT's first head); an error for models that expose none."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if isinstance(head, tuple):  # distilled DeiT: (head, head_dist)
        head = head[0]
    if not isinstance(head, nn.Module) or isinstance(head, nn.Identity):
        raise CheckpointError(
            f"the tile classifier ({type(model).__name__}) exposes no classifier head, so its tile "
            "embeddings cannot be taken: use a torch float or dynamic-INT8 artifact (not ONNX or QAT), or "
            "embeddings=False"
        )
    return head


class EmbeddingTap(nn.Module):
    """A tile classifier that returns ``(logits, features)``: the features are the input of its classifier
    head (timm's ``forward_head(..., pre_logits=True)``; the pyramid head's concatenated scales), caught by
    a forward pre-hook while the model runs as it always does, so the logits are exactly the model's own."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.head = classifier_head(model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        caught: list[torch.Tensor] = []
        handle = self.head.register_forward_pre_hook(lambda _module, args: caught.append(args[0]))
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        if len(caught) != 1:
            raise CheckpointError(
                f"the tile classifier's head ran {len(caught)} times in one forward pass (a compiled or "
                "traced model hides it): its embeddings cannot be taken; use embeddings=False"
            )
        return logits, caught[0].flatten(1)


# ------------------------------------------------------------------------------------------ full tiling
@dataclass
class TileOutputs:
    """Every tissue tile of one slide through the tile classifier, in the tiling's row-major order."""

    slide: str
    class_names: list[str]
    coords: np.ndarray  # (N, 2) level-0 top-left x, y
    size0: int  # level-0 side of one tile
    probabilities: np.ndarray  # (N, C) softmax of the classifier's logits
    embeddings: np.ndarray | None  # (N, d) pre-logits features; None when not asked for
    read_pixels_level0: int  # N * size0^2: level-0-equivalent pixels read
    read_seconds: float  # reading, decoding, resizing tiles, summed over the loader workers
    model_seconds: float  # the model thread running batches
    wall_seconds: float  # the whole pass: opening, tissue detection, tiling, streaming
    tissue_fraction: np.ndarray | None = None  # (N,) tissue share of each tile
    tile: dict[str, Any] = field(default_factory=dict)  # the grid's geometry, as the slide report keeps it
    timings: dict[str, float] = field(default_factory=dict)  # every stage (the engine's, tissue_s, tiling_s)

    @property
    def n_tiles(self) -> int:
        return int(self.coords.shape[0])


def _plain(node: Any, default: type) -> dict[str, Any]:
    """A config node (dataclass, DictConfig, mapping; None: ``default()``) as a plain dict over ``default``'s
    fields: what a mapping leaves out keeps its default, a key the node does not know is an error."""
    values = dataclasses.asdict(default())
    if node is None:
        return values
    if isinstance(node, DictConfig):
        given = OmegaConf.to_container(node, resolve=True)
    elif dataclasses.is_dataclass(node):
        given = dataclasses.asdict(node)
    elif isinstance(node, Mapping):
        given = dict(node)
    else:
        raise ConfigError(f"expected a {default.__name__} (dataclass, DictConfig or mapping), got {node!r}")
    unknown = sorted(set(given) - set(values))
    if unknown:
        raise ConfigError(f"{default.__name__}: unknown keys {unknown}; known: {sorted(values)}")
    return {**values, **given}


def tile_outputs(
    slide_path: str | Path,
    model: nn.Module,
    meta: dict[str, Any],
    tile: TileConfig | TileGeometry | Mapping | None = None,
    *,
    tissue: TissueConfig | Mapping | None = None,
    reader: ReaderConfig | Mapping | None = None,
    engine: EngineConfig | Mapping | None = None,
    cache_dir: str | Path | None = None,
    embeddings: bool = True,
    csv_path: str | Path | None = None,
) -> TileOutputs:
    """Full tiling of one slide's tissue through the slide engine: tissue detection, the tile grid, then the
    pipelined stream (loader workers read, this thread runs ``model``).

    ``model``, ``meta``: a tile classifier in eval mode and its sidecar (``inference.load_classifier``):
    class names, input size, normalisation and the resolution it was trained at. ``tile``: the grid (size,
    mpp or magnification, overlap, theta) as the slide engine's ``tile`` node, None fields falling back to the
    artifact's; or a ``TileGeometry`` (overlap 0, theta 0.5). ``tissue``, ``reader``, ``engine``: the slide
    engine's nodes (defaults when None); the model's thread count is the caller's. ``cache_dir``: keep the
    tissue mask and tile grid there, shared with ``python -m patholite.slide`` (give its
    ``<paths.cache_dir>/slides``); None detects and tiles afresh, what a timing of the whole pass wants.
    ``embeddings``: also keep each tile's pre-logits features (``EmbeddingTap``). ``csv_path``: also write the
    engine's per-tile CSV there.
    """
    start = time.perf_counter()
    path = Path(slide_path)
    if isinstance(tile, TileGeometry):
        geometry, overlap, theta = tile, 0, 0.5
    else:
        node = SimpleNamespace(**_plain(tile, TileConfig))
        geometry = tile_geometry(node, meta, Path(meta.get("_directory", "<model>")))
        overlap, theta = int(node.overlap), float(node.theta)
    check_request(geometry.patch_size, geometry.mpp, geometry.magnification, overlap, theta)
    tissue_opts = _plain(tissue, TissueConfig)
    read = SimpleNamespace(**_plain(reader, ReaderConfig))
    run = SimpleNamespace(**_plain(engine, EngineConfig))
    net = EmbeddingTap(model) if embeddings else model
    request = dict(patch_size=geometry.patch_size, mpp=geometry.mpp, magnification=geometry.magnification,
                   overlap=overlap, theta=theta)  # fmt: skip
    with open_slide(path, mpp=read.mpp, backend=read.backend) as slide:
        t0 = time.perf_counter()
        if cache_dir is None:
            mask = detect_tissue(slide, **tissue_opts)
            t1 = time.perf_counter()
            grid = tile_grid(slide, tissue=mask, **request)
        else:
            keys = SimpleNamespace(
                reader=read, tissue=tissue_opts
            )  # what slide_cache_dir and tissue_for read
            cache = slide_cache_dir(Path(cache_dir), path, keys)
            mask = tissue_for(slide, keys, cache)
            t1 = time.perf_counter()
            name = f"tiles-{geometry.patch_size}-{geometry.mpp}-{geometry.magnification}.h5"  # the engine's
            grid = cached_tiles(slide, cache / name, tissue=mask, **request)
        t2 = time.perf_counter()
    class_names = list(meta["class_names"])
    spec = tile_spec(path, grid, geometry, meta, read.mpp, read.backend)
    extra = {} if grid.tissue_fraction is None else {"tissue_fraction": grid.tissue_fraction}
    stream = stream_tiles(
        net, spec, class_names, None if csv_path is None else Path(csv_path), run.batch_size, run.workers,
        run.prefetch, run.device, extra,
    )  # fmt: skip
    if embeddings and stream.embeddings is None:  # only when no batch ran; a grid has a tile at least
        raise CheckpointError(f"slide {path}: the classifier returned no tile embeddings")
    wall = time.perf_counter() - start
    timings = {"tissue_s": t1 - t0, "tiling_s": t2 - t1, **stream.timings, "total": wall}
    return TileOutputs(
        slide=str(path),
        class_names=class_names,
        coords=grid.coords,
        size0=int(grid.size0),
        probabilities=stream.probs,
        embeddings=stream.embeddings,
        read_pixels_level0=int(len(grid)) * int(grid.size0) ** 2,
        read_seconds=float(stream.timings["load_busy_s"]),
        model_seconds=float(stream.timings["process_s"]),
        wall_seconds=wall,
        tissue_fraction=grid.tissue_fraction,
        tile={
            "patch_size": geometry.patch_size,
            "mpp": grid.mpp,
            "magnification": geometry.magnification,
            "patch_level": grid.patch_level,
            "downsample": grid.downsample,
            "size0": int(grid.size0),
            "overlap": overlap,
            "theta": theta,
        },
        timings=timings,
    )


# ------------------------------------------------------------------------------------------ pooling
def pool_scores(probabilities: np.ndarray, how: str = "max", negative_class: int | None = 0) -> np.ndarray:
    """A slide's class probabilities (C,) from its tiles' (N, C): R3's full-tiling baseline.

    ``mean``: the mean over tiles. ``max``: each class other than ``negative_class`` takes its largest tile
    probability, the negative class its smallest (a slide is negative only as far as its least negative
    tile), and the C values are renormalised to sum to 1. With two classes this is exactly the usual rule:
    the positive score is the largest tile's positive probability and the negative score is 1 minus it (the
    renormalisation changes nothing). With more, e.g. Normal / Benign / InSitu / Invasive, every lesion class
    scores as its most convinced tile, so a small lesion is not averaged away, and the argmax names the
    class with the strongest tile evidence. ``negative_class=None``: every class its maximum, renormalised.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] < 1:
        raise ValueError(f"pool_scores: probabilities must be (tiles, classes) with a tile, got {p.shape}")
    if how not in POOLING:
        raise ConfigError(f"pool_scores: how={how!r}; use one of {POOLING}")
    if negative_class is not None and not 0 <= negative_class < p.shape[1]:
        raise ConfigError(f"pool_scores: negative_class={negative_class} is not one of {p.shape[1]} classes")
    if how == "mean":
        pooled = p.mean(0)
    else:
        pooled = p.max(0)
        if negative_class is not None:
            pooled[negative_class] = p[:, negative_class].min()
    total = pooled.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError(f"pool_scores: the pooled scores {pooled} cannot be normalised")
    return pooled / total
