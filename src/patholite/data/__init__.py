"""Dataset families as LightningDataModules; ``build_datamodule`` picks one by ``dataset.name``."""

from __future__ import annotations

from patholite.data.base import HistologyDataModule, ImageSet
from patholite.data.families import FAMILIES, build_family
from patholite.data.slide_level import SlideLevelDataModule


def build_datamodule(cfg, pin_memory: bool = False, model=None) -> HistologyDataModule:
    """The datamodule for ``cfg`` (the ``dataset`` node); with an SMT ``model`` node, the slide-level one over
    the same family (one thumbnail and label per slide)."""
    if model is not None and model.get("family") == "smt":
        s = model.smt
        return SlideLevelDataModule(
            cfg, pin_memory=pin_memory, image_size=s.image_size, grid=s.grid, too_small=s.too_small,
            hops=s.layers - 1, tissue_px=s.get("tissue_px"),
        )  # fmt: skip
    return build_family(cfg, pin_memory=pin_memory)


__all__ = ["FAMILIES", "HistologyDataModule", "ImageSet", "build_datamodule"]
