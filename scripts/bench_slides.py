"""Benchmark of the whole-slide engine on synthetic slides (the issue's three targets).

1. Overlap: end-to-end tiles/s of the engine (loader workers -> model -> writer thread) against the same
   model alone on the same tiles held in memory, same batch size; the model-only run gets the same thread
   budget. Both are alternated in one process, repeated, and reported as ratios.
2. Memory: peak memory of the whole process tree (engine + loader workers; PSS, so pages a forked worker
   shares with its parent count once), sampled every 100 ms, for a slide and ones with 16x (and, with
   --memory-scales 1 4 8, 64x) its area, each run in a fresh child.
3. Tissue: IoU of the detected tissue mask against the generator's ground truth, nuisances included.

    .venv/bin/python scripts/bench_slides.py --out outputs/bench-slides [--model deit_small] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make_artifact(out: Path, model_name: str, image_size: int, tile_size: int, mpp: float) -> Path:
    """A random-weight float artifact of a real model option, recording the tile geometry."""
    import torch
    from omegaconf import OmegaConf

    from patholite.artifacts.torch_float import save_float_artifact
    from patholite.config.options import load_model_option
    from patholite.models.factory import create_network

    model = load_model_option(model_name)
    torch.manual_seed(0)
    net = create_network(model, 4, image_size).eval()
    meta = {
        "model": {**OmegaConf.to_container(model, resolve=True), "checkpoint": None},
        "class_names": ["Normal", "Benign", "InSitu", "Invasive"],
        "image_size": image_size,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "mpp": mpp,
        "tile_size": tile_size,
        "random_weights": True,
    }
    directory = out / f"artifact-{model_name}-{image_size}"
    save_float_artifact(net, directory, meta)
    return directory


def make_slide(out: Path, side: int, seed: int, nuisances: bool = True) -> Path:
    from patholite.data.synthetic.slides import write_synthetic_slide
    from patholite.data.synthetic.spec import LesionSpec, SlideSpec

    path = out / f"slide-{side}-{seed}.svs"
    if not path.with_suffix(".truth.npz").is_file():
        um = side * 0.5  # the slide's side in micrometres at the default 0.5 um/px
        spec = SlideSpec(
            width=side,
            height=side,
            seed=seed,
            lesions=[
                LesionSpec("Invasive", 2, (0.04 * um, 0.1 * um)),
                LesionSpec("InSitu", 1, (0.04 * um, 0.08 * um)),
            ],
        )
        if not nuisances:
            spec = _without_nuisances(spec)
        write_synthetic_slide(path, spec)
    return path


def _without_nuisances(spec):
    import dataclasses

    names = {f.name for f in dataclasses.fields(spec)}
    off = {k: False for k in ("pen_marks", "folds", "bubbles", "faint_fat", "gradient") if k in names}
    return dataclasses.replace(spec, **off)


def slide_cfg(slide: Path, artifact: Path, cache: Path, workers: int, threads: int, batch: int):
    from omegaconf import OmegaConf

    import patholite.config  # noqa: F401
    from patholite.config.slide_schema import SlideRunConfig

    cfg = OmegaConf.structured(SlideRunConfig)
    cfg.slide = str(slide)
    cfg.artifact = str(artifact)
    cfg.engine.workers = workers
    cfg.engine.threads = threads
    cfg.engine.batch_size = batch
    cfg.paths.cache_dir = str(cache)
    cfg.paths.root_dir = str(cache)
    cfg.paths.output_dir = str(cache)
    return cfg


# ---------------------------------------------------------------------------------------------- overlap
def bench_overlap(args, out: Path) -> dict:
    import torch

    from patholite.slides.engine import Normalise, SlideTiles, TileSpec, stream_tiles
    from patholite.slides.inference import load_classifier, tile_geometry
    from patholite.wsi.reader import open_slide
    from patholite.wsi.tiling import tile_grid
    from patholite.wsi.tissue import detect_tissue

    artifact = make_artifact(out, args.model, args.image_size, args.image_size, 0.5)
    slide_path = make_slide(out, args.overlap_side, seed=1)
    model, meta = load_classifier(artifact)
    cfg = slide_cfg(slide_path, artifact, out / "cache", args.workers, args.threads, args.batch)
    geometry = tile_geometry(cfg.tile, meta, artifact)
    with open_slide(slide_path) as slide:
        grid = tile_grid(slide, geometry.patch_size, mpp=geometry.mpp, tissue=detect_tissue(slide), theta=0.5)
    coords = grid.coords[: args.max_tiles]
    spec = TileSpec(
        str(slide_path), coords, int(grid.size0), geometry.patch_size, args.image_size,
        tuple(meta["mean"]), tuple(meta["std"]),
    )  # fmt: skip
    tiles = SlideTiles(spec)
    # the same tiles, decoded and normalised once: the model alone
    held = Normalise(meta["mean"], meta["std"], "cpu")(torch.stack([tiles[i][0] for i in range(len(coords))]))
    results: dict[str, list[float]] = {"model_only": [], "end_to_end": []}
    for rep in range(args.repeats):
        for variant in ("model_only", "end_to_end") if rep % 2 == 0 else ("end_to_end", "model_only"):
            if variant == "model_only":
                torch.set_num_threads(args.model_only_threads)
                start = time.perf_counter()
                with torch.inference_mode():
                    for i in range(0, len(held), args.batch):
                        torch.softmax(model(held[i : i + args.batch]), 1)
                results[variant].append(len(held) / (time.perf_counter() - start))
            else:
                torch.set_num_threads(args.threads)
                stream = stream_tiles(
                    model, spec, meta["class_names"], out / "tiles.csv", args.batch, args.workers
                )
                results[variant].append(stream.timings["tiles_per_s"])
                last = stream.timings
    ratios = [e / m for e, m in zip(results["end_to_end"], results["model_only"], strict=True)]
    return {
        "model": args.model,
        "image_size": args.image_size,
        "tiles": len(coords),
        "batch": args.batch,
        "workers": args.workers,
        "model_threads_end_to_end": args.threads,
        "model_only_threads": args.model_only_threads,
        "tiles_per_s": {k: [round(v, 2) for v in vs] for k, vs in results.items()},
        "ratio_end_to_end_over_model_only": {
            "median": float(np.median(ratios)),
            "min": float(min(ratios)),
            "max": float(max(ratios)),
        },
        "last_stage_timings": last,
    }


# ----------------------------------------------------------------------------------------------- memory
def _engine_child(slide: Path, artifact: Path, cache: Path, workers: int, threads: int, batch: int) -> None:
    from patholite.slides.run import run_slides

    cfg = slide_cfg(slide, artifact, cache, workers, threads, batch)
    rows = run_slides([slide], cfg, cache / "out")
    print(json.dumps({"n_tiles": rows[0]["n_tiles"], "status": rows[0]["status"]}))


def peak_tree_memory(cmd: list[str]) -> tuple[dict[str, float], str]:
    """Peak memory (MiB) of a command and its descendants, sampled every 100 ms: the total proportional set
    size (PSS: pages shared by the forked loader workers and their parent counted once, not per process),
    the parent's RSS alone, and the total RSS (shared pages counted in every process)."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parent = psutil.Process(proc.pid)
    peak = {"pss_total": 0.0, "rss_parent": 0.0, "rss_total": 0.0}
    while proc.poll() is None:
        try:
            procs = [parent, *parent.children(recursive=True)]
            infos = [p.memory_full_info() for p in procs]
            sample = {
                "pss_total": sum(i.pss for i in infos) / 2**20,
                "rss_parent": infos[0].rss / 2**20,
                "rss_total": sum(i.rss for i in infos) / 2**20,
            }
            peak = {k: max(v, sample[k]) for k, v in peak.items()}
        except psutil.Error:
            pass
        time.sleep(0.1)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"engine child failed: {stderr[-2000:]}")
    return {k: round(v, 1) for k, v in peak.items()}, stdout.strip().splitlines()[-1]


