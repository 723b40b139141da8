"""CIFAR-10/100 as distributed: the python pickle batches of https://www.cs.toronto.edu/~kriz/cifar.html.

``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` or
``<root>/cifar-100-python/{train,test,meta}``. Pickles can run code when loaded, so they are read with an
unpickler that admits only numpy array reconstruction and plain containers: a file that asks for anything
else is refused. Still, the loader is meant for the official files the user put under ``dataset.root``.
A sanity-check dataset for the compression pipeline, not a pathology benchmark.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from patholite.data.base import HistologyDataModule, ImageSet
from patholite.data.images import require_path
from patholite.data.splits import check_fractions, grouped_split
from patholite.errors import DatasetError

# variant -> (folder, train files, test file, meta file, label key, label-names key)
VARIANTS = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "batches.meta",
        b"labels",
        b"label_names",
    ),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", b"fine_labels", b"fine_label_names"),
}
_WHERE = (
    "Download the python version (cifar-10-python.tar.gz / cifar-100-python.tar.gz) from "
    "https://www.cs.toronto.edu/~kriz/cifar.html and untar it into dataset.root"
)
# What an ndarray pickle names, in numpy 1 and 2, and the bytes constructor of protocol-2 pickles written by
# Python 3; nothing else may be constructed.
_ALLOWED = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to construct {module}.{name}")
        return super().find_class(module, name)


def load_batch(path: Path) -> dict:
    """One CIFAR pickle (bytes keys, as the official Python-2 files have)."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, OSError) as e:
        raise DatasetError(
            f"dataset=cifar: cannot read {path} as a CIFAR python batch ({e}). {_WHERE}"
        ) from e
    if not isinstance(batch, dict):
        raise DatasetError(f"dataset=cifar: {path} holds a {type(batch).__name__}, not a CIFAR batch dict")
    return batch


def _images_labels(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = load_batch(path)
    missing = [k.decode() for k in (b"data", label_key) if k not in batch]
    if missing:
        raise DatasetError(f"dataset=cifar: {path} lacks the keys {missing}; is it the right CIFAR variant?")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DatasetError(
            f"dataset=cifar: {path} data is {data.dtype} {data.shape} with {len(labels)} labels; expected "
            "N x 3072 uint8 (32x32 RGB planes) and N labels"
        )
    # Each row is the red, green, then blue 32x32 plane, row-major.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


class CifarDataModule(HistologyDataModule):
    """CIFAR-10 or CIFAR-100 (fine labels): official test split, seeded stratified val from train."""

    def _layout(self) -> tuple:
        if self.cfg.variant not in VARIANTS:
            raise DatasetError(
                f"dataset=cifar: variant={self.cfg.variant!r} must be one of {sorted(VARIANTS)}"
            )
        folder, train, test, meta, label_key, names_key = VARIANTS[self.cfg.variant]
        base = require_path(self.root / folder, f"dataset=cifar variant={self.cfg.variant}", _WHERE, True)
        return base, train, test, meta, label_key, names_key

    def default_class_names(self) -> list[str]:
        base, _, _, meta, _, names_key = self._layout()
        batch = load_batch(require_path(base / meta, "dataset=cifar", _WHERE))
        if names_key not in batch:
            raise DatasetError(
                f"dataset=cifar: {base / meta} lacks {names_key.decode()}; expected the CIFAR meta"
            )
        return [n.decode() if isinstance(n, bytes) else str(n) for n in batch[names_key]]

    def read_splits(self) -> dict[str, ImageSet]:
        base, train_files, test_file, _, label_key, _ = self._layout()
        check_fractions(self.cfg.val_fraction, 0.0, "dataset=cifar", need_val=True)
        if self.cfg.class_names and len(self.cfg.class_names) != len(self.default_class_names()):
            raise DatasetError(
                f"dataset=cifar: dataset.class_names has {len(self.cfg.class_names)} names but "
                f"{self.cfg.variant} has {len(self.default_class_names())} classes"
            )
        paths = [require_path(base / f, "dataset=cifar", _WHERE) for f in [*train_files, test_file]]
        parts = [_images_labels(p, label_key) for p in paths]
        train_x = np.concatenate([x for x, _ in parts[:-1]])
        train_y = np.concatenate([y for _, y in parts[:-1]])
        test_x, test_y = parts[-1]
        split = grouped_split(train_y, None, self.cfg.val_fraction, 0.0, self.cfg.split_seed)
        return {
            "train": ImageSet(labels=train_y[split["train"]], images=train_x[split["train"]]),
            "val": ImageSet(labels=train_y[split["val"]], images=train_x[split["val"]]),
            "test": ImageSet(labels=test_y, images=test_x),
        }
