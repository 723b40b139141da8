"""conf/dataset/<real>.yaml compose onto their schemas and, pointed at a fixture, give working datamodules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from patholite.config.checks import check_config
from patholite.data import build_datamodule
from tests.fixtures_data import BUILDERS

DEFAULT_FOLDER = {
    "bach": "bach",
    "isic2018": "isic2018",
    "medmnist": "medmnist",
    "cifar": "cifar",
    "image_folder": "image_folder",
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_dataset_option_composes_and_loads(name, make_cfg, tmp_path):
    cfg = make_cfg(f"dataset={name}")
    assert cfg.dataset.name == name
    assert Path(cfg.dataset.root) == Path(cfg.paths.data_dir) / DEFAULT_FOLDER[name]
    check_config(cfg)

    root = BUILDERS[name](tmp_path / "data" / name)
    cfg = make_cfg(f"dataset={name}", f"dataset.root={root}", "dataset.max_samples_per_split=null")
    dm = build_datamodule(cfg.dataset)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32  # debug=fast sets image_size 32
    assert all(len(dm.splits[s]) for s in ("train", "val", "test"))
