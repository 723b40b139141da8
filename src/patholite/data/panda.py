"""PANDA (Prostate cANcer graDe Assessment) biopsies: slide-level ISUP grades, split by slide.

The Kaggle layout: ``train_images/<image_id>.tiff`` (multi-level TIFFs), ``train_label_masks/
<image_id>_mask.tiff`` (per-pixel labels whose meaning depends on the data provider; absent for a few slides)
and ``train.csv`` with the columns image_id, data_provider, isup_grade, gleason_score. Labels are binary
(ISUP 0 Benign vs ISUP 1-5 Cancer) or the six ISUP grades (``dataset.slide_labels``); there is no public test
set, so val and test are drawn by slide, seeded and stratified by class. A slide-level family: no tiles.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from patholite.data.base import ImageSet
from patholite.data.images import require_path, shown
from patholite.data.slides import SlideDataModule, SlideEntry
from patholite.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

COLUMNS = ("image_id", "data_provider", "isup_grade", "gleason_score")
BINARY = ["Benign", "Cancer"]
GRADES = [f"ISUP{g}" for g in range(6)]
_LAYOUT = (
    "Expected the PANDA layout: train_images/<image_id>.tiff, train_label_masks/<image_id>_mask.tiff and "
    f"train.csv with the columns {', '.join(COLUMNS)}. Get it from "
    "https://www.kaggle.com/c/prostate-cancer-grade-assessment/data and set dataset.root to the folder "
    "holding them"
)


class PandaDataModule(SlideDataModule):
    """PANDA biopsies with slide-level labels: binary (Benign/Cancer) or ISUP grades 0-5."""

    slide_level_labels = True  # its entries' labels are already the slide-level classes

    def __init__(self, cfg, pin_memory: bool = False) -> None:
        super().__init__(cfg, pin_memory=pin_memory)
        self.rows: dict[str, dict] = {}  # image_id -> its train.csv row, with the mask path (or None)

    def default_class_names(self) -> list[str]:
        mode = self.cfg.slide_labels
        if mode not in ("binary", "classes"):
            raise ConfigError(
                f"dataset.slide_labels={mode!r} must be binary (ISUP 0 vs 1-5) or classes (ISUP grades 0-5)"
            )
        return list(BINARY if mode == "binary" else GRADES)

    def _label(self, grade: int) -> str:
        return GRADES[grade] if self.cfg.slide_labels == "classes" else BINARY[int(grade > 0)]

    def list_slides(self) -> list[SlideEntry]:
        root = require_path(self.root, "dataset=panda", _LAYOUT, directory=True)
        images = require_path(root / "train_images", "dataset=panda", _LAYOUT, directory=True)
        table = require_path(root / "train.csv", "dataset=panda", _LAYOUT)
        masks = root / "train_label_masks"
        entries, missing = [], []
        for line_no, row in _read_rows(table):
            image = images / f"{row['image_id']}.tiff"
            if not image.is_file():
                missing.append(row["image_id"])
                continue
            grade = _grade(row, table, line_no)
            if row["image_id"] in self.rows:
                raise DatasetError(
                    f"dataset=panda: {table} line {line_no} repeats image_id={row['image_id']}"
                )
            mask = masks / f"{row['image_id']}_mask.tiff"
            self.rows[row["image_id"]] = {
                **row,
                "isup_grade": grade,
                "mask": mask if mask.is_file() else None,
            }
            entries.append(SlideEntry(image, None, self._label(grade), tileable=False))
        if missing:
            raise DatasetError(
                f"dataset=panda: {table} lists {len(missing)} image(s) missing from {images}: "
                f"{shown(missing)}. Download them, or keep only the rows of the images you have "
                "(a subset is fine)"
            )
        if not entries:
            raise DatasetError(f"dataset=panda: {table} lists no slides. {_LAYOUT}")
        without = sum(r["mask"] is None for r in self.rows.values())
        if without:
            log.info("dataset=panda: %d of %d slides have no label mask in %s", without, len(entries), masks)
        return entries

    def mask_path(self, slide: str | Path) -> Path | None:
        """The slide's label mask (train_label_masks/<image_id>_mask.tiff), or None where PANDA has none."""
        self.slide_entries()
        return self.rows[Path(slide).stem]["mask"]

    def read_splits(self) -> dict[str, ImageSet]:
        raise DatasetError(
            "dataset=panda has slide-level labels only (ISUP grades), no tile labels: train a slide-level "
            "model on it (model=smt)"
        )


def _read_rows(table: Path) -> list[tuple[int, dict]]:
    """``(line number, row)`` of train.csv, after checking its columns."""
    try:
        with open(table, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            absent = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if absent:
                raise DatasetError(
                    f"dataset=panda: {table} lacks the column(s) {absent} (found {reader.fieldnames}); "
                    f"train.csv needs a header row with {list(COLUMNS)}"
                )
            return [(reader.line_num, {c: (row[c] or "").strip() for c in COLUMNS}) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"dataset=panda: cannot read {table} ({err}). {_LAYOUT}") from err


def _grade(row: dict, table: Path, line_no: int) -> int:
    try:
        grade = int(row["isup_grade"])
    except ValueError:
        grade = -1
    if not row["image_id"] or not 0 <= grade <= 5:
        raise DatasetError(
            f"dataset=panda: {table} line {line_no} has image_id={row['image_id']!r}, "
            f"isup_grade={row['isup_grade']!r}; expected an image id and an ISUP grade 0-5"
        )
    return grade
