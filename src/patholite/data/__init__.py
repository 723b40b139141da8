"""Dataset families as LightningDataModules: ``build_datamodule`` picks one by ``dataset.name``; slide-level
models read one of the slide families through ``SlideLevelDataModule``."""

from __future__ import annotations

from patholite.data.base import HistologyDataModule, ImageSet
from patholite.data.families import FAMILIES, build_datamodule
from patholite.data.slide_level import SlideLevelDataModule

__all__ = ["FAMILIES", "HistologyDataModule", "ImageSet", "SlideLevelDataModule", "build_datamodule"]
