"""ISIC 2018 Task 3 (HAM10000 dermoscopy), 7 classes, split by lesion.

Layout under ``root`` as the ISIC archive unzips::

    ISIC2018_Task3_Training_Input/*.jpg
    ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv   (image,MEL,...,VASC one-hot)
    ISIC2018_Task3_Training_LesionGroupings.csv                                   (image,lesion_id,...)
    ISIC2018_Task3_{Validation,Test}_Input/ + ..._GroundTruth/...csv              (optional, official splits)

HAM10000 holds several photos of one lesion; a lesion's photos must share a split, or the test set measures
recall of lesions already seen in training.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from patholite.data.base import HistologyDataModule, ImageSet
from patholite.data.images import require_path, shown
from patholite.data.splits import check_fractions, grouped_split
from patholite.errors import DatasetError

log = logging.getLogger(__name__)

ISIC_CLASSES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
PREFIX = "ISIC2018_Task3"
LESION_GROUPS = f"{PREFIX}_Training_LesionGroupings.csv"
_WHERE = (
    "Download the ISIC 2018 Task 3 training input and ground truth (and optionally the lesion groupings, "
    "validation and test sets) from https://challenge.isic-archive.com/data/#2018 and unzip them into "
    "dataset.root"
)


def read_ground_truth(csv_path: Path) -> tuple[list[str], np.ndarray]:
    """Image ids and class indices of an ISIC 2018 Task 3 ground-truth CSV, checked to be one-hot."""
    expected = ["image", *ISIC_CLASSES]
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    header = [h.strip() for h in rows[0]] if rows else []
    if header != expected:
        raise DatasetError(
            f"dataset=isic2018: {csv_path} has header {header}; expected exactly {','.join(expected)} "
            "(the ISIC 2018 Task 3 ground-truth format)"
        )
    names, labels = [], []
    for line_no, row in enumerate(rows[1:], start=2):
        if not any(v.strip() for v in row):
            continue
        try:
            values = [float(v) for v in row[1:]]
        except ValueError:
            values = []
        zeros = values.count(0.0)
        one_hot = len(values) == len(ISIC_CLASSES) and values.count(1.0) == 1 and zeros == len(values) - 1
        if len(row) != len(expected) or not one_hot:
            raise DatasetError(
                f"dataset=isic2018: {csv_path} line {line_no} is {row}; expected an image id and a one-hot "
                f"row of {len(ISIC_CLASSES)} values (exactly one 1.0, the rest 0.0)"
            )
        names.append(row[0].strip())
        labels.append(values.index(1.0))
    if not names:
        raise DatasetError(f"dataset=isic2018: {csv_path} lists no images. {_WHERE}")
    return names, np.array(labels, dtype=np.int64)


def _image_paths(input_dir: Path, names: list[str], csv_path: Path) -> list[str]:
    """``<input_dir>/<name>.jpg`` for every name, after checking they all exist."""
    present = {p.name for p in input_dir.iterdir()}
    missing = [n for n in names if f"{n}.jpg" not in present]
    if missing:
        raise DatasetError(
            f"dataset=isic2018: {csv_path} lists images missing from {input_dir}: {shown(missing)}. "
            "Unzip the complete input archive there"
        )
    return [str(input_dir / f"{n}.jpg") for n in names]


class Isic2018DataModule(HistologyDataModule):
    """ISIC 2018 Task 3; official validation/test splits when present, else seeded splits by lesion."""

    def default_class_names(self) -> list[str]:
        return list(ISIC_CLASSES)

    def _official(self, part: str, required: bool) -> tuple[list[str], np.ndarray, Path] | None:
        """(image paths, labels, csv) of one part ("Training", "Validation", "Test"); None if absent."""
        input_dir = self.root / f"{PREFIX}_{part}_Input"
        csv_path = self.root / f"{PREFIX}_{part}_GroundTruth" / f"{PREFIX}_{part}_GroundTruth.csv"
        if not required and not input_dir.exists() and not csv_path.exists():
            return None
        # A part half there is a broken download, not a reason to fall back to a seeded split.
        require_path(input_dir, f"dataset=isic2018 ({part.lower()} images)", _WHERE, directory=True)
        require_path(csv_path, f"dataset=isic2018 ({part.lower()} ground truth)", _WHERE)
        names, labels = read_ground_truth(csv_path)
        return _image_paths(input_dir, names, csv_path), labels, csv_path

    def _lesion_groups_csv(self) -> Path | None:
        if self.cfg.lesion_groups_csv:
            return require_path(
                self.cfg.lesion_groups_csv, "dataset.lesion_groups_csv", f"It is {LESION_GROUPS}. {_WHERE}"
            )
        for candidate in (
            self.root / LESION_GROUPS,
            self.root / f"{PREFIX}_Training_GroundTruth" / LESION_GROUPS,
            self.root / f"{PREFIX}_Training_LesionGroupings" / LESION_GROUPS,
        ):
            if candidate.is_file():
                return candidate
        return None

    def _lesion_groups(self, paths: list[str]) -> list[str]:
        """The lesion id of every training image (each image its own lesion without the groupings file)."""
        names = [Path(p).stem for p in paths]
        csv_path = self._lesion_groups_csv()
        if csv_path is None:
            log.warning(
                "dataset=isic2018: %s not found under %s; splitting by image, so photos of one lesion may "
                "fall in different splits and inflate val/test scores. Put the file there or set "
                "dataset.lesion_groups_csv",
                LESION_GROUPS,
                self.root,
            )
            return names
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            if "image" not in header or "lesion_id" not in header:
                raise DatasetError(
                    f"dataset=isic2018: {csv_path} has header {header}; expected the columns "
                    "image,lesion_id,diagnosis_confirm_type of the ISIC 2018 lesion groupings"
                )
            lesion = {row["image"].strip(): row["lesion_id"].strip() for row in reader}
        missing = [n for n in names if not lesion.get(n)]
        if missing:
            raise DatasetError(
                f"dataset=isic2018: {csv_path} gives no lesion_id for training images {shown(missing)}; "
                f"is it the {LESION_GROUPS} of this training set?"
            )
        return [lesion[n] for n in names]

    def read_splits(self) -> dict[str, ImageSet]:
        require_path(self.root, "dataset=isic2018", _WHERE, directory=True)
        if self.class_names != ISIC_CLASSES:
            raise DatasetError(
                f"dataset=isic2018: dataset.class_names={self.class_names} must be the ground-truth columns "
                f"{ISIC_CLASSES} in that order (or be left empty)"
            )
        paths, labels, _ = self._official("Training", required=True)
        groups = self._lesion_groups(paths)
        official = {"val": self._official("Validation", False), "test": self._official("Test", False)}
        # Seeded splits of the training set only for the parts that have no official set.
        val_f = 0.0 if official["val"] else self.cfg.val_fraction
        test_f = 0.0 if official["test"] else self.cfg.test_fraction
        check_fractions(
            val_f, test_f, "dataset=isic2018", need_val=not official["val"], need_test=not official["test"]
        )
        split = grouped_split(labels, groups, val_f, test_f, self.cfg.split_seed)
        out = {}
        for name, idx in split.items():
            if name != "train" and official[name] is not None:
                p, y, _ = official[name]
                out[name] = ImageSet(labels=y, paths=p, groups=[Path(x).stem for x in p])
            else:
                out[name] = ImageSet(
                    labels=labels[idx], paths=[paths[i] for i in idx], groups=[groups[i] for i in idx]
                )
        return out
