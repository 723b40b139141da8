"""Accuracy under a stain shift: train on the synthetic tiles' normal staining, test on a shifted one.

Arms (same data, schedule and default augmentation; only the stain handling differs):
  none       no stain handling
  learnable  the learnable stain front-end (model.stain=learnable)
  adaptive   the front-end with per-image density normalisation (model.stain=adaptive), its stain vectors
             (model.stain_vectors) Macenko's estimate on the training split (the same 64 tiles the macenko
             arm fits on): per-image density normalisation needs the data's own stain directions, with
             Ruifrok's a density change of one stain leaks into the others' densities
  macenko    Macenko normalisation toward the training split (dataset.stain_norm=macenko)
  reinhard   Reinhard normalisation toward the training split (dataset.stain_norm=reinhard)

Each arm and seed is one ``python -m patholite.train`` run (compression=none) whose test split is
re-stained with ``dataset.stain_shift``; its float artifact is then evaluated here on the test split in four
stainings: shifted, normal, the shift's density scaling alone and its hue turn alone (the same tiles: a shift
only re-renders them). Every arm is paired with ``none`` of the
same seed on the same tiles: the difference of accuracy and its 95% percentile bootstrap interval (tiles
resampled). Pooled over seeds, each tile's correctness is averaged over the seeds' models first.

  PATHOLITE_ROOT=/work/runs-stain nice -n 5 python scripts/stain_shift.py --seeds 0 1 2
Runs already finished (``metrics.json`` with status ok) are reused, so an interrupted sweep continues.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from patholite.artifacts.load import load_artifact
from patholite.data.families import build_datamodule
from patholite.io import atomic_path, write_json
from patholite.measure.evaluate import bootstrap_accuracy_ci
from patholite.measure.stats import bootstrap

SPLITS = ("shifted", "normal", "scale_only", "rotate_only")
ARMS = {
    "none": [],
    "learnable": ["model.stain=learnable"],
    "adaptive": ["model.stain=adaptive"],
    "macenko": ["dataset.stain_norm=macenko"],
    "reinhard": ["dataset.stain_norm=reinhard"],
}


def training_stain_vectors(reference_run: Path) -> list[list[float]]:
    """Macenko's H and E vectors of the training split of ``reference_run`` (the same seeded 64 tiles
    ``dataset.stain_norm=macenko`` fits on; the test split is never read)."""
    cfg = OmegaConf.create(
        OmegaConf.to_container(OmegaConf.load(reference_run / ".hydra" / "config.yaml").dataset, resolve=True)
    )
    cfg.stain_norm, cfg.stain_reference = "macenko", None
    dm = build_datamodule(cfg)
    dm.splits = {"train": dm.read_splits()["train"]}
    return [[round(float(v), 4) for v in row] for row in dm._fit_stain_norm().vectors]


def train(run_dir: Path, arm: str, seed: int, args: argparse.Namespace) -> None:
    """One training run of ``arm`` (skipped when its record says ok)."""
    record = run_dir / "metrics.json"
    if record.exists() and json.loads(record.read_text()).get("status") == "ok":
        return
    extra = list(ARMS[arm])
    if arm == "adaptive":  # the none run of the same seed has the same training split
        vectors = training_stain_vectors(run_dir.parent / f"none-s{seed}")
        extra.append(f"model.stain_vectors={json.dumps(vectors).replace(' ', '')}")
    overrides = [
        "dataset=synthetic",
        f"model={args.model}",
        "compression=none",
        "logger=csv",
        "accelerator=cpu",
        f"accelerator.threads={args.threads}",
        f"seed={seed}",
        f"trainer.max_epochs={args.epochs}",
        f"dataset.image_size={args.image_size}",
        f"dataset.train_per_class={args.train_per_class}",
        f"dataset.test_per_class={args.test_per_class}",
        f"dataset.stain_shift.rotate_deg={args.rotate}",
        f"dataset.stain_shift.scale_h={args.scale_h}",
        f"dataset.stain_shift.scale_e={args.scale_e}",
        "callbacks.progress_bar=none",
        "bench.isolation=process",
        "bench.batch_sizes=[8]",
        "bench.warmup=1",
        "bench.iters=2",
        "bench.repeats=1",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    print(f"[stain_shift] training {arm} seed {seed}", flush=True)
    subprocess.run([sys.executable, "-m", "patholite.train", *overrides], check=True)


@torch.no_grad()
def predictions(net: torch.nn.Module, dataset_cfg, shift: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true labels of the test split, re-stained by ``shift`` (None: as configured)."""
    cfg = OmegaConf.create(OmegaConf.to_container(dataset_cfg, resolve=True))
    if shift is not None:
        cfg.stain_shift = shift
    dm = build_datamodule(cfg)
    dm.setup("test")
    preds, labels = [], []
    for images, y in dm.test_dataloader():
        preds.append(net(images).argmax(1).numpy())
        labels.append(y.numpy())
    return np.concatenate(preds), np.concatenate(labels)


