"""SMT against full tiling on the same slides (the SMT issue's targets), with the same trained weights for
every timing.

    python scripts/bench_smt.py --smt-run <model=smt run> --tile-run <tile classifier run> --out <dir>
        [--sizes 8192 32768] [--scale-slides 2] [--mil-epochs 40]

Per test slide of the SMT run's dataset, alternating which goes first (this machine is shared and noisy):
- SMT: tissue detection from scratch, the tissue box, the focusing walk reading 1 + K + K^2 regions from the
  slide file (a fresh reader); level-0-equivalent pixels read = the sum of the read boxes' areas.
- Full tiling: the slide engine over every tissue tile at the tile classifier's resolution (tissue detection
  and tiling from scratch), keeping tile probabilities and embeddings; pixels = tiles x (tile side)^2.
Quality per slide: SMT; tiling with max and mean pooling of tile scores (R3's baseline); gated-attention MIL
trained on the training slides' tile embeddings (slide labels only). Focusing precision: the share of layer-1
and layer-2 top-K regions that overlap a lesion on positive slides (synthetic truth), beside chance (the
share of all candidate patches that do). ``--sizes``: slides of other sizes (positive, same lesion settings)
timed the same way, to show how the gap grows. Writes ``results.json``, ``results.md`` and run records
under ``records/`` that ``python -m patholite.compare`` puts beside the SMT run's own.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import OmegaConf

from patholite.artifacts.mil import save_mil
from patholite.artifacts.resolve import resolve_artifact
from patholite.data import build_datamodule
from patholite.data.synthetic.slides import generate_slides, read_truth
from patholite.data.synthetic.spec import LesionSpec, SlideSpec
from patholite.io import write_json
from patholite.models.mil import predict_mil, train_mil
from patholite.models.smt import aggregate_slides, predict_slide
from patholite.records import ArtifactRecord, RunRecord, read_record
from patholite.slides.baselines import pool_scores, tile_outputs
from patholite.slides.inference import load_classifier
from patholite.slides.smt_inference import load_smt_model, smt_settings
from patholite.wsi.reader import forget_cached, open_slide
from patholite.wsi.region import Box, RegionReader, chain_check, patch_box, pixels_decoded, smt_tissue_box

log = logging.getLogger("bench_smt")


# ------------------------------------------------------------------------------------------------ runs
def run_smt(net, meta: dict, path: Path, mpp: float | None, tissue_side: int = 2048) -> dict[str, Any]:
    """One cold SMT pass: tissue from scratch, then the walk with a fresh reader. ``tissue_s`` is tissue
    detection and the box only (opening the slide stays in the warm time, as for tiling)."""
    s = meta["model"]["smt"]
    forget_cached(path)
    start = time.perf_counter()
    with open_slide(path, mpp=mpp) as slide:
        t0 = time.perf_counter()
        # the tissue settings the model was trained with (its sidecar), found from scratch (no cache)
        box = smt_tissue_box(slide, OmegaConf.create({"tissue": meta["tissue"]}), tissue_px=tissue_side)
        tissue_s = time.perf_counter() - t0
    chain_check(box, int(s["image_size"]), int(s["grid"]), int(s["layers"]) - 1, "upsample", str(path))
    reader = RegionReader(path, mpp=mpp)
    negative = meta["class_names"].index(meta.get("negative_class") or meta["class_names"][0])
    out = predict_slide(
        net, reader, box, int(s["top_k"]), meta["mean"], meta["std"], aggregate=s.get("aggregate", "mean"),
        negative_class=negative,
    )  # fmt: skip
    wall = time.perf_counter() - start
    forget_cached(path)
    sides = [b[2] for layer in out["layers"] for b in layer["boxes"]]
    size = int(s["image_size"])
    with open_slide(path, mpp=mpp) as slide:  # untimed: what each read decoded from the file
        decoded = pixels_decoded(slide, sides, size)
    last = out["layers"][-1]
    # the same walk scored the other way: the slide's most positive layer-3 image (a quality variant only)
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
    }


def run_tiling(model, meta: dict, path: Path, mpp: float | None) -> dict[str, Any]:
    forget_cached(path)
    tile_px = int(meta.get("tile_size") or meta["image_size"])
    start = time.perf_counter()
    out = tile_outputs(path, model, meta, reader={"mpp": mpp} if mpp else None, embeddings=True)
    wall = time.perf_counter() - start
    forget_cached(path)
    size0 = float(out.size0)
    with open_slide(path, mpp=mpp) as slide:  # untimed: what each tile read decoded from the file
        _, w, h = slide.scaled_read_size((size0, size0), (tile_px, tile_px))
    decoded = w * h
    negative = negative_index(meta["class_names"], "tile classifier")
    return {
        "wall_s": wall,
        "tissue_s": float(out.timings.get("tissue_s", 0.0)) + float(out.timings.get("tiling_s", 0.0)),
        "read_s": out.read_seconds,
        "model_s": out.model_seconds,
        "tiles": out.n_tiles,
        "area_level0": float(out.read_pixels_level0),
        "file_pixels": float(out.n_tiles * decoded),
        "model_pixels": float(out.n_tiles * int(meta["image_size"]) ** 2),
        "level0_px_per_px": float(out.size0) / float(meta.get("tile_size") or out.size0),
        "max": 1.0 - float(pool_scores(out.probabilities, "max", negative)[negative]),
        "mean": 1.0 - float(pool_scores(out.probabilities, "mean", negative)[negative]),
        "embeddings": out.embeddings,
    }


def negative_index(class_names: list[str], what: str) -> int:
    """The index of the lesion-free class (Normal, Benign for PANDA): scores are 1 - p(negative)."""
    for name in ("Normal", "Benign"):
        if name in class_names:
            return class_names.index(name)
    raise SystemExit(
        f"bench_smt: the {what}'s classes {class_names} have no Normal/Benign class to score against"
    )


# SMT with its tissue box found as in training (model.smt.tissue_px, e.g. 512 px: a bounding box needs no
# fine mask); SMT with the box from the tiler's 2048-px mask instead; full tiling.
METHODS = ("smt", "smt_tiler_mask", "tiling")
PIXELS = (
    ("file_pixels", "pixels decoded from the file"),
    ("model_pixels", "pixels fed to the model"),
    ("area_level0", "level-0 area the reads cover"),
)


def rotate(methods: tuple[str, ...], n: int) -> list[str]:
    """The methods in a different order for each slide: none always runs first (warm caches, drift)."""
    k = n % len(methods)
    return list(methods[k:] + methods[:k])


def run_method(name: str, smt, tile, path: Path, mpp) -> dict[str, Any]:
    if name == "tiling":
        return run_tiling(*tile, path, mpp)
    trained = smt[1]["model"]["smt"].get("tissue_px") or 2048  # the framing the model was trained on
    return run_smt(*smt, path, mpp, tissue_side=trained if name == "smt" else 2048)


# ----------------------------------------------------------------------------------------- measures
def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Binary AUROC (torchmetrics) of positive-class scores; both classes must be present."""
    from torchmetrics.functional.classification import binary_auroc

    return float(binary_auroc(torch.as_tensor(scores), torch.as_tensor(labels)))


