"""One slide through each method of the SMT-against-full-tiling comparison, cold and timed, with the same
trained weights for every timing (``slides.comparison`` turns the rows into results, records and a report).

- SMT (``walk_smt``): tissue detection from scratch, the tissue box, then the focusing walk reading
  1 + K + K^2 regions from the slide file with a fresh reader; level-0-equivalent pixels read = the sum of the
  read boxes' areas.
- Full tiling (``tile_slide``): the slide engine over every tissue tile at the tile classifier's resolution
  (tissue detection and tiling from scratch), keeping tile probabilities and embeddings; pixels = tiles x
  (tile side)^2; slide scores by max and mean pooling of the tile scores.
- Gated-attention MIL (``mil_scores``) trained on the training slides' tile embeddings (slide labels only).

The methods run in a different order on each slide (``rotate``): the machine may be shared and noisy, and
none should always find the caches warm. Focusing precision (``focusing_precision``): the share of each
layer's focused regions that overlap a lesion of a slide's truth, beside chance (the share of all candidate
patches that do). Scores are ``1 - p(negative class)``: a lesion of any kind against lesion-free tissue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from patholite.artifacts.mil import save_mil
from patholite.data.synthetic.slides import Truth, generate_slides, read_truth, sidecar_paths
from patholite.data.synthetic.spec import LesionSpec, SlideSpec
from patholite.errors import ConfigError
from patholite.models.mil import predict_mil, train_mil
from patholite.models.smt import aggregate_slides, predict_slide, read_policy, warm_up
from patholite.slides.baselines import pool_scores, tile_outputs
from patholite.wsi.reader import forget_cached, open_slide
from patholite.wsi.region import (
    Box,
    RegionReader,
    chain_check,
    patch_box,
    pixels_decoded,
    smt_tissue_mask,
    tissue_box,
)

log = logging.getLogger(__name__)

# SMT with its tissue box found as in training (model.smt.tissue_px, e.g. 512 px: a bounding box needs no
# fine mask); SMT with the box from the tiler's 2048-px mask instead; full tiling.
METHODS = ("smt", "smt_tiler_mask", "tiling")
TILER_TISSUE_PX = 2048  # the long side of the image the tiler finds tissue on
NEGATIVE_NAMES = ("Normal", "Benign")  # a tile classifier's lesion-free class, the first found


@dataclass(frozen=True)
class SlideCase:
    """A slide of the comparison: its file, its binary label and (synthetic slides) its lesion share."""

    path: Path
    label: int  # 1: a lesion (a class other than the negative one), 0: lesion-free
    lesion_share: float | None = None


def split_cases(dm, split: str) -> list[SlideCase]:
    """The slides of a set-up slide-level datamodule's ``split``, labelled lesion (1) against its negative
    class (0)."""
    dataset = dm.datasets[split]
    negative = dm.class_names.index(dm.negative_class)
    return [
        SlideCase(
            Path(dm.slide_paths[int(i)]), int(int(dataset.labels[n]) != negative), dm.lesion_share(int(i))
        )
        for n, i in enumerate(dataset.slides)
    ]


def rotate(methods: Sequence[str], n: int) -> list[str]:
    """The methods in a different order for each slide ``n``: none always runs first (warm caches, drift)."""
    methods = tuple(methods)
    k = n % len(methods)
    return list(methods[k:] + methods[:k])


def negative_index(class_names: Sequence[str], what: str) -> int:
    """The index of the lesion-free class (Normal, else Benign for PANDA): scores are 1 - p(negative)."""
    for name in NEGATIVE_NAMES:
        if name in class_names:
            return list(class_names).index(name)
    raise ConfigError(
        f"the {what}'s classes {list(class_names)} have no Normal/Benign class to score against"
    )


# ------------------------------------------------------------------------------------------------ runs
def warm_smt(net, meta: dict) -> None:
    """One untimed blank walk of the SMT network (``models.smt.warm_up``) before its first timed slide."""
    warm_up(net, int(meta["model"]["smt"]["top_k"]), meta["mean"], meta["std"])


def walk_smt(
    net, meta: dict, path: Path, mpp: float | None, tissue_side: int = TILER_TISSUE_PX
) -> dict[str, Any]:
    """One cold SMT pass over a slide: tissue from scratch on a ``tissue_side``-px image, then the walk with
    a fresh reader. ``tissue_s`` is tissue detection and the box only (opening the slide stays in the warm
    time, as for tiling)."""
    s = meta["model"]["smt"]
    forget_cached(path)
    start = time.perf_counter()
    with open_slide(path, mpp=mpp) as slide:
        t0 = time.perf_counter()
        # the tissue settings the model was trained with (its sidecar), found from scratch (no cache)
        mask = smt_tissue_mask(slide, OmegaConf.create({"tissue": meta["tissue"]}), tissue_px=tissue_side)
        box = tissue_box(mask, slide.dimensions)
        tissue_s = time.perf_counter() - t0
    policy = read_policy(s)  # adaptive reads, tissue-masked candidates (issue 19): as the sidecar says
    chain_check(box, int(s["image_size"]), int(s["grid"]), int(s["layers"]) - 1, "upsample", str(path))
    reader = RegionReader(path, mpp=mpp)
    negative = meta["class_names"].index(meta.get("negative_class") or meta["class_names"][0])
    out = predict_slide(
        net, reader, box, int(s["top_k"]), meta["mean"], meta["std"], aggregate=s.get("aggregate", "mean"),
        negative_class=negative, policy=policy, tissue=mask if policy.tissue_min > 0 else None,
    )  # fmt: skip
    wall = time.perf_counter() - start
    forget_cached(path)
    sides = [b[2] for layer in out["layers"] for b in layer["boxes"]]
    size = int(s["image_size"])
    with open_slide(path, mpp=mpp) as slide:  # untimed: what each read decoded from the file
        decoded = pixels_decoded(slide, sides, size)
    last = out["layers"][-1]
    # the same walk scored the other way: the slide's most positive last-layer image (a quality variant only)
    most = aggregate_slides(torch.as_tensor(last["probs"]), [0] * len(last["probs"]), 1, "max", negative)[0]
    return {
        "probs": [float(p) for p in out["probs"]],
        "positive": 1.0 - float(out["probs"][negative]),
        "positive_max": 1.0 - float(most[negative]),
        "wall_s": wall,
        "tissue_s": tissue_s,
        "read_s": out["read_seconds"],
        "model_s": out["model_seconds"],
        "reads": out["reads"],
        "area_level0": float(sum(side * side for side in sides)),
        "file_pixels": float(decoded),
        "model_pixels": float(len(sides) * size * size),
        "box": [box.x, box.y, box.side],
        "layer3_level0_px_per_px": box.side / int(s["grid"]) ** (int(s["layers"]) - 1) / int(s["image_size"]),
        "layers": [{"boxes": layer["boxes"]} for layer in out["layers"]],
        "negative": negative,
        "last_probs": last["probs"],  # the last layer's class probabilities: other slide scores, regions
    }


def tile_slide(model, meta: dict, path: Path, mpp: float | None) -> dict[str, Any]:
    """One cold full tiling of a slide through the slide engine: costs, max- and mean-pooled positive
    scores, and the tiles' embeddings (for MIL)."""
    forget_cached(path)
    tile_px = int(meta.get("tile_size") or meta["image_size"])
    start = time.perf_counter()
    out = tile_outputs(path, model, meta, reader={"mpp": mpp} if mpp else None, embeddings=True)
    wall = time.perf_counter() - start
    forget_cached(path)
    size0 = float(out.size0)
    with open_slide(path, mpp=mpp) as slide:  # untimed: what each tile read decoded from the file
        _, w, h = slide.scaled_read_size((size0, size0), (tile_px, tile_px))
    negative = negative_index(meta["class_names"], "tile classifier")
    return {
        "wall_s": wall,
        "tissue_s": float(out.timings.get("tissue_s", 0.0)) + float(out.timings.get("tiling_s", 0.0)),
        "read_s": out.read_seconds,
        "model_s": out.model_seconds,
        "tiles": out.n_tiles,
        "area_level0": float(out.read_pixels_level0),
        "file_pixels": float(out.n_tiles * w * h),
        "model_pixels": float(out.n_tiles * int(meta["image_size"]) ** 2),
        "level0_px_per_px": float(out.size0) / float(meta.get("tile_size") or out.size0),
        "max": 1.0 - float(pool_scores(out.probabilities, "max", negative)[negative]),
        "mean": 1.0 - float(pool_scores(out.probabilities, "mean", negative)[negative]),
        "embeddings": out.embeddings,
        # per tile: level-0 top-left and positive probability (localisation), the tile's level-0 side
        "coords": out.coords,
        "tile_positive": 1.0 - np.asarray(out.probabilities, dtype=np.float64)[:, negative],
        "size0": int(out.size0),
    }


