"""What every dataset family shares: splits of labelled images and one LightningDataModule over them.

A family implements two things: ``default_class_names()`` (cheap: read before any training, for the config
checks) and ``read_splits()`` (the train/val/test ``ImageSet`` s). Images reach the transforms as HxWx3 uint8
RGB arrays, however they are stored.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from patholite.accelerators.cluster import launched
from patholite.data.images import probe_image, read_rgb
from patholite.data.stain_norm import REFERENCE_TILES, fit_stain_norm
from patholite.data.transforms import build_transform
from patholite.errors import ConfigError, DatasetError
from patholite.wsi.reader import read_slide_tile

SPLITS = ("train", "val", "test")

# A crop box in pixels of the stored image: (x, y, width, height).
Box = tuple[int, int, int, int]


@dataclass
class ImageSet:
    """One split: integer labels plus images held in memory (N,H,W,3 uint8) or as files to read lazily.

    ``groups`` names what must not straddle splits (slide, lesion, patient); ``boxes`` crops a file into a
    tile, so one photo can give several items. With ``slide_read`` (``patch_size``, reader ``mpp`` override,
    ``backend``) the paths are whole slides and each box is a level-0 square ``(x, y, size0, size0)`` read
    and resampled to ``patch_size`` pixels (``patholite.wsi.reader.read_slide_tile``).
    """

    labels: np.ndarray
    images: np.ndarray | None = None
    paths: list[str] | None = None
    boxes: list[Box | None] | None = None
    groups: list[str] | None = None
    slide_read: dict | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if (self.images is None) == (self.paths is None):
            raise ValueError("an ImageSet holds either images or paths")
        n = len(self.images) if self.images is not None else len(self.paths)
        if n != len(self.labels):
            raise ValueError(f"ImageSet has {n} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> np.ndarray:
        """The item's image as HxWx3 uint8 RGB."""
        if self.images is not None:
            return self.images[index]
        path = self.paths[index]
        box = self.boxes[index] if self.boxes is not None else None
        if self.slide_read is not None:
            return read_slide_tile(path, box, **self.slide_read)
        image = read_rgb(path)
        if box is not None:
            x, y, w, h = box
            image = image[y : y + h, x : x + w]
        return image

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSet:
        idx = np.asarray(indices, dtype=np.int64)

        def pick(seq):
            return None if seq is None else [seq[i] for i in idx]

        return ImageSet(
            labels=self.labels[idx],
            images=None if self.images is None else self.images[idx],
            paths=pick(self.paths),
            boxes=pick(self.boxes),
            groups=pick(self.groups),
            slide_read=self.slide_read,
        )


class ImageSetDataset(Dataset):
    def __init__(self, images: ImageSet, transform: Callable[[np.ndarray], torch.Tensor]) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images.load(index)), int(self.images.labels[index])


def stratified_subsample(labels: np.ndarray, max_samples: int, seed: int) -> np.ndarray:
    """Sorted indices of ``max(max_samples, n_classes)`` items in class proportions; no class is lost."""
    if len(labels) <= max_samples:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.maximum(1, np.floor(max_samples * counts / len(labels))).astype(int)
    # hand the rounding remainder to the classes with the largest shares that still have items left
    for c in np.argsort(-counts):
        if quota.sum() >= max_samples:
            break
        quota[c] += min(counts[c] - quota[c], max_samples - quota.sum())
    picked = [
        rng.choice(np.flatnonzero(labels == c), size=q, replace=False)
        for c, q in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(picked))


_FITTING = False  # a launched job's fit is running in this process (``fitting``)


@contextlib.contextmanager
def fitting() -> Iterator[None]:
    """Around a fit of a launched job's ranks: their loaders take this rank's share while it runs."""
    global _FITTING
    _FITTING = True
    try:
        yield
    finally:
        _FITTING = False


