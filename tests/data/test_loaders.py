"""Each real-format loader on its fixture: classes, split sizes, official splits, groups, seeds, batches."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from patholite.config.schema import BachConfig, CifarConfig, ImageFolderConfig, Isic2018Config, MedmnistConfig
from patholite.data import build_datamodule
from patholite.data.splits import check_no_leak
from tests.fixtures_data import (
    BACH_CLASSES,
    ISIC,
    ISIC_CLASSES,
    make_bach,
    make_cifar,
    make_image_folder,
    make_isic,
    make_medmnist,
)


def _dm(schema, **kw):
    dm = build_datamodule(OmegaConf.structured(schema(image_size=32, batch_size=4, **kw)))
    dm.setup()
    return dm


def _sizes(dm) -> dict[str, int]:
    return {s: len(v) for s, v in dm.splits.items()}


def _check_batch(dm, size: int = 32) -> None:
    for loader in (dm.train_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert x.dtype == torch.float32 and x.shape == (min(4, len(loader.dataset)), 3, size, size)
        assert y.dtype == torch.int64 and ((y >= 0) & (y < dm.num_classes)).all()


def _no_leak(dm) -> None:
    assert not check_no_leak({s: v.groups for s, v in dm.splits.items()})


def _every_class_everywhere(dm) -> None:
    for images in dm.splits.values():
        assert set(images.labels.tolist()) == set(range(dm.num_classes))


# ------------------------------------------------------------------------------------------------- BACH
def test_bach_resize(tmp_path):
    root = make_bach(tmp_path / "bach", per_class=4)
    dm = _dm(BachConfig, root=str(root))
    assert dm.class_names == BACH_CLASSES
    assert sum(_sizes(dm).values()) == 16 and min(_sizes(dm).values()) >= 4
    _every_class_everywhere(dm)
    _no_leak(dm)
    # labels follow the class folders
    for images in dm.splits.values():
        for path, y in zip(images.paths, images.labels, strict=True):
            assert Path(path).parent.name == BACH_CLASSES[y]
    _check_batch(dm)


def test_bach_tiles_stay_with_their_photo(tmp_path):
    root = make_bach(tmp_path / "bach", per_class=3, size=(64, 48))
    dm = _dm(BachConfig, root=str(root), mode="tile", tile_size=16, tile_stride=16)
    assert sum(_sizes(dm).values()) == 12 * 4 * 3  # 12 photos of 4x3 tiles
    _no_leak(dm)
    train = dm.splits["train"]
    assert train.boxes[0] == (0, 0, 16, 16) and train.load(0).shape == (16, 16, 3)
    # overlapping tiles with a stride
    dm = _dm(BachConfig, root=str(root), mode="tile", tile_size=32, tile_stride=16)
    assert sum(_sizes(dm).values()) == 12 * 3 * 2
    _no_leak(dm)
    _check_batch(dm)


def test_bach_without_csv_uses_folders_and_seed_decides(tmp_path):
    root = make_bach(tmp_path / "bach", per_class=5, csv_file=False)
    a = _dm(BachConfig, root=str(root), split_seed=1)
    b = _dm(BachConfig, root=str(root), split_seed=1)
    c = _dm(BachConfig, root=str(root), split_seed=7)
    assert a.splits["test"].paths == b.splits["test"].paths
    assert a.splits["test"].paths != c.splits["test"].paths


# ------------------------------------------------------------------------------------------------- ISIC
def _lesion_of(csv_path: Path) -> dict[str, str]:
    with open(csv_path) as f:
        return {r["image"]: r["lesion_id"] for r in csv.DictReader(f)}


def test_isic_split_by_lesion(tmp_path):
    root = make_isic(tmp_path / "isic", n=70)
    dm = _dm(Isic2018Config, root=str(root))
    assert dm.class_names == ISIC_CLASSES
    assert sum(_sizes(dm).values()) == 70
    _every_class_everywhere(dm)
    lesion = _lesion_of(root / f"{ISIC}_Training_LesionGroupings.csv")
    per_split = {s: {lesion[Path(p).stem] for p in v.paths} for s, v in dm.splits.items()}
    assert not check_no_leak(per_split)
    assert len(set(lesion.values())) < 70  # the fixture really has multi-photo lesions
    # labels match the one-hot ground truth
    with open(root / f"{ISIC}_Training_GroundTruth" / f"{ISIC}_Training_GroundTruth.csv") as f:
        truth = {r["image"]: [float(r[c]) for c in ISIC_CLASSES].index(1.0) for r in csv.DictReader(f)}
    for v in dm.splits.values():
        assert [truth[Path(p).stem] for p in v.paths] == v.labels.tolist()
    _check_batch(dm)


def test_isic_official_splits_honoured(tmp_path):
    root = make_isic(tmp_path / "isic", n=35, with_official_splits=True, official_per_class=2)
    dm = _dm(Isic2018Config, root=str(root), val_fraction=0.3, test_fraction=0.3)
    assert _sizes(dm) == {"train": 35, "val": 14, "test": 14}  # fractions ignored: all training is train
    assert all(f"{ISIC}_Validation_Input" in p for p in dm.splits["val"].paths)
    assert all(f"{ISIC}_Test_Input" in p for p in dm.splits["test"].paths)
    assert dm.splits["val"].labels.tolist() == [c for c in range(7) for _ in range(2)]


def test_isic_without_groupings_warns_and_is_seeded(tmp_path, caplog):
    root = make_isic(tmp_path / "isic", n=56, with_lesion_groups=False)
    with caplog.at_level(logging.WARNING, logger="patholite.data.isic"):
        a = _dm(Isic2018Config, root=str(root), split_seed=3)
    assert "may fall in different splits" in caplog.text
    b = _dm(Isic2018Config, root=str(root), split_seed=3)
    c = _dm(Isic2018Config, root=str(root), split_seed=4)
    assert a.splits["val"].paths == b.splits["val"].paths != c.splits["val"].paths


def test_isic_groupings_from_config_path(tmp_path):
    root = make_isic(tmp_path / "isic", n=42)
    moved = tmp_path / "groups.csv"
    (root / f"{ISIC}_Training_LesionGroupings.csv").rename(moved)
    dm = _dm(Isic2018Config, root=str(root), lesion_groups_csv=str(moved))
    lesion = _lesion_of(moved)
    assert not check_no_leak({s: {lesion[Path(p).stem] for p in v.paths} for s, v in dm.splits.items()})


# --------------------------------------------------------------------------------------------- MedMNIST
def test_medmnist_official_splits_rgb(tmp_path):
    make_medmnist(tmp_path / "pathmnist.npz", sizes=(27, 9, 18))
    dm = _dm(MedmnistConfig, root=str(tmp_path))
    assert dm.num_classes == 9 and dm.class_names[0] == "adipose"
    assert _sizes(dm) == {"train": 27, "val": 9, "test": 18}
    with np.load(tmp_path / "pathmnist.npz") as npz:
        np.testing.assert_array_equal(dm.splits["test"].load(5), npz["test_images"][5])
        assert dm.splits["val"].labels.tolist() == npz["val_labels"][:, 0].tolist()
    _check_batch(dm)


def test_medmnist_gray_and_explicit_file(tmp_path):
    path = make_medmnist(
        tmp_path / "elsewhere" / "dermamnist_64.npz", preset="dermamnist", gray=True, image_size=20
    )
    dm = _dm(MedmnistConfig, preset="dermamnist", npz=str(path))
    assert dm.num_classes == 7 and dm.class_names[4] == "melanoma"
    image = dm.splits["train"].load(0)
    assert image.shape == (20, 20, 3) and (image[..., 0] == image[..., 2]).all()
    _check_batch(dm)


def test_medmnist_other_preset_with_class_names(tmp_path):
    make_medmnist(tmp_path / "bloodmnist.npz", preset="bloodmnist", num_classes=4)
    dm = _dm(MedmnistConfig, root=str(tmp_path), preset="bloodmnist", class_names=["a", "b", "c", "d"])
    assert dm.num_classes == 4 and len(dm.splits["train"]) == 72


# ------------------------------------------------------------------------------------------------ CIFAR
def test_cifar10_official_test_and_stratified_val(tmp_path):
    root = make_cifar(tmp_path, "cifar10", train_per_class=10, test_per_class=3)
    dm = _dm(CifarConfig, root=str(root), val_fraction=0.2)
    assert dm.class_names == [f"class_{i}" for i in range(10)]
    assert _sizes(dm) == {"train": 80, "val": 20, "test": 30}
    assert np.bincount(dm.splits["val"].labels).tolist() == [2] * 10
    # pixels come back as HxWx3 RGB with the tint of the label (row-major planes decoded right)
    img, y = dm.splits["test"].load(0), dm.splits["test"].labels[0]
    assert img.shape == (32, 32, 3) and y == 0
    assert img[..., 0].mean() > img[..., 2].mean()  # class 0's tint is red-heavy
    again = _dm(CifarConfig, root=str(root), val_fraction=0.2)
    assert np.array_equal(dm.splits["val"].images, again.splits["val"].images)
    _check_batch(dm)


def test_cifar100_fine_labels(tmp_path):
    root = make_cifar(tmp_path, "cifar100", train_per_class=3, test_per_class=1)
    dm = _dm(CifarConfig, root=str(root), variant="cifar100")
    assert dm.num_classes == 100 and len(dm.splits["test"]) == 100
    assert sum(_sizes(dm).values()) == 400
    _check_batch(dm)


# ----------------------------------------------------------------------------------------- image folder
def test_image_folder_pool_is_split_stratified(tmp_path):
    root = make_image_folder(tmp_path / "if", per_class=10)
    dm = _dm(ImageFolderConfig, root=str(root))
    assert dm.class_names == ["lymphocytes", "stroma", "tumor"]
    assert sum(_sizes(dm).values()) == 30
    _every_class_everywhere(dm)
    _no_leak(dm)
    _check_batch(dm)


def test_image_folder_official_splits(tmp_path):
    root = make_image_folder(tmp_path / "if", with_splits=True, per_class=8)
    dm = _dm(ImageFolderConfig, root=str(root))
    assert _sizes(dm) == {"train": 24, "val": 6, "test": 6}
    for split in ("val", "test"):
        assert all(Path(p).parts[-3] == split for p in dm.splits[split].paths)


def test_image_folder_missing_val_drawn_from_train(tmp_path):
    root = make_image_folder(tmp_path / "if", with_splits=True, per_class=8)
    for f in (root / "val").rglob("*.png"):
        f.unlink()
    for d in sorted((root / "val").rglob("*"), reverse=True):
        d.rmdir()
    (root / "val").rmdir()
    dm = _dm(ImageFolderConfig, root=str(root), val_fraction=0.25)
    assert _sizes(dm)["test"] == 6 and _sizes(dm)["train"] + _sizes(dm)["val"] == 24
    assert all(Path(p).parts[-3] == "train" for p in dm.splits["val"].paths)


def test_image_folder_class_names_order_sets_labels(tmp_path):
    root = make_image_folder(tmp_path / "if", per_class=6)
    dm = _dm(ImageFolderConfig, root=str(root), class_names=["tumor", "stroma", "lymphocytes"])
    for images in dm.splits.values():
        for p, y in zip(images.paths, images.labels, strict=True):
            assert Path(p).parent.name == dm.class_names[y]