def bench_memory(args, out: Path) -> dict:
    artifact = make_artifact(out, args.memory_model, 96, 96, 128.0 / 96)  # a synthetic-tile model
    rows = {}
    for side in (args.memory_side * k for k in args.memory_scales):
        slide = make_slide(out, side, seed=2)
        cmd = [
            sys.executable, __file__, "--child", str(slide), str(artifact), str(out / f"cache-{side}"),
            str(args.workers), str(args.threads), str(args.batch),
        ]  # fmt: skip
        peak, line = peak_tree_memory(cmd)
        rows[f"{side}x{side}"] = {"peak_mib": peak, **json.loads(line)}
    peaks = [r["peak_mib"]["pss_total"] for r in rows.values()]
    return {
        "model": args.memory_model,
        "slides": rows,
        "peak_ratio_to_smallest": {
            f"{k * k}x area": round(p / peaks[0], 3) for k, p in zip(args.memory_scales, peaks, strict=True)
        },
    }


# ----------------------------------------------------------------------------------------------- tissue
def bench_tissue(args, out: Path) -> dict:
    import cv2

    from patholite.data.synthetic.slides import read_truth
    from patholite.wsi.reader import open_slide
    from patholite.wsi.tissue import detect_tissue

    ious = []
    for seed in range(args.tissue_slides):
        path = make_slide(out, args.tissue_side, seed=100 + seed)
        truth = read_truth(path)
        with open_slide(path) as slide:
            mask = detect_tissue(slide)
        # compare on the truth's grid
        shape = truth.tissue.shape[::-1]
        pred = cv2.resize(mask.mask.astype(np.uint8), shape, interpolation=cv2.INTER_NEAREST)
        t = truth.tissue.astype(bool)
        p = pred.astype(bool)
        ious.append(float((t & p).sum() / max(1, (t | p).sum())))
    return {
        "slides": args.tissue_slides,
        "side": args.tissue_side,
        "iou": [round(v, 4) for v in ious],
        "iou_mean": float(np.mean(ious)),
        "iou_min": float(np.min(ious)),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        slide, artifact, cache, workers, threads, batch = sys.argv[2:8]
        _engine_child(Path(slide), Path(artifact), Path(cache), int(workers), int(threads), int(batch))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/bench-slides"))
    p.add_argument("--model", default="deit_small")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="model threads in the engine")
    p.add_argument("--model-only-threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--max-tiles", type=int, default=192)
    p.add_argument("--overlap-side", type=int, default=8192)
    p.add_argument("--memory-model", default="vit_mini")
    p.add_argument("--memory-side", type=int, default=4096)
    p.add_argument("--memory-scales", type=int, nargs="+", default=[1, 4], help="side multiples")
    p.add_argument("--tissue-slides", type=int, default=6)
    p.add_argument("--tissue-side", type=int, default=8192)
    p.add_argument("--only", choices=["overlap", "memory", "tissue"], action="append")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {}
    for name, fn in (("tissue", bench_tissue), ("overlap", bench_overlap), ("memory", bench_memory)):
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        report[name] = fn(args, args.out)
        report[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps({name: report[name]}, indent=2), flush=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