def test_stainings(dataset_cfg) -> dict[str, dict | None]:
    """The test split's stainings evaluated: the configured shift, none, and its two parts alone (the
    densities scaled without the hue turn, the hue turned without the scaling), to tell them apart."""
    shift = dataset_cfg.stain_shift
    return {
        "shifted": None,
        "normal": {"rotate_deg": 0.0, "scale_h": 1.0, "scale_e": 1.0},
        "scale_only": {"rotate_deg": 0.0, "scale_h": shift.scale_h, "scale_e": shift.scale_e},
        "rotate_only": {"rotate_deg": shift.rotate_deg, "scale_h": 1.0, "scale_e": 1.0},
    }


def evaluate(run_dir: Path) -> dict[str, np.ndarray]:
    """Per-tile correctness of the run's fp32 artifact on each test staining (``test_stainings``);
    cached in the run folder, missing stainings added to the cache."""
    cache = run_dir / "stain_shift_eval.npz"
    out: dict[str, np.ndarray] = {}
    if cache.exists():
        with np.load(cache) as data:
            out = dict(data)
    dataset_cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml").dataset
    missing = {k: v for k, v in test_stainings(dataset_cfg).items() if k not in out}
    if not missing:
        return out
    net, _ = load_artifact(run_dir / "artifacts" / "fp32")
    for name, shift in missing.items():
        pred, y = predictions(net.eval(), dataset_cfg, shift)
        out[name] = (pred == y).astype(np.float64)
    with atomic_path(cache) as tmp, open(tmp, "wb") as f:
        np.savez(f, **out)
    return out


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """Accuracy of ``a`` minus ``b`` (per-tile correctness, same tiles) with its 95% bootstrap interval."""
    diff = torch.as_tensor(a - b)
    result = bootstrap(lambda idx: diff[idx].mean(dim=1), len(diff), resamples=2000, seed=0)
    return {"difference": result["value"], "ci95": result["ci"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default=None, help="folder of the runs (default $PATHOLITE_ROOT/stain_shift)"
    )
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--model", default="vit_micro")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32)
    # one thread: on a shared 2-core machine two threads ran a training step 5x slower than one
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-per-class", type=int, default=400)
    parser.add_argument("--test-per-class", type=int, default=250)
    parser.add_argument("--rotate", type=float, default=30.0)
    parser.add_argument("--scale-h", type=float, default=1.4)
    parser.add_argument("--scale-e", type=float, default=0.6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out or Path(os.environ.get("PATHOLITE_ROOT", ".")) / "stain_shift")
    results: dict = {"settings": vars(args), "runs": {}, "pooled": {}}
    correct: dict[str, dict[str, list[np.ndarray]]] = {}
    for seed in args.seeds:
        for arm in args.arms:
            run_dir = out / f"{arm}-s{seed}"
            train(run_dir, arm, seed, args)
            c = evaluate(run_dir)
            for split in SPLITS:
                correct.setdefault(arm, {}).setdefault(split, []).append(c[split])
            row = {
                split: {
                    "accuracy": float(c[split].mean()),
                    "ci95": bootstrap_accuracy_ci(torch.as_tensor(c[split])),
                }
                for split in SPLITS
            }
            if arm != "none" and "none" in args.arms:
                base = evaluate(out / f"none-s{seed}")
                for split in SPLITS:
                    row[f"vs_none_{split}"] = paired(c[split], base[split])
            results["runs"][f"{arm}-s{seed}"] = row
            print(f"[stain_shift] {arm} seed {seed}: {json.dumps(row)}", flush=True)
    for arm, splits in correct.items():
        mean = {split: np.mean(values, axis=0) for split, values in splits.items()}
        row = {
            split: {"accuracy": float(m.mean()), "ci95": bootstrap_accuracy_ci(torch.as_tensor(m))}
            for split, m in mean.items()
        }
        if arm != "none" and "none" in correct:
            for split in SPLITS:
                row[f"vs_none_{split}"] = paired(mean[split], np.mean(correct["none"][split], axis=0))
        results["pooled"][arm] = row
    write_json(out / "summary.json", results)
    print("| arm | seeds | " + " | ".join(f"{split} acc [95% CI], vs none" for split in SPLITS) + " |")
    print("| --- | --- |" + " --- |" * len(SPLITS))
    for arm, row in results["pooled"].items():
        cells = []
        for split in SPLITS:
            lo, hi = row[split]["ci95"]
            cell = f"{100 * row[split]['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
            vs = row.get(f"vs_none_{split}")
            if vs:
                d, (dlo, dhi) = vs["difference"], vs["ci95"]
                cell += f", {100 * d:+.1f} pp [{100 * dlo:+.1f}, {100 * dhi:+.1f}]"
            cells.append(cell)
        print(f"| {arm} | {' '.join(map(str, args.seeds))} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
