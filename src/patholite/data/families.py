"""The dataset families by ``dataset.name``: one LightningDataModule class each."""

from __future__ import annotations

from patholite.data.bach import BachDataModule, BachWsiDataModule
from patholite.data.base import HistologyDataModule
from patholite.data.camelyon16 import Camelyon16DataModule
from patholite.data.cifar import CifarDataModule
from patholite.data.image_folder import ImageFolderDataModule
from patholite.data.isic import Isic2018DataModule
from patholite.data.medmnist import MedmnistDataModule
from patholite.data.panda import PandaDataModule
from patholite.data.slides import SyntheticSlidesDataModule
from patholite.data.synthetic.tiles import SyntheticDataModule
from patholite.errors import ConfigError

FAMILIES: dict[str, type[HistologyDataModule]] = {
    "synthetic": SyntheticDataModule,
    "bach": BachDataModule,
    "isic2018": Isic2018DataModule,
    "medmnist": MedmnistDataModule,
    "cifar": CifarDataModule,
    "image_folder": ImageFolderDataModule,
    "synthetic_slides": SyntheticSlidesDataModule,
    "camelyon16": Camelyon16DataModule,
    "bach_wsi": BachWsiDataModule,
    "smt_synthetic": SyntheticSlidesDataModule,
    "panda": PandaDataModule,
}


def build_datamodule(cfg, pin_memory: bool = False) -> HistologyDataModule:
    """The datamodule of the family ``cfg.name`` names (``cfg``: the ``dataset`` node)."""
    if cfg.name not in FAMILIES:
        raise ConfigError(f"dataset.name={cfg.name!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[cfg.name](cfg, pin_memory=pin_memory)
