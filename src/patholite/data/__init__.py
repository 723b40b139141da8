"""Dataset families as LightningDataModules; ``build_datamodule`` picks one by ``dataset.name``."""

from __future__ import annotations

import importlib

from patholite.data.base import HistologyDataModule, ImageSet
from patholite.errors import ConfigError

# name -> "module:Class"; imported lazily so a family's dependencies load only when used
FAMILIES = {
    "synthetic": "patholite.data.synthetic:SyntheticDataModule",
    "bach": "patholite.data.bach:BachDataModule",
    "isic2018": "patholite.data.isic:Isic2018DataModule",
    "medmnist": "patholite.data.medmnist:MedmnistDataModule",
    "cifar": "patholite.data.cifar:CifarDataModule",
    "image_folder": "patholite.data.image_folder:ImageFolderDataModule",
    "synthetic_slides": "patholite.data.slides:SyntheticSlidesDataModule",
    "camelyon16": "patholite.data.camelyon16:Camelyon16DataModule",
    "bach_wsi": "patholite.data.bach:BachWsiDataModule",
    "smt_synthetic": "patholite.data.slides:SyntheticSlidesDataModule",
    "panda": "patholite.data.panda:PandaDataModule",
}


def build_datamodule(cfg, pin_memory: bool = False, model=None) -> HistologyDataModule:
    """The datamodule for ``cfg`` (the ``dataset`` node); with an SMT ``model`` node, the slide-level one over
    the same family (one thumbnail and label per slide)."""
    if model is not None and model.get("family") == "smt":
        from patholite.data.slide_level import SlideLevelDataModule

        s = model.smt
        return SlideLevelDataModule(
            cfg, pin_memory=pin_memory, image_size=s.image_size, grid=s.grid, too_small=s.too_small,
            hops=s.layers - 1, tissue_px=s.get("tissue_px"),
        )  # fmt: skip
    if cfg.name not in FAMILIES:
        raise ConfigError(f"dataset.name={cfg.name!r} is not one of {sorted(FAMILIES)}")
    module, cls = FAMILIES[cfg.name].split(":")
    return getattr(importlib.import_module(module), cls)(cfg, pin_memory=pin_memory)


__all__ = ["FAMILIES", "HistologyDataModule", "ImageSet", "build_datamodule"]
