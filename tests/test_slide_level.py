"""Slide-level data for focused models (SMT): boxes and patches, padded region reads, the magnification-chain
check, the thumbnail cache, the slide-level datamodule and the PANDA layout.

Slides are small synthetic ones (2048 px square, 0.5 um/px) from patholite's generator, written once per
module; the PANDA layout is rebuilt from them in tmp_path as plain tiled TIFFs.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from patholite.config.slide_schema import PandaConfig, SmtSyntheticConfig, SyntheticSlidesConfig
from patholite.data import build_datamodule
from patholite.data.slide_level import SlideLevelDataModule
from patholite.data.synthetic.slides import read_truth
from patholite.errors import ConfigError, DatasetError, SlideError
from patholite.wsi import reader as slide_reader
from patholite.wsi.cache import slide_cache_dir
from patholite.wsi.reader import open_slide
from patholite.wsi.region import (
    THUMB_DIR,
    Box,
    RegionReader,
    cached_thumbnail,
    chain_check,
    patch_box,
    tissue_box,
)

SIDE = 2048
TISSUE = {"max_side": 256}


def smt_cfg(root: Path, cache: Path, **extra):
    """An smt_synthetic dataset node as the train config holds it (schema defaults, struct mode), tiny."""
    cfg = OmegaConf.structured(SmtSyntheticConfig)
    cfg.merge_with({"root": str(root), "cache_dir": str(cache), "width": SIDE, "height": SIDE,
                    "slides_per_split": [2, 2, 2], "lesion_diameter_um": [40.0, 80.0], "tissue": TISSUE,
                    "batch_size": 2, **extra})  # fmt: skip
    return cfg


@pytest.fixture(scope="module")
def slide_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smt_slides")


@pytest.fixture(scope="module")
def dm(slide_root, tmp_path_factory) -> SlideLevelDataModule:
    """Six slides (one lesion-free and one with lesions per split), thumbnails at 64 px, grid 8."""
    module = SlideLevelDataModule(
        smt_cfg(slide_root, tmp_path_factory.mktemp("smt_cache")), image_size=64, grid=8
    )
    module.setup()
    return module


@pytest.fixture(scope="module")
def tumor_slide(dm) -> Path:
    return next(p for p in dm.slide_paths if "_tumor_" in p.name)


# ------------------------------------------------------------------------------------------- geometry
def test_patch_box_tiles_its_parent_row_major():
    parent = Box(100.0, -50.0, 1600.0)
    assert patch_box(parent, 0, 16) == Box(100.0, -50.0, 100.0)
    assert patch_box(parent, 17, 16) == Box(200.0, 50.0, 100.0)  # row 1, column 1
    assert patch_box(parent, 255, 16) == Box(1600.0, 1450.0, 100.0)
    last = patch_box(patch_box(parent, 255, 16), 63, 8)  # two hops: side / (16 * 8)
    assert last.side == pytest.approx(12.5) and last.x + last.side == pytest.approx(parent.x + parent.side)
    for bad in (-1, 256):
        with pytest.raises(ConfigError, match="outside a 16x16 grid"):
            patch_box(parent, bad, 16)


def test_tissue_box_is_the_square_around_the_tissue():
    mask = np.zeros((10, 20), bool)
    mask[2:4, 5:15] = True  # level-0 x 40..120, y 16..32 at downsample 8
    assert tissue_box(mask, (160, 80), downsample=8) == Box(40.0, -16.0, 80.0)  # centred, past the top
    assert tissue_box(np.zeros((10, 20), bool), (160, 80), downsample=8) == Box(0.0, -40.0, 160.0)


def test_tissue_box_covers_the_truth_tissue(dm, tumor_slide):
    truth = read_truth(tumor_slide)
    rows, cols = np.flatnonzero(truth.tissue.any(1)), np.flatnonzero(truth.tissue.any(0))
    ds, tol = truth.downsample, 2 * truth.downsample  # the truth's and the detected mask's coarseness
    _, box = dm.thumbnail(dm.slide_paths.index(tumor_slide))
    assert box.x <= cols[0] * ds + tol and box.x + box.side >= (cols[-1] + 1) * ds - tol
    assert box.y <= rows[0] * ds + tol and box.y + box.side >= (rows[-1] + 1) * ds - tol
    assert box.side <= SIDE


def test_chain_check_refuses_or_upsamples_per_policy(caplog):
    big, small = Box(0, 0, 65536), Box(0, 0, 8000)
    chain_check(big, 256, 16, policy="refuse")  # full resolution reached: nothing to say
    with pytest.raises(SlideError, match=r"slide a.svs is too small.*8000 px.*65536 px.*model.smt.grid=8"):
        chain_check(small, 256, 16, policy="refuse", source="slide a.svs")
    chain_check(small, 256, 8, hops=1, policy="refuse")  # one hop of 8 needs 2048 px only
    with caplog.at_level(logging.WARNING, logger="patholite.wsi.region"):
        chain_check(small, 96, 16, policy="upsample")
        chain_check(small, 96, 16, policy="upsample")
    assert sum("upsampled" in r.getMessage() for r in caplog.records) == 1  # logged once
    with pytest.raises(ConfigError, match="too_small"):
        chain_check(small, 256, 16, policy="crop")


# ------------------------------------------------------------------------------------------- reading
def test_region_reader_pads_outside_the_slide_and_counts(tumor_slide):
    reader = RegionReader(tumor_slide)
    inside = Box(512, 512, 1024)
    with open_slide(tumor_slide) as slide:
        expected = slide.read_scaled((512, 512), (1024, 1024), (64, 64))
    np.testing.assert_array_equal(reader.read(inside, 64), expected)
    half = reader.read(Box(-1024, 0, 2048), 64)  # the left half lies outside the slide
    assert (half[:, :32] == 255).all() and (half[:, 32:] < 250).any()
    assert (reader.read(Box(SIDE + 10, 0, 100), 16) == 255).all()  # wholly outside: white
    up = reader.read(Box(1000, 1000, 16), 64)  # fewer level-0 pixels than asked for: upsampled
    assert up.shape == (64, 64, 3) and up.dtype == np.uint8
    assert reader.reads == 4 and reader.read_seconds > 0


# ------------------------------------------------------------------------------------------- thumbnails
def test_thumbnail_is_cached_once_and_shares_the_tissue_mask(tumor_slide, tmp_path, monkeypatch):
    image, box = cached_thumbnail(tumor_slide, tmp_path, 64, TISSUE)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and box.side > 0
    assert len(list((tmp_path / THUMB_DIR).glob(f"{tumor_slide.stem}-*.npz"))) == 1
    tissue = OmegaConf.merge(OmegaConf.structured(SmtSyntheticConfig).tissue, TISSUE)
    cfg = OmegaConf.create({"tissue": tissue, "reader": {"mpp": None, "backend": "auto"}})
    assert (slide_cache_dir(tmp_path, tumor_slide, cfg) / "tissue.npz").is_file()  # the engine's mask cache

    def no_reading(*args, **kwargs):
        raise AssertionError("a cached thumbnail must not open the slide")

    monkeypatch.setattr(slide_reader, "open_cached", no_reading)
    again, box_again = cached_thumbnail(tumor_slide, tmp_path, 64, TISSUE)
    np.testing.assert_array_equal(again, image)
    assert box_again == box


def test_a_coarse_tissue_box_frames_the_same_tissue_without_the_tilers_mask(tumor_slide, tmp_path):
    _, fine = cached_thumbnail(tumor_slide, tmp_path / "fine", 64, TISSUE)
    image, coarse = cached_thumbnail(tumor_slide, tmp_path / "coarse", 64, TISSUE, tissue_px=256)
    assert image.shape == (64, 64, 3)
    shift = max(abs(a - b) for a, b in zip(fine.as_list(), coarse.as_list(), strict=True)) / fine.side
    assert shift < 0.05  # a bounding box from a 256-px image: within 5% of its side
    assert not list((tmp_path / "coarse").rglob("tissue.npz"))  # no fine mask computed or cached
    again, box = cached_thumbnail(tumor_slide, tmp_path / "coarse", 64, TISSUE, tissue_px=256)
    assert box == coarse and len(list((tmp_path / "coarse" / THUMB_DIR).glob("*.npz"))) == 1


def test_corrupt_or_stale_thumbnail_cache_is_rebuilt(tumor_slide, tmp_path, caplog):
    image, box = cached_thumbnail(tumor_slide, tmp_path, 64, TISSUE)
    (file,) = (tmp_path / THUMB_DIR).glob("*.npz")
    file.write_bytes(b"not a zip file")
    with caplog.at_level(logging.WARNING, logger="patholite.wsi.region"):
        rebuilt, _ = cached_thumbnail(tumor_slide, tmp_path, 64, TISSUE)
    np.testing.assert_array_equal(rebuilt, image)
    assert "unusable" in caplog.text
    with open(file, "wb") as f:  # another slide's or version's thumbnail under this name
        np.savez(f, image=np.zeros((64, 64, 3), np.uint8), box=np.zeros(3), key=np.array("{}"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="patholite.wsi.region"):
        rebuilt, rebuilt_box = cached_thumbnail(tumor_slide, tmp_path, 64, TISSUE)
    np.testing.assert_array_equal(rebuilt, image)
    assert rebuilt_box == box and "stored key differs" in caplog.text
    bigger, _ = cached_thumbnail(tumor_slide, tmp_path, 96, TISSUE)  # another size: its own thumbnail
    assert bigger.shape == (96, 96, 3) and len(list((tmp_path / THUMB_DIR).glob("*.npz"))) == 2


# ------------------------------------------------------------------------------------------- datamodule
def test_slide_level_items_labels_and_readers(dm):
    assert dm.class_names == ["Normal", "Tumor"] and dm.num_classes == 2 and dm.negative_class == "Normal"
    assert dm.tile_geometry() == {"mpp": None, "tile_size": None}
    assert len(dm.slide_paths) == 6
    for split in ("train", "val", "test"):
        data = dm.datasets[split]
        assert len(data) == 2
        for k in range(len(data)):
            item = data[k]
            path = dm.slide_paths[item["slide"]]
            assert path.parent.name == split
            assert item["label"] == int("_tumor_" in path.name)
            assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.uint8
            assert item["box"].dtype == torch.float32
            assert item["box"].tolist() == pytest.approx(dm.thumbnail(item["slide"])[1].as_list())
    batch = next(iter(DataLoader(dm.datasets["train"], batch_size=2)))
    assert batch["image"].shape == (2, 3, 64, 64) and batch["box"].shape == (2, 3)
    assert sorted(batch["label"].tolist()) == [0, 1]
    images, labels = dm.labelled_batches(4, split="val")[0]
    assert images.dtype == torch.float32 and images.shape == (2, 3, 64, 64) and labels.shape == (2,)
    assert dm.region_reader(0) is dm.region_reader(0) and dm.region_reader(0).path == dm.slide_paths[0]


def test_lesion_slides_hold_small_lesions(dm):
    for i, path in enumerate(dm.slide_paths):
        share = dm.lesion_share(i)
        assert (0 < share < 0.05) if "_tumor_" in path.name else share == 0.0


def test_slide_labels_by_class_and_class_order(slide_root, tmp_path):
    classes = SlideLevelDataModule(
        smt_cfg(slide_root, tmp_path, slide_labels="classes"), image_size=64, grid=8
    )
    assert classes.class_names == ["Normal", "Benign", "InSitu", "Invasive"]
    expected = [e.label for e in classes.family.slide_entries()]
    assert [classes.class_names[y] for y in classes.slide_labels] == expected
    flipped = SlideLevelDataModule(
        smt_cfg(slide_root, tmp_path, class_names=["Tumor", "Normal"]), image_size=64
    )
    assert [int("_normal_" in p.name) for p in flipped.slide_paths] == flipped.slide_labels.tolist()
    with pytest.raises(DatasetError, match="slide-level classes"):
        _ = SlideLevelDataModule(
            smt_cfg(slide_root, tmp_path, class_names=["A", "B"]), image_size=64
        ).class_names
    with pytest.raises(ConfigError, match="slide_labels"):
        _ = SlideLevelDataModule(
            smt_cfg(slide_root, tmp_path, slide_labels="graded"), image_size=64
        ).class_names
    with pytest.raises(ConfigError, match="multiple of model.smt.grid=16"):
        SlideLevelDataModule(smt_cfg(slide_root, tmp_path), image_size=72, grid=16)


def test_chain_refusal_and_single_class_split(slide_root, tmp_path):
    refusing = SlideLevelDataModule(smt_cfg(slide_root, tmp_path), image_size=64, grid=8, too_small="refuse")
    with pytest.raises(SlideError, match="too small for the magnification chain"):
        refusing.setup()
    cfg = smt_cfg(slide_root, tmp_path, width=1024, height=1024, slides_per_split=[1, 1, 1], normal_share=1.0)
    with pytest.raises(DatasetError, match=r"train split's 1 slides are all of one class \(Normal\)"):
        SlideLevelDataModule(cfg, image_size=64).setup()


def test_synthetic_family_draws_exact_normal_shares(dm):
    table = dm.family.slide_table()
    for split in ("train", "val", "test"):
        labels = sorted(r["label"] == "Normal" for r in table if r["split"] == split)
        assert labels == [False, True]


def test_plain_synthetic_slides_get_both_classes_in_every_split(dm, slide_root, tmp_path):
    """dataset=synthetic_slides leaves lesion-free slides to chance (1 in 4); for a slide-level model half of
    each split is lesion-free, else the default 2-slide splits would often hold one class."""
    cfg = OmegaConf.structured(SyntheticSlidesConfig)
    same = smt_cfg(slide_root, tmp_path)
    cfg.merge_with({k: v for k, v in same.items() if k not in ("name", "normal_share")})
    assert cfg.name == "synthetic_slides" and cfg.normal_share is None
    module = SlideLevelDataModule(cfg, image_size=64, grid=8)
    assert cfg.normal_share == 0.5  # in the config, so the run record says so
    module.setup()
    table = module.family.slide_table()
    for split in ("train", "val", "test"):
        assert sorted(r["label"] == "Normal" for r in table if r["split"] == split) == [False, True]


# ------------------------------------------------------------------------------------------- PANDA
GRADES = {"a0": 0, "b0": 0, "c0": 0, "d1": 1, "e3": 3, "f5": 5}


def write_panda(root: Path, source: Path, rows: list[dict] | None = None) -> Path:
    """A PANDA layout of plain tiled TIFFs cut from a synthetic slide; masks for all but one image."""
    (root / "train_images").mkdir(parents=True)
    (root / "train_label_masks").mkdir()
    with open_slide(source) as slide:
        image, _ = slide.low_resolution(512)
    for k, image_id in enumerate(GRADES):
        tifffile.imwrite(root / "train_images" / f"{image_id}.tiff", np.roll(image, 16 * k, axis=1),
                         tile=(128, 128), photometric="rgb")  # fmt: skip
        if image_id != "f5":
            mask = np.zeros((image.shape[0], image.shape[1], 3), np.uint8)
            tifffile.imwrite(root / "train_label_masks" / f"{image_id}_mask.tiff", mask)
    rows = rows or [
        {"image_id": i, "data_provider": "radboud", "isup_grade": g, "gleason_score": f"{g}+{g}"}
        for i, g in GRADES.items()
    ]
    with open(root / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def panda_cfg(root: Path, cache: Path, **extra):
    cfg = OmegaConf.structured(PandaConfig)
    cfg.merge_with({"root": str(root), "cache_dir": str(cache), "val_fraction": 0.25, "test_fraction": 0.25,
                    "tissue": TISSUE, "batch_size": 2, **extra})  # fmt: skip
    return cfg


@pytest.fixture(scope="module")
def panda_root(tumor_slide, tmp_path_factory) -> Path:
    return write_panda(tmp_path_factory.mktemp("panda"), tumor_slide)


def test_panda_binary_slides_split_stratified(panda_root, tmp_path):
    dm = SlideLevelDataModule(panda_cfg(panda_root, tmp_path), image_size=64, grid=8)
    assert dm.class_names == ["Benign", "Cancer"]
    assert dm.slide_labels.tolist() == [int(GRADES[p.stem] > 0) for p in dm.slide_paths]
    dm.setup()
    for split in ("train", "val", "test"):
        assert sorted(set(dm.datasets[split].labels.tolist())) == [0, 1]
    assert dm.datasets["train"][0]["image"].shape == (3, 64, 64)
    assert dm.family.mask_path(panda_root / "train_images" / "a0.tiff").name == "a0_mask.tiff"
    assert dm.family.mask_path(panda_root / "train_images" / "f5.tiff") is None
    assert dm.family.rows["e3"]["data_provider"] == "radboud"


def test_panda_graded_labels_and_no_tiles(panda_root, tmp_path):
    family = build_datamodule(panda_cfg(panda_root, tmp_path, slide_labels="classes"))
    assert family.class_names == [f"ISUP{g}" for g in range(6)]
    assert {e.slide.stem: e.label for e in family.slide_entries()} == {
        i: f"ISUP{g}" for i, g in GRADES.items()
    }
    with pytest.raises(DatasetError, match="slide-level labels only"):
        family.setup()


@pytest.mark.parametrize(
    "rows,match",
    [
        ([{"image_id": "a0", "isup_grade": 0, "data_provider": "x"}],
         r"lacks the column\(s\) \['gleason_score'\]"),
        ([{"image_id": "zz", "data_provider": "x", "isup_grade": 0, "gleason_score": "0+0"}],
         r"lists 1 image\(s\) missing from .*train_images: zz"),
        ([{"image_id": "a0", "data_provider": "x", "isup_grade": 7, "gleason_score": "0+0"}],
         r"line 2 has image_id='a0', isup_grade='7'"),
    ],
)  # fmt: skip
def test_panda_bad_layouts_name_the_file(tumor_slide, tmp_path, rows, match):
    root = write_panda(tmp_path / "panda", tumor_slide, rows)
    family = build_datamodule(panda_cfg(root, tmp_path / "cache"))
    with pytest.raises(DatasetError, match=match) as err:
        family.slide_entries()
    assert "train.csv" in str(err.value)
