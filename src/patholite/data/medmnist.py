"""MedMNIST npz files (``train_images``, ``train_labels``, ``val_*``, ``test_*``) with their official splits.

The file is ``dataset.npz`` or ``<root>/<preset>.npz``; MedMNIST+ files of larger sizes
(``pathmnist_224.npz``) work through ``dataset.npz``. Arrays are held in memory; grayscale presets become RGB
by a broadcast view, so they cost no extra memory until a batch is built.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from patholite.data.base import SPLITS, HistologyDataModule, ImageSet
from patholite.errors import DatasetError

PRESET_CLASSES: dict[str, list[str]] = {
    "pathmnist": [
        "adipose",
        "background",
        "debris",
        "lymphocytes",
        "mucus",
        "smooth muscle",
        "normal colon mucosa",
        "cancer-associated stroma",
        "colorectal adenocarcinoma epithelium",
    ],
    "dermamnist": [
        "actinic keratoses and intraepithelial carcinoma",
        "basal cell carcinoma",
        "benign keratosis-like lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevi",
        "vascular lesions",
    ],
}
MULTI_LABEL = ("chestmnist",)  # one image, several findings: not a single-label classification task
KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))
_WHERE = (
    "Get the npz from https://medmnist.com (the files are on Zenodo, linked there; or `pip install medmnist` "
    "and `python -m medmnist download`) and set dataset.root to its folder or dataset.npz to the file"
)


def _rgb_view(images: np.ndarray, path: Path, key: str) -> np.ndarray:
    """N,H,W or N,H,W,3 uint8 -> N,H,W,3 (grayscale as a read-only broadcast view)."""
    if images.dtype != np.uint8:
        raise DatasetError(f"dataset=medmnist: {path}[{key}] holds {images.dtype}; expected uint8 images")
    if images.ndim == 3:
        return np.broadcast_to(images[..., None], (*images.shape, 3))
    if images.ndim == 4 and images.shape[-1] == 3:
        return images
    if images.ndim == 4 and images.shape[-1] == 1:
        return np.broadcast_to(images, (*images.shape[:3], 3))
    raise DatasetError(
        f"dataset=medmnist: {path}[{key}] has shape {images.shape}; expected N,H,W (grayscale) or N,H,W,3 "
        "(3-D MedMNIST volumes are not supported)"
    )


def _labels(labels: np.ndarray, path: Path, key: str) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DatasetError(
            f"dataset=medmnist: {path}[{key}] has shape {labels.shape}: a multi-label task, which this "
            "single-label classifier cannot train on; use a multi-class preset such as pathmnist"
        )
    if labels.ndim not in (1, 2) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"dataset=medmnist: {path}[{key}] is {labels.dtype} of shape {labels.shape}; "
            "expected N,1 integers"
        )
    return labels.reshape(-1).astype(np.int64)


class MedmnistDataModule(HistologyDataModule):
    """A MedMNIST 2-D multi-class preset, official train/val/test splits."""

    def _check_preset(self) -> None:
        preset = self.cfg.preset
        if preset in MULTI_LABEL:
            raise DatasetError(
                f"dataset=medmnist: preset={preset} is multi-label; patholite trains single-label "
                "classifiers. "
                f"Use one of {sorted(PRESET_CLASSES)} or another multi-class preset with dataset.class_names"
            )
        if preset.endswith("3d"):
            raise DatasetError(f"dataset=medmnist: preset={preset} holds 3-D volumes; only 2-D presets work")

    def default_class_names(self) -> list[str]:
        self._check_preset()
        if self.cfg.preset not in PRESET_CLASSES:
            raise DatasetError(
                f"dataset=medmnist: preset={self.cfg.preset!r} has no built-in class names (known: "
                f"{sorted(PRESET_CLASSES)}); set dataset.class_names to its classes in label order"
            )
        return list(PRESET_CLASSES[self.cfg.preset])

    def npz_path(self) -> Path:
        if self.cfg.npz:
            path = Path(self.cfg.npz).expanduser()
        elif self.cfg.root:
            path = self.root / f"{self.cfg.preset}.npz"
        else:
            raise DatasetError(f"dataset=medmnist needs dataset.root or dataset.npz. {_WHERE}")
        if not path.is_file():
            raise DatasetError(f"dataset=medmnist: {path} not found. {_WHERE}")
        return path

    def read_splits(self) -> dict[str, ImageSet]:
        self._check_preset()
        path = self.npz_path()
        known = PRESET_CLASSES.get(self.cfg.preset)
        if known is not None and len(self.class_names) != len(known):
            raise DatasetError(
                f"dataset=medmnist: dataset.class_names has {len(self.class_names)} names but preset="
                f"{self.cfg.preset} has {len(known)} classes"
            )
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = [k for k in KEYS if k not in npz.files]
                if missing:
                    raise DatasetError(
                        f"dataset=medmnist: {path} lacks the arrays {missing}; a MedMNIST npz holds "
                        f"{list(KEYS)}"
                    )
                arrays = {k: npz[k] for k in KEYS}
        except DatasetError:
            raise
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise DatasetError(
                f"dataset=medmnist: cannot read {path} ({e}); download it again. {_WHERE}"
            ) from e
        out = {}
        for split in SPLITS:
            images = _rgb_view(arrays[f"{split}_images"], path, f"{split}_images")
            labels = _labels(arrays[f"{split}_labels"], path, f"{split}_labels")
            if len(images) != len(labels):
                raise DatasetError(
                    f"dataset=medmnist: {path} has {len(images)} {split}_images but {len(labels)} "
                    f"{split}_labels"
                )
            out[split] = ImageSet(labels=labels, images=images)
        return out