def ddp_world_size() -> int:
    """Processes training together in this process's DDP group (1 outside DDP, e.g. in the driver).

    A spawned rank's process group exists only for its fit. A launched job's (srun, torchrun) lasts as long
    as the job, and its rank 0 evaluates whole sets between fits: there only a fit (``fitting``) shards."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    if not _FITTING and launched() is not None:
        return 1
    return dist.get_world_size()


def rank_loader(dataset: Dataset, global_batch: int, shuffle: bool, **kwargs) -> DataLoader:
    """A DataLoader of this process's share: outside DDP all of ``dataset`` in batches of ``global_batch``;
    under DDP every ``world``-th sample (DistributedSampler) in batches of ``global_batch / world``.

    The sampler is ours, not Lightning's (the trainer sets ``use_distributed_sampler=False`` under DDP):
    Lightning's would shuffle every training loader, so ``dataset.shuffle=false`` would not hold."""
    world = ddp_world_size()
    if world == 1:
        return DataLoader(dataset, batch_size=global_batch, shuffle=shuffle, drop_last=False, **kwargs)

    # set_epoch is called by Lightning's fit loop, so each epoch gets its own order; the run's seed (which
    # seed_everything exports to the spawned ranks) makes seed sweeps differ in data order too
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    sampler = DistributedSampler(dataset, shuffle=shuffle, drop_last=False, seed=seed)
    return DataLoader(dataset, batch_size=global_batch // world, sampler=sampler, drop_last=False, **kwargs)


def check_global_batch(cfg, world_size: int) -> None:
    """Under DDP ``dataset.batch_size`` (and ``eval_batch_size``) is the global batch, split evenly."""
    for key in ("batch_size", "eval_batch_size"):
        batch = cfg.get(key)
        if batch is not None and world_size > 1 and batch % world_size:
            lower, upper = batch - batch % world_size, batch + world_size - batch % world_size
            raise ConfigError(
                f"dataset.{key}={batch} is the global batch of {world_size} DDP processes and must divide "
                f"evenly among them; use dataset.{key}={lower or upper} or {upper}"
            )


class HistologyDataModule(L.LightningDataModule):
    """Base datamodule: seeded splits, histology augmentation, loaders. Subclasses read the data."""

    def __init__(self, cfg, pin_memory: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.pin_memory = pin_memory
        self.splits: dict[str, ImageSet] = {}
        self._class_names: list[str] | None = None

    # -- what a family implements
    def default_class_names(self) -> list[str]:
        raise NotImplementedError

    def read_splits(self) -> dict[str, ImageSet]:
        raise NotImplementedError

    # -- shared
    @property
    def root(self) -> Path:
        if not self.cfg.root:
            raise DatasetError(f"dataset={self.cfg.name} needs dataset.root=<folder of the data>")
        return Path(self.cfg.root).expanduser()

    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            self._class_names = list(self.cfg.class_names) or self.default_class_names()
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def tile_geometry(self) -> dict[str, float | int | None]:
        """The resolution of the images as read (before the resize to ``image_size``): ``mpp`` and the
        side ``tile_size`` in pixels. Artifacts carry it so the slide engine cuts tiles the model knows."""
        return {"mpp": self.cfg.mpp, "tile_size": None}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return

        splits = self.read_splits()
        for split in SPLITS:
            images = splits.get(split)
            if images is None or len(images) == 0:
                raise DatasetError(
                    f"dataset={self.cfg.name}: the {split} split is empty (root: {self.cfg.root}); "
                    "check the dataset layout in the README"
                )
            bad = (images.labels < 0) | (images.labels >= self.num_classes)
            if bad.any():
                raise DatasetError(
                    f"dataset={self.cfg.name}: {int(bad.sum())} {split} labels fall outside the "
                    f"{self.num_classes} classes {self.class_names}"
                )
            # slides were opened and tiled while the splits were read; only image files need a probe
            if images.paths is not None and images.slide_read is None and self.cfg.verify_images:
                self._probe(images.paths)
            if self.cfg.max_samples_per_split:
                keep = stratified_subsample(
                    images.labels, self.cfg.max_samples_per_split, self.cfg.split_seed
                )
                images = images.subset(keep)
            self.splits[split] = images
        self.stain_norm = self._fit_stain_norm()
        if (
            self.stain_norm is not None
        ):  # deterministic: tiles held in memory are normalised once, not per epoch
            self.splits = {split: self._normalised(images) for split, images in self.splits.items()}
        self.datasets = {
            split: ImageSetDataset(images, self._transform(images, train=split == "train"))
            for split, images in self.splits.items()
        }

    def _fit_stain_norm(self):
        """``dataset.stain_norm``'s normaliser, fitted on ``dataset.stain_reference`` or a seeded sample of
        the training tiles (None: no classical stain normalisation)."""
        method, reference = self.cfg.get("stain_norm"), self.cfg.get("stain_reference")
        if method is None and reference is None:
            return None
        train, sample = self.splits["train"], []
        if not reference:
            pick = stratified_subsample(train.labels, REFERENCE_TILES, self.cfg.split_seed)[:REFERENCE_TILES]
            sample = [train.load(int(i)) for i in pick]
        return fit_stain_norm(method, reference, sample)

    def _normalised(self, images: ImageSet) -> ImageSet:
        """``images`` with the stain normaliser applied to the tiles held in memory; files read lazily keep
        it in their transform (``_transform``)."""
        if images.images is None:
            return images
        normalised = np.stack([self.stain_norm(image) for image in images.images])
        return ImageSet(labels=images.labels, images=normalised, groups=images.groups)

    def _transform(self, images: ImageSet, train: bool):
        """The transform of ``images``; the stain normaliser is its first step for images read from files."""
        norm = getattr(self, "stain_norm", None) if images.images is None else None
        return build_transform(self.cfg, train=train, stain_norm=norm)

    @staticmethod
    def _probe(paths: list[str]) -> None:
        """Every file's header, once: unreadable or unconvertible images fail here, before any training."""
        for path in dict.fromkeys(paths):  # tiles of one photo share its file
            probe_image(path)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        batch = self.cfg.batch_size if split == "train" else (self.cfg.eval_batch_size or self.cfg.batch_size)
        return rank_loader(
            self.datasets[split],
            batch,
            shuffle,
            num_workers=self.cfg.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=bool(self.cfg.get("shuffle", True)))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def labelled_batches(
        self, count: int, split: str = "val", seed: int = 0
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Up to ``count`` images of ``split`` with the evaluation transform (no augmentation), a seeded
        stratified subset, in batches: what calibration, sensitivity passes and pruning scores read."""
        images = self.splits[split]
        if count < len(images):
            images = images.subset(stratified_subsample(images.labels, count, seed)[:count])
        loader = DataLoader(
            ImageSetDataset(images, self._transform(images, train=False)),
            batch_size=self.cfg.eval_batch_size or self.cfg.batch_size,
            shuffle=False,
            num_workers=self.cfg.num_workers,
        )
        return list(loader)

    def calibration_images(self, count: int, split: str = "train", seed: int = 0) -> list[torch.Tensor]:
        return [images for images, _ in self.labelled_batches(count, split, seed)]

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
