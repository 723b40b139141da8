"""ICIAR 2018 BACH: the microscopy photos (part A, ``<root>/Photos/{Normal,Benign,InSitu,Invasive}/*.tif``)
and the whole slides (part B, ``A01.svs``..``A10.svs`` with ImageScope XML, ``BachWsiDataModule``).

Each photo is a 2048x1536 RGB TIFF of H&E-stained breast tissue at 0.42 um/px; the header-less
``Photos/microscopy_ground_truth.csv`` (``n001.tif,Normal``) is the label source when present and must agree
with the folders. BACH has no public test labels and no patient ids, so the splits are seeded by photo; in
"tile" mode every tile of a photo stays in its photo's split.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from patholite.data.base import Box, HistologyDataModule, ImageSet
from patholite.data.images import headerless_rows, require_path, shown
from patholite.data.slides import SlideDataModule, SlideEntry
from patholite.data.splits import check_fractions, grouped_split
from patholite.errors import DatasetError
from patholite.wsi.annotations import BACH_CLASS_MAP, find_annotation

BACH_CLASSES = ["Normal", "Benign", "InSitu", "Invasive"]
GROUND_TRUTH = "microscopy_ground_truth.csv"
_SUFFIXES = (".tif", ".tiff")
_WHERE = (
    "Download ICIAR2018_BACH_Challenge.zip (https://doi.org/10.5281/zenodo.3632035, or "
    "https://iciar2018-challenge.grand-challenge.org/) and set dataset.root to the unzipped "
    "ICIAR2018_BACH_Challenge folder, the one that holds Photos/"
)


PHOTO_MPP = 0.42  # microns per pixel of the BACH microscopy photos


class BachDataModule(HistologyDataModule):
    """BACH photos, whole (mode=resize) or tiled (mode=tile), split by photo with ``split_seed``."""

    def default_class_names(self) -> list[str]:
        return list(BACH_CLASSES)

    def tile_geometry(self) -> dict[str, float | int | None]:
        if self.cfg.mode != "tile":  # a whole photo squeezed to a square has no single pixel size
            return {"mpp": self.cfg.mpp, "tile_size": None}
        return {"mpp": self.cfg.mpp or PHOTO_MPP, "tile_size": self.cfg.tile_size}

    def _photos_dir(self) -> Path:
        root = require_path(self.root, "dataset=bach", _WHERE, directory=True)
        photos = root / "Photos"
        if not photos.is_dir():
            hint = _WHERE
            if any((root / c).is_dir() for c in BACH_CLASSES):
                hint = f"{root} looks like the Photos folder itself: set dataset.root={root.parent}"
            raise DatasetError(f"dataset=bach: expected the folder {photos}, not found. {hint}")
        return photos

    def _folder_labels(self, photos: Path) -> dict[str, str]:
        """file name -> class, from the class folders."""
        found: dict[str, str] = {}
        for c in BACH_CLASSES:
            folder = require_path(photos / c, "dataset=bach", _WHERE, directory=True)
            for f in sorted(folder.iterdir()):
                if f.suffix.lower() in _SUFFIXES and f.is_file():
                    if f.name in found:
                        raise DatasetError(
                            f"dataset=bach: {f.name} is in both {photos / found[f.name]} and {folder}; "
                            "each photo belongs to one class folder"
                        )
                    found[f.name] = c
        if not found:
            raise DatasetError(f"dataset=bach: no .tif photos under {photos}/<class>/. {_WHERE}")
        return found

    def _csv_labels(self, csv_path: Path) -> dict[str, str]:
        """file name -> class, from the header-less ground-truth CSV."""
        labels: dict[str, str] = {}
        for line_no, row in headerless_rows(csv_path):
            if len(row) != 2 or row[1] not in BACH_CLASSES:
                raise DatasetError(
                    f"dataset=bach: {csv_path} line {line_no} is {row}; expected '<file>.tif,<class>' "
                    f"with class one of {BACH_CLASSES} and no header"
                )
            labels[row[0]] = row[1]
        return labels

    def _labelled_photos(self) -> tuple[list[Path], np.ndarray]:
        """Every photo's path and class index, after checking the CSV against the folders."""
        photos = self._photos_dir()
        if sorted(self.class_names) != sorted(BACH_CLASSES):
            raise DatasetError(
                f"dataset=bach: dataset.class_names={self.class_names} must name the BACH classes "
                f"{BACH_CLASSES} (in any order: it sets the label indices) or be left empty"
            )
        folders = self._folder_labels(photos)
        csv_path = photos / GROUND_TRUTH
        if csv_path.is_file():
            listed = self._csv_labels(csv_path)
            missing = sorted(set(listed) - set(folders))
            if missing:
                raise DatasetError(
                    f"dataset=bach: {csv_path} lists photos missing from {photos}/<class>/: "
                    f"{shown(missing)}. "
                    "Restore them from the BACH archive"
                )
            unlisted = sorted(set(folders) - set(listed))
            wrong = sorted(n for n in listed if listed[n] != folders[n])
            if wrong or unlisted:
                detail = [f"{n}: CSV says {listed[n]}, folder {folders[n]}" for n in wrong] + [
                    f"{n} (in {folders[n]}/, not in the CSV)" for n in unlisted
                ]
                raise DatasetError(
                    f"dataset=bach: {csv_path} disagrees with the class folders of {photos}: "
                    f"{shown(detail)}. "
                    "Restore the original archive's layout"
                )
        names = sorted(folders)
        index = {c: i for i, c in enumerate(self.class_names)}
        labels = np.array([index[folders[n]] for n in names], dtype=np.int64)
        return [photos / folders[n] / n for n in names], labels

    def _tile_boxes(self, path: Path) -> list[Box]:
        size, stride = self.cfg.tile_size, self.cfg.tile_stride or self.cfg.tile_size
        try:
            with Image.open(path) as img:  # reads the header only
                width, height = img.size
        except Exception as e:  # any failure to read a header is a broken file
            raise DatasetError(
                f"dataset=bach: cannot open {path} ({e}); copy it again from the archive"
            ) from e
        if size > width or size > height:
            raise DatasetError(
                f"dataset=bach: dataset.tile_size={size} exceeds the photo {path} ({width}x{height}); "
                "use a smaller tile_size or mode=resize"
            )
        return [
            (x, y, size, size)
            for y in range(0, height - size + 1, stride)
            for x in range(0, width - size + 1, stride)
        ]

    def _check_mode(self) -> None:
        if self.cfg.mode not in ("resize", "tile"):
            raise DatasetError(f"dataset=bach: dataset.mode={self.cfg.mode!r} must be 'resize' or 'tile'")
        if self.cfg.mode == "tile" and (self.cfg.tile_size <= 0 or (self.cfg.tile_stride or 1) <= 0):
            raise DatasetError(
                f"dataset=bach: dataset.tile_size={self.cfg.tile_size} and dataset.tile_stride="
                f"{self.cfg.tile_stride} must be positive"
            )

    def read_splits(self) -> dict[str, ImageSet]:
        self._check_mode()
        check_fractions(self.cfg.val_fraction, self.cfg.test_fraction, "dataset=bach", True, True)
        paths, labels = self._labelled_photos()
        groups = [p.stem for p in paths]  # no patient ids in BACH: the photo is the unit
        split = grouped_split(
            labels, groups, self.cfg.val_fraction, self.cfg.test_fraction, self.cfg.split_seed
        )
        out = {}
        for name, idx in split.items():
            if self.cfg.mode == "resize":
                out[name] = ImageSet(
                    labels=labels[idx], paths=[str(paths[i]) for i in idx], groups=[groups[i] for i in idx]
                )
                continue
            items = [(i, box) for i in idx for box in self._tile_boxes(paths[i])]
            out[name] = ImageSet(
                labels=np.array([labels[i] for i, _ in items], dtype=np.int64),
                paths=[str(paths[i]) for i, _ in items],
                boxes=[box for _, box in items],
                groups=[groups[i] for i, _ in items],
            )
        return out


