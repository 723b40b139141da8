"""The unlabelled tile source of feature distillation: the labelled train split without labels, a folder of
images, tissue tiles of a folder of slides; seeded draws, the key that changes with the files, the errors.

Every layout is built here in tmp_path: PNGs written with PIL, small synthetic slides from patholite's
generator, and a blank slide (glass only) written as an Aperio TIFF."""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch.utils.data import DataLoader

from patholite.config.compression.feature_kd import TileSourceConfig
from patholite.data.base import ImageSet
from patholite.data.synthetic.slides import write_synthetic_slide
from patholite.data.synthetic.spec import SlideSpec
from patholite.data.unlabelled import UnlabelledTiles, unlabelled_tiles
from patholite.errors import ConfigError, DatasetError

KEY = "compression.feature_kd.tiles"


def write_png(path: Path, side: int = 40, value: int = 0, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(side, side, 3), dtype=np.uint8)
    pixels[0, 0] = value  # a marker the tests read back
    Image.fromarray(pixels).save(path)
    return path


def write_blank_slide(path: Path, side: int = 512) -> Path:
    """A single-level Aperio TIFF of empty glass: no tissue at all."""
    head = f"Aperio Image Library v12.0.15 \r\n{side}x{side} [0,0 {side}x{side}] (256x256)"
    desc = f"{head} JPEG/RGB Q=85|MPP = 0.5"
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.full((side, side, 3), 240, np.uint8), tile=(256, 256), photometric="rgb",
                  compression="jpeg", description=desc, metadata=None)  # fmt: skip
    return path


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Class folders, a nested folder, mixed extensions, and files that are not images or are hidden."""
    root = tmp_path / "tiles"
    write_png(root / "tumour" / "b.png", value=2)
    write_png(root / "tumour" / "a.png", value=1)
    write_png(root / "normal" / "deep" / "c.png", value=3)
    Image.fromarray(np.full((30, 20, 3), 7, np.uint8)).save(root / "normal" / "d.jpg")
    (root / "normal" / "notes.txt").write_text("not an image")
    write_png(root / ".hidden" / "e.png")
    write_png(root / "normal" / ".f.png")
    return root


@pytest.fixture(scope="module")
def slide_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slides")
    write_synthetic_slide(root / "a.svs", SlideSpec(768, 768, seed=1))
    write_synthetic_slide(root / "more" / "b.svs", SlideSpec(768, 768, seed=2))
    return root


def cfg(**kw) -> TileSourceConfig:
    return TileSourceConfig(**kw)


# ------------------------------------------------------------------------------------------- images
def test_images_every_file_sorted_class_folders_ignored(image_folder):
    tiles = unlabelled_tiles(cfg(kind="images", path=str(image_folder)), None, 24)
    names = [Path(p).relative_to(image_folder).as_posix() for p in tiles.paths]
    assert names == ["normal/d.jpg", "normal/deep/c.png", "tumour/a.png", "tumour/b.png"]
    image, index = tiles[2]
    assert image.shape == (3, 24, 24) and image.dtype == torch.uint8 and index == 2
    key = tiles.key()
    assert key["kind"] == "images" and key["path"] == str(image_folder.resolve()) and key["count"] == 4
    assert key["image_size"] == 24 and key["max_tiles"] is None and key["seed"] == 0
    assert "tile_px" not in key  # a slide setting does not key a folder of images


def test_resize_is_antialiased_and_not_normalised(tmp_path):
    # a 2x2 checkerboard of 0/255 shrunk 8x: antialiasing averages to grey, a plain sample would not
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    Image.fromarray(np.repeat(board[..., None], 3, axis=2)).save(tmp_path / "x.png")
    image, _ = unlabelled_tiles(cfg(kind="images", path=str(tmp_path)), None, 8)[0]
    assert image.dtype == torch.uint8
    assert 100 < float(image.float().mean()) < 155 and int(image.max()) < 200


def test_max_tiles_is_a_seeded_draw(image_folder):
    source = cfg(kind="images", path=str(image_folder), max_tiles=2, seed=3)
    a, b = (unlabelled_tiles(source, None, 16) for _ in range(2))
    assert len(a) == 2 and a.paths == b.paths and a.key() == b.key()
    every = unlabelled_tiles(cfg(kind="images", path=str(image_folder)), None, 16).paths
    assert set(a.paths) <= set(every) and a.paths == sorted(a.paths)
    draws = {tuple(unlabelled_tiles(replace(source, seed=s), None, 16).paths) for s in range(8)}
    assert len(draws) > 1
    assert unlabelled_tiles(replace(source, max_tiles=10), None, 16).paths == every


def test_key_changes_with_files_and_settings(image_folder):
    source = cfg(kind="images", path=str(image_folder))
    key = unlabelled_tiles(source, None, 16).key()
    assert unlabelled_tiles(source, None, 16).key() == key  # stable
    assert unlabelled_tiles(source, None, 32).key() != key
    assert unlabelled_tiles(replace(source, max_tiles=3), None, 16).key() != key

    target = image_folder / "tumour" / "a.png"
    stat = target.stat()
    write_png(target, value=9, seed=5)  # same size on disk, other pixels
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    changed = unlabelled_tiles(source, None, 16).key()
    assert changed != key and changed["count"] == key["count"]
    write_png(image_folder / "new.png")
    assert unlabelled_tiles(source, None, 16).key()["count"] == 5


def test_split_is_seeded_and_disjoint(image_folder):
    tiles = unlabelled_tiles(cfg(kind="images", path=str(image_folder)), None, 16)
    train, val = tiles.split(0.25, seed=1)
    assert len(val) == 1 and sorted(train + val) == [0, 1, 2, 3] and not set(train) & set(val)
    assert tiles.split(0.25, seed=1) == (train, val)
    assert tiles.split(0.0, seed=1) == ([0, 1, 2, 3], [])
    assert len({tuple(tiles.split(0.5, seed=s)[1]) for s in range(10)}) > 1
    with pytest.raises(ValueError):
        tiles.split(1.0, seed=0)


def test_picklable_for_loader_workers(image_folder):
    tiles = unlabelled_tiles(cfg(kind="images", path=str(image_folder)), None, 16)
    copy = pickle.loads(pickle.dumps(tiles))
    assert isinstance(copy, UnlabelledTiles) and copy.key() == tiles.key()
    images, index = next(iter(DataLoader(tiles, batch_size=4, num_workers=1)))
    assert images.shape == (4, 3, 16, 16) and index.tolist() == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------------ dataset
def test_dataset_kind_reads_the_labelled_split_without_labels(tmp_path):
    images = np.stack([np.full((20, 20, 3), v, np.uint8) for v in (10, 20, 30, 40, 50)])
    labelled = ImageSet(labels=np.array([0, 1, 0, 1, 1]), images=images)
    tiles = unlabelled_tiles(cfg(), labelled, 8)
    assert len(tiles) == 5
    image, index = tiles[3]
    assert image.shape == (3, 8, 8) and int(image[0, 0, 0]) == 40 and index == 3
    key = tiles.key()
    assert key["kind"] == "dataset" and key["path"] is None
    other = ImageSet(labels=labelled.labels, images=images.copy())
    other.images[0] += 1
    assert unlabelled_tiles(cfg(), other, 8).key() != key
    assert unlabelled_tiles(cfg(), ImageSet(labels=labelled.labels[::-1], images=images), 8).key() == key
    assert len(unlabelled_tiles(cfg(max_tiles=2), labelled, 8)) == 2

    files = ImageSet(labels=np.array([0, 1]), paths=[str(write_png(tmp_path / f"{i}.png", value=i)) for i in
                                                      range(2)])  # fmt: skip
    image, _ = unlabelled_tiles(cfg(), files, 40)[1]
    assert int(image[0, 0, 0]) == 1


# ------------------------------------------------------------------------------------------- slides
def test_slides_tissue_tiles_per_slide_draw(slide_folder):
    source = cfg(kind="slides", path=str(slide_folder), mpp=0.5, tile_px=64, per_slide=5)
    tiles = unlabelled_tiles(source, None, 32)
    assert len(tiles) == 10 and tiles.paths.count(str(slide_folder / "a.svs")) == 5
    assert all(box[2:] == (64, 64) for box in tiles.boxes)
    image, index = tiles[7]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and index == 7
    assert float(image.float().std()) > 5  # tissue, not blank glass
    key = tiles.key()
    assert (key["kind"], key["mpp"], key["tile_px"], key["per_slide"], key["count"]) == (
        "slides",
        0.5,
        64,
        5,
        10,
    )
    assert unlabelled_tiles(source, None, 32).boxes == tiles.boxes  # seeded
    coarser = unlabelled_tiles(replace(source, mpp=1.0), None, 32)
    assert all(box[2] == 128 for box in coarser.boxes) and coarser.key() != key
    every = unlabelled_tiles(replace(source, per_slide=None), None, 32)
    assert len(every) > 10 and set(tiles.boxes) <= set(every.boxes)
    assert len(unlabelled_tiles(replace(source, max_tiles=3), None, 32)) == 3


def test_slide_tiles_read_in_loader_workers(slide_folder):
    tiles = unlabelled_tiles(cfg(kind="slides", path=str(slide_folder), tile_px=64, per_slide=2), None, 16)
    tiles = pickle.loads(pickle.dumps(tiles))
    images, index = next(iter(DataLoader(tiles, batch_size=4, num_workers=1)))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8 and index.tolist() == [0, 1, 2, 3]


def test_slide_without_tissue_is_skipped_and_only_blanks_are_an_empty_source(tmp_path, slide_folder, caplog):
    write_blank_slide(tmp_path / "blank.svs")
    source = cfg(kind="slides", path=str(tmp_path), tile_px=64)
    with pytest.raises(DatasetError, match=rf"{KEY}.path=.*an empty tile source"):
        unlabelled_tiles(source, None, 16)
    (tmp_path / "a.svs").symlink_to(slide_folder / "a.svs")
    with caplog.at_level(logging.WARNING, logger="patholite.data.unlabelled"):
        tiles = unlabelled_tiles(replace(source, per_slide=3), None, 16)
    assert set(tiles.paths) == {str(tmp_path / "a.svs")} and "blank.svs" in caplog.text


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kw, error, key",
    [
        ({"kind": "tiles"}, ConfigError, "kind"),
        ({"kind": "images"}, ConfigError, "path"),
        ({"kind": "dataset", "path": "x"}, ConfigError, "path"),
        ({"kind": "slides", "path": "x", "mpp": 0}, ConfigError, "mpp"),
        ({"kind": "slides", "path": "x", "mpp": -0.5}, ConfigError, "mpp"),
        ({"kind": "slides", "path": "x", "tile_px": 0}, ConfigError, "tile_px"),
        ({"kind": "slides", "path": "x", "per_slide": 0}, ConfigError, "per_slide"),
        ({"max_tiles": 0}, ConfigError, "max_tiles"),
        ({"val_fraction": 1.0}, ConfigError, "val_fraction"),
        ({"val_fraction": -0.1}, ConfigError, "val_fraction"),
    ],
)
def test_bad_settings_are_refused_before_any_work(kw, error, key):
    labelled = ImageSet(labels=np.zeros(2), images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(error, match=rf"^{KEY}\.{key}="):
        unlabelled_tiles(cfg(**kw), labelled, 16)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DatasetError, match=rf"{KEY}.path=.*does not exist"):
        unlabelled_tiles(cfg(kind="images", path=str(tmp_path / "nowhere")), None, 16)
    (tmp_path / "empty" / "class").mkdir(parents=True)
    (tmp_path / "empty" / "class" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"holds no images .*an empty tile source"):
        unlabelled_tiles(cfg(kind="images", path=str(tmp_path / "empty")), None, 16)
    with pytest.raises(DatasetError, match=r"holds no slides .*an empty tile source"):
        unlabelled_tiles(cfg(kind="slides", path=str(tmp_path / "empty")), None, 16)
    with pytest.raises(ConfigError, match=rf"{KEY}.kind=dataset .*empty"):
        unlabelled_tiles(cfg(), None, 16)
