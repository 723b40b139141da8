"""Any labelled image collection laid out as one folder per class.

``<root>/<class>/**/*.<ext>`` is split with ``split_seed``, stratified by class; ``<root>/{train,val,test}/
<class>/...`` is used as official splits (a missing val or test is drawn from train). Class names are the
sorted folder names, or ``dataset.class_names`` (same set, its order fixes the label indices).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from patholite.data.base import SPLITS, HistologyDataModule, ImageSet
from patholite.data.images import require_path
from patholite.data.splits import check_fractions, grouped_split
from patholite.errors import DatasetError

_HINT = "Lay the data out as <root>/<class>/<image> or <root>/{train,val,test}/<class>/<image>"


def _subdirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


class ImageFolderDataModule(HistologyDataModule):
    """One folder per class; official split folders when present."""

    def _root(self) -> Path:
        return require_path(self.root, "dataset=image_folder", _HINT, directory=True)

    def split_dirs(self) -> dict[str, Path]:
        """The official split folders present under root (empty: one pool of class folders)."""
        root = self._root()
        found = {s: root / s for s in SPLITS if (root / s).is_dir()}
        if not found:
            return {}
        if "train" not in found:
            raise DatasetError(
                f"dataset=image_folder: {root} has {sorted(found)} but no train/ folder. {_HINT}"
            )
        others = [d for d in _subdirs(root) if d not in SPLITS]
        if others:
            raise DatasetError(
                f"dataset=image_folder: {root} mixes split folders {sorted(found)} with other folders "
                f"{others}; "
                f"keep only train/, val/, test/ there. {_HINT}"
            )
        return found

    def _folder_classes(self) -> list[str]:
        """Sorted class folder names, the same in every split folder."""
        dirs = self.split_dirs() or {"all": self._root()}
        per_split = {s: _subdirs(d) for s, d in dirs.items()}
        classes = next(iter(per_split.values()))
        for s, names in per_split.items():
            if names != classes:
                raise DatasetError(
                    f"dataset=image_folder: the split folders under {self._root()} hold different classes: "
                    + "; ".join(f"{k}/: {v}" for k, v in per_split.items())
                    + ". Every split needs the same class folders"
                )
            if s in ("train", "all") and len(names) < 2:
                raise DatasetError(
                    f"dataset=image_folder: {dirs[s]} holds class folders {names}; a classifier needs at "
                    f"least two. {_HINT}"
                )
        return classes

    def default_class_names(self) -> list[str]:
        return self._folder_classes()

    def _images(self, class_dir: Path) -> list[str]:
        exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in self.cfg.extensions}
        files = []
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [
                os.path.join(dirpath, f)
                for f in sorted(filenames)
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts
            ]
        if not files:
            raise DatasetError(
                f"dataset=image_folder: {class_dir} holds no images with extensions {sorted(exts)}; "
                "add images "
                "or set dataset.extensions"
            )
        return files

    def _read(self, folder: Path) -> ImageSet:
        index = {c: i for i, c in enumerate(self.class_names)}
        paths, labels = [], []
        for c in sorted(index):
            files = self._images(folder / c)
            paths += files
            labels += [index[c]] * len(files)
        return ImageSet(labels=np.array(labels), paths=paths, groups=list(paths))

    def read_splits(self) -> dict[str, ImageSet]:
        folders = self._folder_classes()
        if sorted(self.class_names) != folders:
            raise DatasetError(
                f"dataset=image_folder: dataset.class_names={self.class_names} must name the class folders "
                f"{folders} of {self._root()} (any order), or be left empty"
            )
        dirs = self.split_dirs()
        pool = self._read(dirs.get("train", self._root()))
        official = {s: self._read(dirs[s]) for s in ("val", "test") if s in dirs}
        val_f = 0.0 if "val" in official else self.cfg.val_fraction
        test_f = 0.0 if "test" in official else self.cfg.test_fraction
        check_fractions(val_f, test_f, "dataset=image_folder", "val" not in official, "test" not in official)
        split = grouped_split(pool.labels, None, val_f, test_f, self.cfg.split_seed)
        return {s: official[s] if s in official else pool.subset(split[s]) for s in SPLITS}
