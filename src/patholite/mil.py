"""``python -m patholite.mil``: gated-attention MIL trained from slide labels on a cohort's feature files.

    python -m patholite.slide mode=features artifact=<encoder> slides=<cohort> hydra.run.dir=feats
    python -m patholite.mil feats --labels slides.csv --out mil

``slides.csv`` has a header and one row per slide: ``slide`` (its name: the folder of its ``features.h5``
under the features folder), ``label`` (a class name) and ``split`` (``train`` or ``test``). MIL
(``models.mil``) learns from the train slides' bags and scores the test slides; every bag must come from
the same encoder and tile geometry. Writes ``scores.csv`` (each test slide's class probabilities),
``metrics.json`` (AUROC for two classes, accuracy, counts, the bags' geometry) and ``model/`` (the MIL
artifact, its classes and the geometry it expects in its sidecar).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

from patholite.artifacts.mil import save_mil
from patholite.errors import ConfigError, PatholiteError
from patholite.io import atomic_path, write_json
from patholite.slides.features import FEATURES_FILE, mil_on_features

COLUMNS = ("slide", "label", "split")
SPLITS = ("train", "test")


def read_labels(path: Path, features: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """The class names (sorted) and each split's ``(feature file, class index)`` pairs; one error per
    problem, before any training."""
    if not path.is_file():
        raise ConfigError(f"--labels {path} does not exist; give a CSV with the columns {', '.join(COLUMNS)}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(f"--labels {path} lacks the columns {missing}; its header must name {COLUMNS}")
        rows = list(reader)
    bad = sorted({r["split"] for r in rows} - set(SPLITS))
    if bad:
        raise ConfigError(f"--labels {path}: split {bad} is not one of {SPLITS}")
    absent = [r["slide"] for r in rows if not (features / r["slide"] / FEATURES_FILE).is_file()]
    if absent:
        raise ConfigError(
            f"{len(absent)} slides of {path} have no {FEATURES_FILE} under {features} (e.g. {absent[:3]}); "
            "extract them with python -m patholite.slide mode=features, or drop their rows"
        )
    classes = sorted({r["label"] for r in rows})
    splits: dict[str, list[tuple[Path, int]]] = {s: [] for s in SPLITS}
    for r in rows:
        splits[r["split"]].append((features / r["slide"] / FEATURES_FILE, classes.index(r["label"])))
    train_classes = {y for _, y in splits["train"]}
    if len(train_classes) < 2 or not splits["test"]:
        raise ConfigError(
            f"--labels {path}: MIL needs train slides of at least two classes (has "
            f"{sorted(classes[y] for y in train_classes)}) and at least one test slide "
            f"(has {len(splits['test'])})"
        )
    return classes, splits


def run(features: Path, labels: Path, out: Path, epochs: int = 30, seed: int = 0) -> dict[str, Any]:
    """Train and score; returns the metrics written to ``out/metrics.json``."""
    classes, splits = read_labels(labels, features)
    result = mil_on_features(
        splits["train"], splits["test"], epochs=epochs, seed=seed, num_classes=len(classes)
    )
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "scores.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide", "label", "predicted", *(f"p_{c}" for c in classes)])
        for row in result["slides"]:
            probs = row["probs"]
            predicted = classes[_argmax(probs)]
            writer.writerow([row["slide"], classes[row["label"]], predicted, *(f"{p:.6f}" for p in probs)])
    hits = [_argmax(r["probs"]) == r["label"] for r in result["slides"]]
    metrics = {
        "classes": classes,
        "auroc": result["auroc"],
        "accuracy": sum(hits) / len(hits),
        "n_train": result["n_train"],
        "n_test": result["n_test"],
        "epochs": epochs,
        "seed": seed,
        "geometry": result["geometry"],
    }
    save_mil(result["model"], out / "model", {"class_names": classes, "features": result["geometry"]})
    write_json(out / "metrics.json", metrics)
    return metrics


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m patholite.mil", description=__doc__.splitlines()[0])
    parser.add_argument("features", type=Path, help="the features folder: <slide>/features.h5 per slide")
    parser.add_argument("--labels", type=Path, required=True, help="CSV with slide, label, split columns")
    parser.add_argument("--out", type=Path, required=True, help="where scores.csv, metrics.json, model/ go")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        metrics = run(args.features, args.labels, args.out, args.epochs, args.seed)
    except PatholiteError as err:
        print(f"patholite: error: {err}", file=sys.stderr)
        sys.exit(2)
    auroc = "n/a" if metrics["auroc"] is None else f"{metrics['auroc']:.3f}"
    print(f"MIL on {metrics['n_train']} train slides: {metrics['n_test']} test slides, AUROC {auroc}, "
          f"accuracy {metrics['accuracy']:.3f}; wrote {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