def binary_quality(scores: list[float], labels: list[int]) -> dict[str, Any]:
    y, p = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    pred = (p >= 0.5).astype(int)
    recalls = [float((pred[y == c] == c).mean()) for c in (0, 1) if (y == c).any()]
    both = 0 < y.sum() < len(y)
    return {
        "n_slides": len(y),
        "n_positive": int(y.sum()),
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(np.mean(recalls)),
        "auroc": auroc(p, y) if both else None,
    }


def paired_bootstrap(
    a: list[float], b: list[float], labels: list[int], n: int = 2000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Method a minus method b on the same slides, resampled together (slides are the unit): accuracy at
    0.5 and AUROC, the observed difference and its 95% percentile interval."""
    y, pa, pb = np.asarray(labels), np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)

    def diffs(idx: np.ndarray) -> tuple[float, float] | None:
        yy = y[idx]
        if not 0 < yy.sum() < len(yy):
            return None  # a resample with one class has no AUROC
        acc = float(((pa[idx] >= 0.5) == yy).mean() - ((pb[idx] >= 0.5) == yy).mean())
        return acc, auroc(pa[idx], yy) - auroc(pb[idx], yy)

    observed = diffs(np.arange(len(y)))
    draws = [d for d in (diffs(rng.integers(0, len(y), len(y))) for _ in range(n)) if d is not None]
    out = {}
    for j, name in enumerate(("accuracy", "auroc")):
        values = np.asarray([d[j] for d in draws])
        out[name] = {
            "difference": observed[j] if observed else float("nan"),
            # no draw holds both classes (e.g. one-class test slides): no interval, not a crash at the end
            "ci95": [float(np.percentile(values, q)) for q in (2.5, 97.5)] if draws else [float("nan")] * 2,
            "draws": len(draws),
        }
    return out


def overlaps_lesion(box: list[float], truth) -> bool:
    ds = truth.downsample
    x0, y0 = max(0, int(box[0] // ds)), max(0, int(box[1] // ds))
    x1, y1 = int(np.ceil((box[0] + box[2]) / ds)), int(np.ceil((box[1] + box[2]) / ds))
    window = truth.labels[y0:y1, x0:x1]
    return bool(((window > 0) & (window != 255)).any())


def focusing_precision(smt: dict, truth, grid: int) -> dict[str, Any]:
    """Share of each layer's focused regions over a lesion, and chance: the share of the parent images'
    candidate patches over a lesion."""
    out = {}
    for layer in (1, 2):
        boxes = smt["layers"][layer]["boxes"]
        parents = smt["layers"][layer - 1]["boxes"]
        hits = [overlaps_lesion(b, truth) for b in boxes]
        candidates = [
            overlaps_lesion(patch_box(Box(*p), i, grid).as_list(), truth)
            for p in parents
            for i in range(grid * grid)
        ]
        out[f"layer{layer}"] = {"precision": float(np.mean(hits)), "chance": float(np.mean(candidates))}
    return out


def _box_shift(rows: list[dict[str, Any]]) -> dict[str, float]:
    """How far the box found as in training is from the tiler's mask's box, in units of the box side."""
    shifts = [
        max(abs(a - b) for a, b in zip(r["smt"]["box"], r["smt_tiler_mask"]["box"], strict=True))
        / r["smt"]["box"][2]
        for r in rows
    ]
    return {"median": float(np.median(shifts)), "max": float(np.max(shifts))}


def _without_embeddings(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "embeddings"}


def ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


# ------------------------------------------------------------------------------------------------ main
def datamodule_of(run: Path):
    record = read_record(run / "metrics.json")
    cfg = OmegaConf.create(record["config"])
    dm = build_datamodule(cfg.dataset, model=cfg.model)
    dm.setup("fit")
    return cfg, dm


def datamodule_with(cfg, overrides: list[str]):
    """The run's dataset with ``KEY=VALUE`` overrides (``dataset.`` keys), for other test slides."""
    pairs = [item.partition("=") for item in overrides]
    for key, sep, _ in pairs:
        if not sep or not key.startswith("dataset."):
            raise SystemExit(f"bench_smt: --test-set {key}{sep}...: give dataset.<key>=<value>")
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key, _, value in pairs:
        OmegaConf.update(cfg, key, yaml.safe_load(value))
    dm = build_datamodule(cfg.dataset, model=cfg.model)
    dm.setup("fit")
    return dm


def measure_split(dm, split, smt, tile, mpp) -> list[dict[str, Any]]:
    rows = []
    dataset = dm.datasets[split]
    negative = dm.class_names.index(dm.negative_class)
    for n, i in enumerate(dataset.slides):
        path, label = Path(dm.slide_paths[int(i)]), int(int(dataset.labels[n]) != negative)
        row: dict[str, Any] = {"slide": path.name, "label": label, "lesion_share": dm.lesion_share(int(i))}
        for name in rotate(METHODS, n):
            row[name] = run_method(name, smt, tile, path, mpp)
        if label == 1:  # focusing precision needs a lesion to find
            row["focus"] = focusing_precision(
                row["smt"], read_truth(path), int(smt[1]["model"]["smt"]["grid"])
            )
        log.info("%s: SMT %.2fs (%d reads), tiling %.2fs (%d tiles)", path.name, row["smt"]["wall_s"],
                 row["smt"]["reads"], row["tiling"]["wall_s"], row["tiling"]["tiles"])  # fmt: skip
        rows.append(row)
    return rows


def scaling(cfg, smt, tile, sizes: list[int], n: int, mpp, folder: Path) -> list[dict[str, Any]]:
    d = cfg.dataset
    lesions = [
        LesionSpec(c, int(d.lesion_count), tuple(d.lesion_diameter_um)) for c in ("InSitu", "Invasive")
    ]
    out = []
    for size in sizes:
        spec = SlideSpec(width=size, height=size, difficulty=float(d.difficulty), lesions=lesions)
        slides = generate_slides(folder / str(size), n, spec, seed=7, normal_share=0.0, prefix=f"scale{size}")
        for k, s in enumerate(slides):
            row = {"size": size, "slide": s.path.name}
            for name in rotate(METHODS, k):
                row[name] = run_method(name, smt, tile, s.path, mpp)
                row[name].pop("embeddings", None)
            out.append(row)
            log.info("size %d: SMT %.2fs, tiling %.2fs (%d tiles)", size, row["smt"]["wall_s"],
                     row["tiling"]["wall_s"], row["tiling"]["tiles"])  # fmt: skip
    return out


def _warm(run: dict[str, Any]) -> float:
    """Wall time without tissue detection and tiling (what precomputed masks and thumbnails leave)."""
    return run["wall_s"] - run["tissue_s"]


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over slides of each method's wall time (cold, and without tissue detection), and of the
    per-slide ratios tiling / method: wall time and pixels (decoded from the file, fed to the model, and the
    level-0 area the reads cover)."""

    def med(fn) -> float:
        return float(statistics.median(fn(r) for r in rows))

    out: dict[str, Any] = {
        "n_slides": len(rows),
        "tiles": med(lambda r: r["tiling"]["tiles"]),
        "smt_reads": med(lambda r: r["smt"]["reads"]),
        "smt_layer3_level0_px_per_px": med(lambda r: r["smt"]["layer3_level0_px_per_px"]),
        "tiling_level0_px_per_px": med(lambda r: r["tiling"]["level0_px_per_px"]),
    }
    for m in METHODS:
        out[f"{m}_wall_s"] = med(lambda r, m=m: r[m]["wall_s"])
        out[f"{m}_tissue_s"] = med(lambda r, m=m: r[m]["tissue_s"])
        out[f"{m}_wall_s_tissue_excluded"] = med(lambda r, m=m: _warm(r[m]))
        for what in ("file_pixels", "model_pixels", "area_level0"):
            out[f"{m}_{what}"] = med(lambda r, m=m, w=what: r[m][w])
        if m == "tiling":
            continue
        out[f"{m}_wall_ratio"] = med(lambda r, m=m: ratio(r["tiling"]["wall_s"], r[m]["wall_s"]))
        out[f"{m}_wall_ratio_tissue_excluded"] = med(lambda r, m=m: ratio(_warm(r["tiling"]), _warm(r[m])))
        for what in ("file_pixels", "model_pixels", "area_level0"):
            out[f"{m}_{what}_ratio"] = med(lambda r, m=m, w=what: ratio(r["tiling"][w], r[m][w]))
    return out


def mil_baseline(dm, tile, mpp, test_rows, epochs: int, out: Path) -> list[float]:
    """Gated-attention MIL on the training slides' tile embeddings (slide labels only); test-slide scores."""
    bags, labels = [], []
    train = dm.datasets["train"]
    negative = dm.class_names.index(dm.negative_class)
    for n, i in enumerate(train.slides):
        outs = tile_outputs(Path(dm.slide_paths[int(i)]), *tile, reader={"mpp": mpp} if mpp else None,
                            cache_dir=out / "cache")  # fmt: skip
        bags.append(torch.as_tensor(outs.embeddings))
        labels.append(int(int(train.labels[n]) != negative))  # lesion vs lesion-free, as the test scores
    model = train_mil(bags, labels, num_classes=2, epochs=epochs, seed=0)
    save_mil(model, out / "mil_artifact", {"class_names": list(dm.class_names), "tile_artifact": tile[1]})
    return [float(predict_mil(model, torch.as_tensor(r["tiling"]["embeddings"]))[1]) for r in test_rows]


def write_records(out: Path, cfg, quality: dict, test: list[dict], walk: dict | None = None) -> None:
    """One run record per slide-level method, in the record schema, for ``patholite.compare``; ``walk``:
    the SMT walk's ``top_k`` / ``aggregate`` where they were changed at inference."""
    part = {"smt_fp32": "smt", "tiling_max": "tiling", "tiling_mean": "tiling", "mil_gated": "tiling"}
    base = OmegaConf.to_container(cfg, resolve=True)
    trained = base["model"]["smt"]
    changed = {k: v for k, v in (walk or {}).items() if v is not None and v != trained.get(k)}
    for name, method in part.items():
        if name not in quality:  # MIL left out (--mil-epochs 0)
            continue
        q = quality[name]
        walls = sorted(r[method]["wall_s"] for r in test)
        p50, p90 = statistics.median(walls), walls[min(len(walls) - 1, int(0.9 * len(walls)))]
        label = f"bench:{name}"
        config = {**base, "compression": {"name": label}}
        if method == "smt" and changed:  # the walk run, not the one trained: say so in the record
            config["model"] = {**base["model"], "smt": {**trained, **changed}}
            config["compression"]["name"] = (
                label + " (" + ", ".join(f"{k}={v}" for k, v in changed.items()) + ")"
            )
        record = RunRecord(run_dir=str(out / "records" / name), config=config)
        record.artifacts = [
            ArtifactRecord(
                name=name, path=str(out), files=[],
                model=cfg.model.name if method == "smt" else "tile classifier",
                quality={"accuracy": q["accuracy"], "balanced_accuracy": q["balanced_accuracy"],
                         "macro_f1": None, "auroc": q["auroc"], "ece": None, "n_samples": q["n_slides"]},
                cost={
                    "latency_ms": {"slide": {"p50": 1000 * p50, "p90": 1000 * p90}},
                    "throughput_ips": {"slide": 1 / p50},
                    "file_pixels_median": statistics.median(r[method]["file_pixels"] for r in test),
                    "timing": {"method": "bench_smt", "unit": "slide",
                               "note": "cold: tissue detection included"},
                },
            )
        ]  # fmt: skip
        record.finish("ok")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _diff(d: dict[str, Any]) -> str:
    low, high = d["ci95"]
    return f"{100 * d['difference']:+.1f} pp [{100 * low:+.1f}, {100 * high:+.1f}]"


def markdown(results: dict) -> str:
    s, q = results["summary"], results["quality"]
    lines = [
        "# SMT against full tiling", "",
        f"{s['n_slides']} test slides ({results['slide_side']} px), same weights for every timing. SMT walk: "
        f"K = {results['smt']['top_k']}, slide score = {results['smt'].get('aggregate', 'mean')} over the "
        "last layer's images.", "",
        "| method | accuracy | balanced acc. | AUROC |", "| --- | --- | --- | --- |",
        *[f"| {k} | {v['accuracy']:.3f} | {v['balanced_accuracy']:.3f} | {_num(v['auroc'])} |"
          for k, v in q.items()],
        "", "| SMT minus (same slides, paired bootstrap) | accuracy [95% CI] | AUROC [95% CI] |",
        "| --- | --- | --- |",
        *[f"| {k} | {_diff(v['accuracy'])} | {_diff(v['auroc'])} |"
          for k, v in results["smt_minus_baseline"].items()],
        "", "| per slide (median) | SMT | SMT, box from the tiler's mask | full tiling |",
        "| --- | --- | --- | --- |",
        "| wall s, cold (tissue detection included) | "
        + " | ".join(f"{s[f'{m}_wall_s']:.2f}" for m in METHODS) + " |",
        "| of which tissue detection (and tiling) s | "
        + " | ".join(f"{s[f'{m}_tissue_s']:.2f}" for m in METHODS) + " |",
        "| wall s, tissue excluded | "
        + " | ".join(f"{s[f'{m}_wall_s_tissue_excluded']:.2f}" for m in METHODS) + " |",
        "| tiling / method: wall, cold | " + " | ".join(f"{s[f'{m}_wall_ratio']:.1f}x" for m in METHODS[:2])
        + " | |",
        "| tiling / method: wall, tissue excluded | "
        + " | ".join(f"{s[f'{m}_wall_ratio_tissue_excluded']:.1f}x" for m in METHODS[:2]) + " | |",
        f"| regions / tiles read | {s['smt_reads']:.0f} | {s['smt_reads']:.0f} | {s['tiles']:.0f} |",
        *[f"| {label} (M) | " + " | ".join(f"{s[f'{m}_{what}'] / 1e6:.2f}" for m in METHODS) + " |"
          for what, label in PIXELS],
        *[f"| tiling / method: {label} | " + " | ".join(f"{s[f'{m}_{what}_ratio']:.1f}x" for m in METHODS[:2])
          + " | |" for what, label in PIXELS],
        f"| level-0 px per image px (SMT layer 3 / tiles) | {s['smt_layer3_level0_px_per_px']:.2f} | | "
        f"{s['tiling_level0_px_per_px']:.2f} |",
    ]  # fmt: skip
    if results.get("focus"):
        f = results["focus"]
        lines += ["", "| focusing (positive slides) | precision | chance |", "| --- | --- | --- |"]
        lines += [
            f"| {k} top-K over a lesion | {v['precision']:.3f} | {v['chance']:.3f} |" for k, v in f.items()
        ]
    if results.get("scaling"):
        lines += ["", "| slide side | tiles | SMT s | tiling s | wall ratio | tissue-excluded ratio | "
                  "file-pixel ratio |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for size, v in results["scaling"].items():
            lines.append(f"| {size} | {v['tiles']:.0f} | {v['smt_wall_s']:.2f} | {v['tiling_wall_s']:.2f} | "
                         f"{v['smt_wall_ratio']:.1f}x | {v['smt_wall_ratio_tissue_excluded']:.1f}x | "
                         f"{v['smt_file_pixels_ratio']:.1f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smt-run", type=Path, required=True, help="a finished model=smt run folder")
    parser.add_argument("--tile-run", type=Path, required=True, help="a tile classifier run (or artifact)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="*", default=[], help="extra slide sides for the scaling")
    parser.add_argument("--scale-slides", type=int, default=2)
    parser.add_argument("--mil-epochs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top-k", type=int, help="K of the walk at inference (default: as trained)")
    parser.add_argument("--aggregate", choices=("mean", "max"), help="slide score (default: as trained)")
    parser.add_argument(
        "--test-set", nargs="*", default=[], metavar="KEY=VALUE",
        help="dataset overrides for the test slides only, e.g. dataset.seed=1 "
        "dataset.slides_per_split=[2,2,24]: fresh slides to confirm a setting chosen on the run's own test "
        "slides (MIL still trains on the run's)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg, dm = datamodule_of(args.smt_run)
    mpp = cfg.dataset.reader.mpp
    smt = load_smt_model(resolve_artifact(args.smt_run, "smt_fp32"))
    for key, value in (("top_k", args.top_k), ("aggregate", args.aggregate)):  # the slide CLI's smt.* too
        if value is not None:
            smt[1]["model"]["smt"][key] = value
    smt_settings(*smt, args.smt_run)  # a K the grid cannot hold fails before any slide
    tile = load_classifier(resolve_artifact(args.tile_run))
    test = measure_split(datamodule_with(cfg, args.test_set) if args.test_set else dm, "test", smt, tile, mpp)
    labels = [r["label"] for r in test]
    scores = {
        "smt_fp32": [r["smt"]["positive"] for r in test],
        "tiling_max": [r["tiling"]["max"] for r in test],
        "tiling_mean": [r["tiling"]["mean"] for r in test],
    }
    if args.mil_epochs > 0:  # 0: no MIL (it tiles every training slide again)
        scores["mil_gated"] = mil_baseline(dm, tile, mpp, test, args.mil_epochs, args.out)
    quality = {
        "smt_fp32": binary_quality(scores["smt_fp32"], labels),
        "smt_fp32 (max over layer-3 images)": binary_quality(
            [r["smt"]["positive_max"] for r in test], labels
        ),
        "smt_fp32 (box from the tiler's mask)": binary_quality(
            [r["smt_tiler_mask"]["positive"] for r in test], labels
        ),
        **{k: binary_quality(v, labels) for k, v in scores.items() if k != "smt_fp32"},
    }
    versus = {k: paired_bootstrap(scores["smt_fp32"], scores[k], labels) for k in list(scores)[1:]}
    focus = [r["focus"] for r in test if "focus" in r]
    results = {
        "slide_side": cfg.dataset.width,
        "tile_mpp": tile[1].get("mpp"),
        "smt": {k: smt[1]["model"]["smt"][k] for k in ("image_size", "grid", "top_k", "layers", "aggregate")},
        "quality": quality,
        "smt_minus_baseline": versus,
        "summary": summarise(test),
        "focus": {
            layer: {
                "precision": float(np.mean([f[layer]["precision"] for f in focus])),
                "chance": float(np.mean([f[layer]["chance"] for f in focus])),
                "n_slides": len(focus),
            }
            for layer in ("layer1", "layer2")
        }
        if focus
        else None,
        "slides": [{**r, "tiling": _without_embeddings(r["tiling"])} for r in test],
        "box_shift": _box_shift(test),
    }
    if args.sizes:
        rows = scaling(cfg, smt, tile, args.sizes, args.scale_slides, mpp, args.out / "scaling_slides")
        results["scaling"] = {size: summarise([r for r in rows if r["size"] == size]) for size in args.sizes}
        results["scaling_slides"] = rows
    write_json(args.out / "results.json", results)
    (args.out / "results.md").write_text(markdown(results))
    write_records(args.out, cfg, quality, test, {"top_k": args.top_k, "aggregate": args.aggregate})
    print(markdown(results))


if __name__ == "__main__":
    main()
