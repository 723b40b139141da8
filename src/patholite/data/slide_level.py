"""Slide-level datasets for focused models (SMT, R3): one item per slide, its tissue thumbnail and label.

Built on a slide family's listing (``dataset.name``: synthetic_slides, smt_synthetic, camelyon16, bach_wsi,
panda): the family datamodule lists the slides, their slide-level classes and the split by slide; this module
maps the classes to slide labels (``dataset.slide_labels``: binary, the family's Normal vs the rest, or the
family's classes), renders each slide's thumbnail once (``slides.focus.cached_thumbnail``, cached under
``dataset.cache_dir``) and hands out readers of focused regions (``region_reader``). Items are dicts:
``image`` (uint8 3xSxS), ``label``, ``slide`` (index into ``slide_paths``) and ``box`` (level-0 x, y, side
of the thumbnail). Images are not augmented or normalised here: a focused model maps patches of the
thumbnail back to the slide, and normalises (``normalize``) what it reads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import open_dict
from torch.utils.data import Dataset

from patholite.data.base import SPLITS, HistologyDataModule, ImageSet, stratified_subsample
from patholite.data.families import build_datamodule
from patholite.data.slides import NORMAL, SlideEntry
from patholite.data.synthetic.slides import read_truth, sidecar_paths
from patholite.errors import ConfigError, DatasetError
from patholite.wsi.region import POLICIES, Box, RegionReader, cached_thumbnail, chain_check

log = logging.getLogger(__name__)

SLIDE_LABELS = ("binary", "classes")
POSITIVE = "Tumor"  # the positive class of binary slide labels (PANDA has its own: Benign / Cancer)


class SlideLevelDataset(Dataset):
    """Thumbnails (N, S, S, 3) uint8 held in memory, with labels, slide indices and boxes."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, slides: np.ndarray, boxes: np.ndarray) -> None:
        self.images, self.labels, self.slides, self.boxes = images, labels, slides, boxes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {
            "image": torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1),
            "label": int(self.labels[index]),
            "slide": int(self.slides[index]),
            "box": torch.tensor(self.boxes[index], dtype=torch.float32),
        }


