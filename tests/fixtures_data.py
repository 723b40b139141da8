"""Tiny datasets in the exact on-disk layout of the real ones, for the loader tests.

Each image is noise around a class-dependent tint, so a small model can learn something from it. Every
builder returns the root to point ``dataset.root`` at.
"""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

BACH_CLASSES = ["Normal", "Benign", "InSitu", "Invasive"]
BACH_PREFIX = {"Normal": "n", "Benign": "b", "InSitu": "is", "Invasive": "iv"}
ISIC_CLASSES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
ISIC = "ISIC2018_Task3"


def tinted(rng: np.random.Generator, label: int, num_classes: int, height: int, width: int) -> np.ndarray:
    """HxWx3 uint8 noise whose mean colour depends on the label."""
    hue = 2 * np.pi * label / max(num_classes, 1)
    tint = 150 + 60 * np.array([np.cos(hue), np.cos(hue + 2.1), np.cos(hue + 4.2)])
    noise = rng.normal(0, 25, size=(height, width, 3))
    return np.clip(tint + noise, 0, 255).astype(np.uint8)


def make_bach(
    root: str | Path,
    per_class: int = 3,
    size: tuple[int, int] = (64, 48),
    csv_file: bool = True,
    seed: int = 0,
) -> Path:
    """``<root>/Photos/<class>/<p>NNN.tif`` RGB TIFFs of ``size`` (width, height), plus the CSV."""
    root, rng = Path(root), np.random.default_rng(seed)
    photos = root / "Photos"
    lines = []
    for label, c in enumerate(BACH_CLASSES):
        (photos / c).mkdir(parents=True, exist_ok=True)
        for i in range(1, per_class + 1):
            name = f"{BACH_PREFIX[c]}{i:03d}.tif"
            Image.fromarray(tinted(rng, label, 4, size[1], size[0])).save(photos / c / name, format="TIFF")
            lines.append(f"{name},{c}")
    if csv_file:
        (photos / "microscopy_ground_truth.csv").write_text("\n".join(lines) + "\n")
    return root


def _isic_part(root: Path, part: str, labels: list[int], start: int, rng: np.random.Generator) -> list[str]:
    """Write one ISIC part (input jpgs + one-hot ground-truth CSV); return the image ids."""
    inputs = root / f"{ISIC}_{part}_Input"
    truth = root / f"{ISIC}_{part}_GroundTruth"
    inputs.mkdir(parents=True, exist_ok=True)
    truth.mkdir(parents=True, exist_ok=True)
    (inputs / "LICENSE.txt").write_text("CC-BY-NC\n")  # the real archives carry one too
    names = [f"ISIC_{start + i:07d}" for i in range(len(labels))]
    with open(truth / f"{ISIC}_{part}_GroundTruth.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", *ISIC_CLASSES])
        for name, y in zip(names, labels, strict=True):
            Image.fromarray(tinted(rng, y, 7, 30, 40)).save(inputs / f"{name}.jpg", quality=90)
            w.writerow([name, *("1.0" if k == y else "0.0" for k in range(7))])
    return names