def run_method(name: str, smt: tuple, tile: tuple, path: Path, mpp: float | None) -> dict[str, Any]:
    """One of ``METHODS`` on one slide; ``smt`` and ``tile``: (network, sidecar) of the SMT artifact and of
    the tile classifier."""
    if name == "tiling":
        return tile_slide(*tile, path, mpp)
    trained = smt[1]["model"]["smt"].get("tissue_px") or TILER_TISSUE_PX  # the framing trained on
    return walk_smt(*smt, path, mpp, tissue_side=trained if name == "smt" else TILER_TISSUE_PX)


# ------------------------------------------------------------------------------------------- focusing
def overlaps_lesion(box: Sequence[float], truth: Truth) -> bool:
    """Whether a level-0 box ``[x, y, side]`` covers a truth pixel of a lesion (any class but the first,
    off-tissue excluded)."""
    ds = truth.downsample
    x0, y0 = max(0, int(box[0] // ds)), max(0, int(box[1] // ds))
    x1, y1 = int(np.ceil((box[0] + box[2]) / ds)), int(np.ceil((box[1] + box[2]) / ds))
    window = truth.labels[y0:y1, x0:x1]
    return bool(((window > 0) & (window != 255)).any())


def focusing_precision(walk: Mapping[str, Any], truth: Truth, grid: int) -> dict[str, dict[str, float]]:
    """Per focused layer (``layer1``: the K regions chosen on the thumbnail, ``layer2``: the K^2 chosen on
    those, ...): ``precision``, the share of its regions over a lesion, and ``chance``, the share of all the
    parent images' ``grid`` x ``grid`` candidate patches over a lesion."""
    out = {}
    layers = walk["layers"]
    for layer in range(1, len(layers)):
        hits = [overlaps_lesion(b, truth) for b in layers[layer]["boxes"]]
        candidates = [
            overlaps_lesion(patch_box(Box(*p), i, grid).as_list(), truth)
            for p in layers[layer - 1]["boxes"]
            for i in range(grid * grid)
        ]
        out[f"layer{layer}"] = {"precision": float(np.mean(hits)), "chance": float(np.mean(candidates))}
    return out


def has_truth(path: str | Path) -> bool:
    """Whether a slide has a synthetic ground truth beside it (what focusing precision is measured on)."""
    return sidecar_paths(path)[0].is_file()


# -------------------------------------------------------------------------------------------- slides
def compare_slides(
    cases: Sequence[SlideCase], smt: tuple, tile: tuple, mpp: float | None, methods: Sequence[str] = METHODS
) -> list[dict[str, Any]]:
    """Every method on every slide, in a rotating order: one row per slide (``slide``, ``label``,
    ``lesion_share``, a result per method, and ``focus`` on positive slides with a truth)."""
    rows = []
    grid = int(smt[1]["model"]["smt"]["grid"])
    if any(m.startswith("smt") for m in methods):
        warm_smt(*smt)
    for n, case in enumerate(cases):
        row: dict[str, Any] = {
            "slide": case.path.name,
            "label": case.label,
            "lesion_share": case.lesion_share,
        }
        for name in rotate(methods, n):
            row[name] = run_method(name, smt, tile, case.path, mpp)
        if case.label == 1 and "smt" in row and has_truth(case.path):  # a lesion to find, and where it is
            row["focus"] = focusing_precision(row["smt"], read_truth(case.path), grid)
        log.info("%s: %s", case.path.name, _timings(row, methods))
        rows.append(row)
    return rows


def _timings(row: dict[str, Any], methods: Sequence[str]) -> str:
    parts = []
    for name in methods:
        run = row[name]
        count = f"{run['reads']} reads" if "reads" in run else f"{run['tiles']} tiles"
        parts.append(f"{name} {run['wall_s']:.2f}s ({count})")
    return ", ".join(parts)


def scaling_rows(
    dataset, smt: tuple, tile: tuple, sizes: Sequence[int], n: int, mpp: float | None, folder: Path
) -> list[dict[str, Any]]:
    """The methods on ``n`` fresh positive synthetic slides of each side in ``sizes`` (the lesion settings
    of ``dataset``, a synthetic slide dataset's config node), written under ``folder``: how the gap grows
    with the slide. Rows as ``compare_slides``'s, with ``size`` and without embeddings."""
    for key in ("difficulty", "lesion_count", "lesion_diameter_um"):
        if dataset.get(key) is None:
            raise ConfigError(
                f"scaling needs a synthetic slide dataset (dataset.{key}); dataset={dataset.get('name')} "
                "has none: leave the extra slide sizes out"
            )
    lesions = [
        LesionSpec(c, int(dataset.lesion_count), tuple(dataset.lesion_diameter_um))
        for c in ("InSitu", "Invasive")
    ]
    out = []
    warm_smt(*smt)
    for size in sizes:
        spec = SlideSpec(width=size, height=size, difficulty=float(dataset.difficulty), lesions=lesions)
        slides = generate_slides(folder / str(size), n, spec, seed=7, normal_share=0.0, prefix=f"scale{size}")
        for k, s in enumerate(slides):
            row: dict[str, Any] = {"size": size, "slide": s.path.name}
            for name in rotate(METHODS, k):
                row[name] = run_method(name, smt, tile, s.path, mpp)
                for key in ("embeddings", "coords", "tile_positive"):
                    row[name].pop(key, None)
            out.append(row)
            log.info("size %d: %s", size, _timings(row, METHODS))
    return out


def tile_bags(
    cases: Sequence[SlideCase], tile: tuple, mpp: float | None, cache_dir: Path | None = None
) -> list[torch.Tensor]:
    """The tile embeddings of each slide (full tiling through the tile classifier ``tile``), the bags MIL
    learns from; tissue masks and tile grids cached under ``cache_dir`` when given."""
    reader = {"mpp": mpp} if mpp else None
    return [
        torch.as_tensor(tile_outputs(c.path, *tile, reader=reader, cache_dir=cache_dir).embeddings)
        for c in cases
    ]


def mil_scores(
    bags: Sequence[torch.Tensor],
    labels: Sequence[int],
    test_rows: Sequence[dict[str, Any]],
    epochs: int,
    out: Path,
    meta: Mapping[str, Any],
    seed: int = 0,
) -> list[float]:
    """Gated-attention MIL trained on training slides' tile embeddings (``tile_bags``) and their binary
    labels (lesion against lesion-free, as the test scores), saved under ``out/mil_artifact`` with ``meta``
    (its ``class_names``, the ``tile_artifact``); the positive scores of the test rows, from the tile
    embeddings their tiling kept."""
    model = train_mil(list(bags), list(labels), num_classes=2, epochs=epochs, seed=seed)
    save_mil(model, out / "mil_artifact", dict(meta))
    return [float(predict_mil(model, torch.as_tensor(r["tiling"]["embeddings"]))[1]) for r in test_rows]


def walk_artifacts(
    cases: Sequence[SlideCase], models: Mapping[str, tuple], mpp: float | None
) -> list[dict[str, Any]]:
    """Every SMT artifact of ``models`` (name: (network, sidecar)) walks every slide as ``walk_smt`` times
    it (its own trained tissue framing), in a rotating order per slide: one row per slide with each
    artifact's score and times."""
    names, rows = tuple(models), []
    for net, meta in models.values():
        warm_smt(net, meta)
    for n, case in enumerate(cases):
        row: dict[str, Any] = {"slide": case.path.name, "label": case.label}
        for name in rotate(names, n):
            net, meta = models[name]
            tissue_px = meta["model"]["smt"].get("tissue_px") or TILER_TISSUE_PX
            out = walk_smt(net, meta, case.path, mpp, tissue_side=tissue_px)
            row[name] = {k: out[k] for k in ("positive", "wall_s", "tissue_s", "read_s", "model_s", "reads")}
        log.info("%s: %s", case.path.name, ", ".join(f"{k} {row[k]['model_s']:.3f}s" for k in names))
        rows.append(row)
    return rows