class SlideLevelDataModule(HistologyDataModule):
    """One item per slide: the tissue thumbnail at ``image_size`` px and the slide label, split by slide.

    ``image_size`` and ``grid`` are the focused model's (``model.smt``); ``too_small`` (upsample | refuse)
    is what to do with a slide whose tissue box is too small for ``hops`` magnifications by ``grid``."""

    def __init__(
        self, cfg, pin_memory: bool = False, image_size: int | None = None, grid: int = 16,
        too_small: str = "upsample", hops: int = 2, tissue_px: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(cfg, pin_memory=pin_memory)
        self.image_size = int(image_size or cfg.image_size)
        self.grid, self.hops, self.too_small = int(grid), int(hops), too_small
        self.tissue_px = tissue_px  # the tissue box's detection size (slides.focus.smt_tissue_box)
        if self.grid < 1 or self.image_size % self.grid:
            raise ConfigError(
                f"model.smt.image_size={self.image_size} must be a multiple of model.smt.grid={self.grid} "
                "(each image is cut into grid x grid patches)"
            )
        if too_small not in POLICIES:
            raise ConfigError(f"model.smt.too_small={too_small!r} must be one of {list(POLICIES)}")
        if cfg.name == "synthetic_slides" and cfg.get("normal_share") is None:
            # the generator's 1-in-4 lesion-free chance leaves the default 2-slide val and test splits with
            # one class three times in five; slide labels need both in every split
            with open_dict(cfg):
                cfg.normal_share = 0.5
            log.info(
                "dataset=synthetic_slides for a slide-level model: dataset.normal_share=0.5 (half of each "
                "split lesion-free) so every split holds both classes; set it to choose"
            )
        self.family = build_datamodule(cfg)  # lists the slides and splits them; its own class names
        self.family._class_names = self.family.default_class_names()
        self.datasets: dict[str, SlideLevelDataset] = {}
        self._readers: dict[int, RegionReader] = {}
        self._thumbs: dict[int, tuple[np.ndarray, Box]] = {}
        self._shares: dict[int, float | None] = {}

    # -- classes
    def default_class_names(self) -> list[str]:
        family = self.family.default_class_names()
        if getattr(self.family, "slide_level_labels", False):  # PANDA: already slide-level classes
            return family
        mode = self.cfg.slide_labels
        if mode not in SLIDE_LABELS:
            raise ConfigError(f"dataset.slide_labels={mode!r} must be one of {list(SLIDE_LABELS)}")
        return family if mode == "classes" else [family[0], POSITIVE]

    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            default = self.default_class_names()
            names = list(self.cfg.class_names) or default
            if sorted(names) != sorted(default):
                raise DatasetError(
                    f"dataset={self.cfg.name}: dataset.class_names={names} must name the slide-level classes "
                    f"{default} (dataset.slide_labels={self.cfg.slide_labels}; the order sets label indices) "
                    "or be left empty"
                )
            self._class_names = names
        return self._class_names

    @property
    def negative_class(self) -> str:
        """The class of slides without disease; the other classes are positive."""
        return self.default_class_names()[0]

    def slide_label(self, entry: SlideEntry) -> int:
        """The label index of a family slide entry."""
        names = self.default_class_names()
        family_names = self.family.default_class_names()
        name = entry.label
        if names != family_names:  # binary: the family's first class is negative, the rest positive
            name = names[0] if entry.label == family_names[0] else names[1]
        return self.class_names.index(name)

    # -- slides
    def slide_entries(self) -> list[SlideEntry]:
        return self.family.slide_entries()

    @property
    def slide_paths(self) -> list[Path]:
        return [e.slide for e in self.slide_entries()]

    @property
    def slide_labels(self) -> np.ndarray:
        return np.array([self.slide_label(e) for e in self.slide_entries()], dtype=np.int64)

    def slide_table(self) -> list[dict]:
        """One row per slide: index, path, label (name), split."""
        rows = zip(self.slide_entries(), self.slide_labels, strict=True)
        return [
            {"slide": i, "path": str(e.slide), "label": self.class_names[y], "split": e.split}
            for i, (e, y) in enumerate(rows)
        ]

    def region_reader(self, slide: int) -> RegionReader:
        """The reader of slide ``slide``'s regions (one per slide, kept: its counts add up)."""
        if slide not in self._readers:
            r = self.cfg.reader
            self._readers[slide] = RegionReader(self.slide_paths[slide], mpp=r.mpp, backend=r.backend)
        return self._readers[slide]

    def thumbnail(self, slide: int) -> tuple[np.ndarray, Box]:
        """Slide ``slide``'s thumbnail (uint8 SxSx3) and the level-0 box it shows, from the cache."""
        if slide not in self._thumbs:
            path = self.slide_paths[slide]
            image, box = cached_thumbnail(
                path, self.cfg.cache_dir, self.image_size, self.cfg.tissue, self.cfg.reader, self.tissue_px
            )
            chain_check(box, self.image_size, self.grid, self.hops, self.too_small, source=f"slide {path}")
            self._thumbs[slide] = image, box
        return self._thumbs[slide]

    def lesion_share(self, slide: int) -> float | None:
        """Share of the slide's tissue that is lesion, from a synthetic slide's truth; None without one."""
        if slide not in self._shares:
            path, share = self.slide_paths[slide], None
            if sidecar_paths(path)[0].is_file():
                truth = read_truth(path)
                lesion = truth.tissue & (truth.labels != 255) & (truth.labels != truth.classes.index(NORMAL))
                share = float(lesion.sum() / max(int(truth.tissue.sum()), 1))
            self._shares[slide] = share
        return self._shares[slide]

    def tile_geometry(self) -> dict[str, float | int | None]:
        """No single tile geometry: a focused model reads regions at several magnifications."""
        return {"mpp": None, "tile_size": None}

    # -- splits
    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        entries, labels = self.slide_entries(), self.slide_labels
        where = f"dataset={self.cfg.name}"
        for split in SPLITS:
            index = np.array([i for i, e in enumerate(entries) if e.split == split], dtype=np.int64)
            if index.size == 0:
                raise DatasetError(f"{where}: the {split} split holds no slides (root: {self.cfg.root})")
            found = sorted({self.class_names[y] for y in labels[index]})
            if len(found) < 2:
                raise DatasetError(
                    f"{where}: the {split} split's {index.size} slides are all of one class ({found[0]}); "
                    f"slide-level training and AUROC need slides of at least two of {self.class_names}: "
                    "add slides, change dataset.split_seed (or the synthetic dataset.seed / normal_share), "
                    "or use dataset.slide_labels=binary"
                )
            if self.cfg.max_samples_per_split:
                index = index[
                    stratified_subsample(labels[index], self.cfg.max_samples_per_split, self.cfg.split_seed)
                ]
            thumbs = [self.thumbnail(int(i)) for i in index]
            images = np.stack([t for t, _ in thumbs])
            boxes = np.array([b.as_list() for _, b in thumbs], dtype=np.float64)
            self.datasets[split] = SlideLevelDataset(images, labels[index], index, boxes)
            self.splits[split] = ImageSet(
                labels[index], images=images, groups=[entries[i].group for i in index]
            )
        self._log_lesion_shares(labels)

    def _log_lesion_shares(self, labels: np.ndarray) -> None:
        shares = [self.lesion_share(i) for i in range(len(labels)) if labels[i] != 0]
        shares = [s for s in shares if s is not None]
        if shares:
            log.info("dataset=%s: lesions cover %.2f-%.2f%% of the tissue of its %d lesion slides",
                     self.cfg.name, 100 * min(shares), 100 * max(shares), len(shares))  # fmt: skip

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 Bx3xHxW (or 3xHxW) images as float, scaled to [0, 1] and normalised (dataset mean, std)."""
        mean = torch.tensor(list(self.cfg.mean), dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(list(self.cfg.std), dtype=torch.float32).view(3, 1, 1)
        return (images.float() / 255.0 - mean.to(images.device)) / std.to(images.device)

    def labelled_batches(
        self, count: int, split: str = "val", seed: int = 0
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Up to ``count`` normalised thumbnails of ``split`` with their labels, a seeded stratified subset,
        in batches: what calibration and sensitivity passes of layer 1 read."""
        data = self.datasets[split]
        index = np.arange(len(data))
        if count < len(data):
            index = stratified_subsample(data.labels, count, seed)[:count]
        batch = self.cfg.eval_batch_size or self.cfg.batch_size
        out = []
        for start in range(0, len(index), batch):
            items = [data[int(i)] for i in index[start : start + batch]]
            images = self.normalize(torch.stack([it["image"] for it in items]))
            out.append((images, torch.tensor([it["label"] for it in items], dtype=torch.int64)))
        return out