def make_isic(
    root: str | Path,
    n: int = 70,
    with_official_splits: bool = False,
    with_lesion_groups: bool = True,
    official_per_class: int = 2,
    seed: int = 0,
) -> Path:
    """ISIC 2018 Task 3 layout: ``n`` training images (balanced classes, lesions of 1-3 photos), optional
    lesion groupings CSV and official validation/test parts."""
    root, rng = Path(root), np.random.default_rng(seed)
    labels = [i % 7 for i in range(n)]
    names = _isic_part(root, "Training", labels, 24306, rng)
    if with_lesion_groups:
        # Photos of one lesion share its class; lesion sizes cycle 1, 2, 3 within each class.
        lesion, counter = {}, 0
        for c in range(7):
            members = [nm for nm, y in zip(names, labels, strict=True) if y == c]
            i, size = 0, 1
            while i < len(members):
                for nm in members[i : i + size]:
                    lesion[nm] = f"HAM_{counter:07d}"
                counter, i, size = counter + 1, i + size, size % 3 + 1
        with open(root / f"{ISIC}_Training_LesionGroupings.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "lesion_id", "diagnosis_confirm_type"])
            for nm in names:
                w.writerow([nm, lesion[nm], "histopathology"])
    if with_official_splits:
        k = official_per_class
        _isic_part(root, "Validation", [c for c in range(7) for _ in range(k)], 34321, rng)
        _isic_part(root, "Test", [c for c in range(7) for _ in range(k)], 34524, rng)
    return root


def make_medmnist(
    path: str | Path,
    preset: str = "pathmnist",
    num_classes: int | None = None,
    sizes: tuple[int, int, int] = (72, 18, 18),
    image_size: int = 28,
    gray: bool = False,
    seed: int = 0,
) -> Path:
    """A MedMNIST-format npz at ``path`` (``<root>/<preset>.npz`` for a dataset root); returns the file."""
    path, rng = Path(path), np.random.default_rng(seed)
    num_classes = num_classes or {"pathmnist": 9, "dermamnist": 7}.get(preset, 4)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        labels = np.arange(n) % num_classes
        images = np.stack([tinted(rng, y, num_classes, image_size, image_size) for y in labels])
        arrays[f"{split}_images"] = images.mean(axis=3).astype(np.uint8) if gray else images
        arrays[f"{split}_labels"] = labels.astype(np.uint8)[:, None]  # N,1 as the real files
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def _cifar_batch(rng: np.random.Generator, labels: list[int], num_classes: int, label_key: bytes) -> dict:
    images = np.stack([tinted(rng, y, num_classes, 32, 32) for y in labels])
    return {
        b"batch_label": b"fixture batch",
        label_key: list(labels),
        b"data": images.transpose(0, 3, 1, 2).reshape(len(labels), 3072),  # R, G, B planes, row-major
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }


def _dump(obj: dict, path: Path) -> None:
    # The official files are protocol-2 pickles written by numpy 1: name its module path as they do.
    data = pickle.dumps(obj, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    Path(path).write_bytes(data)


def make_cifar(
    root: str | Path,
    variant: str = "cifar10",
    train_per_class: int = 10,
    test_per_class: int = 3,
    seed: int = 0,
) -> Path:
    """The CIFAR python pickle batches under ``root`` (cifar-10-batches-py/ or cifar-100-python/)."""
    root, rng = Path(root), np.random.default_rng(seed)
    k = 10 if variant == "cifar10" else 100
    train = [c for c in range(k) for _ in range(train_per_class)]
    rng.shuffle(train)
    test = [c for c in range(k) for _ in range(test_per_class)]
    names = [f"class_{c}".encode() for c in range(k)]
    if variant == "cifar10":
        base = root / "cifar-10-batches-py"
        base.mkdir(parents=True, exist_ok=True)
        for i, chunk in enumerate(np.array_split(np.array(train), 5), start=1):
            _dump(_cifar_batch(rng, chunk.tolist(), k, b"labels"), base / f"data_batch_{i}")
        _dump(_cifar_batch(rng, test, k, b"labels"), base / "test_batch")
        _dump(
            {b"label_names": names, b"num_cases_per_batch": len(train) // 5, b"num_vis": 3072},
            base / "batches.meta",
        )
    else:
        base = root / "cifar-100-python"
        base.mkdir(parents=True, exist_ok=True)
        for part, labels in (("train", train), ("test", test)):
            batch = _cifar_batch(rng, labels, k, b"fine_labels")
            batch[b"coarse_labels"] = [y // 5 for y in labels]
            _dump(batch, base / part)
        _dump(
            {b"fine_label_names": names, b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]},
            base / "meta",
        )
    return root


def make_image_folder(
    root: str | Path,
    with_splits: bool = False,
    classes: tuple[str, ...] = ("lymphocytes", "stroma", "tumor"),
    per_class: int = 8,
    ext: str = ".png",
    seed: int = 0,
) -> Path:
    """``<root>/<class>/*.png`` or, with splits, ``<root>/{train,val,test}/<class>/*.png``."""
    root, rng = Path(root), np.random.default_rng(seed)
    parts = {"train": per_class, "val": max(2, per_class // 4), "test": max(2, per_class // 4)}
    for split, n in parts.items() if with_splits else [("", per_class)]:
        for label, c in enumerate(classes):
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(tinted(rng, label, len(classes), 24, 24)).save(folder / f"{c}_{i:03d}{ext}")
    return root


# dataset option -> a builder of its smallest fixture that still gives every class in every split
BUILDERS = {
    "bach": lambda root: make_bach(root),
    "isic2018": lambda root: make_isic(root, n=21),
    "medmnist": lambda root: make_medmnist(root / "pathmnist.npz", sizes=(18, 9, 9)).parent,
    "cifar": lambda root: make_cifar(root, train_per_class=4, test_per_class=1),
    "image_folder": lambda root: make_image_folder(root, per_class=4),
}