# ------------------------------------------------------------------------------- BACH part B: slides
_BACH_WSI_LAYOUT = (
    "Expected BACH part B: A01.svs..A10.svs with their Aperio ImageScope annotations A01.xml..A10.xml (or "
    "QuPath GeoJSON A01.geojson..) in one "
    "folder (the WSI folder of ICIAR2018_BACH_Challenge.zip, https://doi.org/10.5281/zenodo.3632035); set "
    "dataset.root to it"
)


class BachWsiDataModule(SlideDataModule):
    """BACH whole slides: tiles of the four BACH classes from ImageScope regions, split by slide."""

    def default_class_names(self) -> list[str]:
        return list(BACH_CLASSES)

    def class_map(self) -> dict[str, str]:
        return dict(BACH_CLASS_MAP)

    def list_slides(self) -> list[SlideEntry]:
        root = require_path(self.root, "dataset=bach_wsi", _BACH_WSI_LAYOUT, directory=True)
        slides = sorted(
            p for p in root.iterdir() if p.suffix.lower() == ".svs" and re.fullmatch(r"A\d+", p.stem)
        )
        if not slides:
            hint = f"set dataset.root={root / 'WSI'}" if (root / "WSI").is_dir() else _BACH_WSI_LAYOUT
            raise DatasetError(f"dataset=bach_wsi: no A<NN>.svs slides in {root}. {hint}")
        entries = []
        for p in slides:
            # ImageScope XML as published, or the regions redrawn in QuPath (GeoJSON)
            xml = find_annotation(root, p.stem) or require_path(
                p.with_suffix(".xml"), "dataset=bach_wsi", _BACH_WSI_LAYOUT
            )
            entries.append(SlideEntry(p, xml, self.most_severe(xml)))
        return entries
