"""Tile grids on real slides (a 4-level pyramid and a single-level scan), the CLAM-style HDF5 file, the
cache that reuses it, and the errors a user sees."""

from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest

from patholite.errors import ConfigError, SlideError
from patholite.wsi.reader import open_slide
from patholite.wsi.tiling import TileGrid, cached_tiles, load_tiles_h5, save_tiles_h5, tile_grid
from patholite.wsi.tissue import TissueMask, detect_tissue


@pytest.fixture
def boxes(shared):
    """300x250, levels of downsample 1, 2, 4.02, 8.09; its own mpp (352.8) is nonsense, so 0.25 is given."""
    with open_slide(shared / "data" / "slides" / "boxes.tiff", mpp=0.25) as slide:
        yield slide


@pytest.fixture(scope="module")
def cmu(shared):
    with open_slide(shared / "data" / "slides" / "CMU-1-Small-Region.svs") as slide:
        yield slide


def starts(grid: TileGrid, axis: int) -> list[int]:
    return sorted(set(grid.coords[:, axis].tolist()))


def test_level0_grid_is_row_major_and_inside_the_slide(boxes):
    grid = tile_grid(boxes, 64)
    assert (grid.downsample, grid.patch_level, grid.size0, grid.overlap) == (1.0, 0, 64, 0)
    assert grid.mpp == 0.25 and grid.slide_dimensions == (300, 250) and grid.tissue_fraction is None
    assert starts(grid, 0) == [0, 64, 128, 192] and starts(grid, 1) == [0, 64, 128]
    assert grid.coords.dtype == np.int64 and grid.coords.shape == (12, 2)
    assert grid.coords[:5].tolist() == [[0, 0], [64, 0], [128, 0], [192, 0], [0, 64]]  # x runs fastest


def test_overlap_shortens_the_stride(boxes):
    grid = tile_grid(boxes, 64, overlap=16)
    assert grid.stride0 == 48
    # the next ones, at x=240 and y=192, would end outside (304 > 300, 256 > 250)
    assert starts(grid, 0) == [0, 48, 96, 144, 192] and starts(grid, 1) == [0, 48, 96, 144]
    assert len(grid) == 20 and (grid.coords + 64 <= [300, 250]).all()


@pytest.mark.parametrize(
    "patch, request_, downsample, level, size0",
    [
        (32, {"mpp": 0.5}, 2.0, 1, 64),  # exactly level 1
        (32, {"magnification": 20}, 2.0, 1, 64),  # 10x = 1 um/px without an objective power
        (32, {"mpp": 0.75}, 3.0, 1, 96),  # between levels 1 and 2: read level 1, then resize
        (32, {"mpp": 1.0}, 4.0, 1, 128),  # level 2 is 4.016, coarser than asked: level 1
        (16, {"mpp": 2.5}, 10.0, 3, 160),  # coarser than the coarsest level: level 3
    ],
)
def test_target_resolution_picks_the_next_finer_level(boxes, patch, request_, downsample, level, size0):
    grid = tile_grid(boxes, patch, **request_)
    assert grid.downsample == pytest.approx(downsample)
    assert (grid.patch_level, grid.size0, grid.patch_size) == (level, size0, patch)
    assert grid.mpp == pytest.approx(0.25 * downsample)
    assert grid.stride0 == pytest.approx(patch * downsample)
    assert (grid.coords + size0 <= [300, 250]).all()
    assert len(grid) == (300 // size0) * (250 // size0)


def test_finer_than_the_scan_is_upsampled_with_a_warning(boxes, caplog):
    with caplog.at_level(logging.WARNING, logger="patholite.wsi.tiling"):
        grid = tile_grid(boxes, 64, mpp=0.125)
    assert (grid.downsample, grid.size0, grid.patch_level) == (0.5, 32, 0)
    assert "upsampled 2.00x" in caplog.text


def test_single_level_scan_at_a_coarser_mpp(cmu):
    grid = tile_grid(cmu, 224, mpp=1.0)
    stride = 224 * 1.0 / 0.499
    assert grid.patch_level == 0 and grid.size0 == 449 and grid.stride0 == pytest.approx(stride)
    assert starts(grid, 0) == [0, 449, 898, 1347]  # the next, at 1796, would end at 2245 > 2220
    assert starts(grid, 1) == [round(i * stride) for i in range(6)]
    assert (grid.coords + 449 <= [2220, 2967]).all()


def test_tissue_mask_keeps_tissue_tiles(cmu):
    tissue = detect_tissue(cmu, max_side=512)
    every = tile_grid(cmu, 224, mpp=1.0)
    kept = tile_grid(cmu, 224, mpp=1.0, tissue=tissue, theta=0.5)
    assert 0 < len(kept) < len(every)
    all_fractions = tissue.fractions(every.coords, every.size0)
    np.testing.assert_array_equal(kept.coords, every.coords[all_fractions > 0.5])
    np.testing.assert_allclose(kept.tissue_fraction, all_fractions[all_fractions > 0.5], rtol=1e-6)
    assert kept.tissue_fraction.dtype == np.float32
    assert len(tile_grid(cmu, 224, mpp=1.0, tissue=tissue, theta=0.0)) >= len(kept)


def test_bad_requests(boxes):
    with pytest.raises(SlideError, match=r"covers 1024x1024 level-0 px .* 300x250; use a smaller tile.size"):
        tile_grid(boxes, 256, mpp=1.0)
    with pytest.raises(ConfigError, match="tile.overlap=64"):
        tile_grid(boxes, 64, overlap=64)
    with pytest.raises(ConfigError, match="tile.theta=1.5"):
        tile_grid(boxes, 64, theta=1.5)
    with pytest.raises(ConfigError, match="give one target resolution"):
        tile_grid(boxes, 64, mpp=0.5, magnification=20)
    with pytest.raises(ConfigError, match="tile.size=0"):
        tile_grid(boxes, 0)
    glass = TissueMask(np.zeros((25, 30), bool), downsample=10.0)
    with pytest.raises(SlideError, match="lower tile.theta"):
        tile_grid(boxes, 64, tissue=glass)


def test_h5_round_trip_in_clam_layout(tmp_path, boxes):
    tissue = TissueMask(np.ones((25, 30), bool), downsample=10.0)
    grid = tile_grid(boxes, 32, mpp=0.75, overlap=8, tissue=tissue, theta=0.25)
    path = tmp_path / "tiles.h5"
    save_tiles_h5(path, grid, slide="boxes.tiff")
    with h5py.File(path, "r") as f:
        coords = f["coords"]
        assert coords.dtype == np.int64 and coords.shape == (len(grid), 2)
        assert {"patch_size", "patch_level", "downsample"} <= set(coords.attrs)  # what CLAM reads
        # CLAM's meaning: read patch_size px at patch_level. 32 px at 0.75 um/px = 96 level-0 px, which
        # level 1 (downsample 2) holds in 48 px; the model-side tile is kept as target_patch_size
        assert (coords.attrs["patch_size"], coords.attrs["patch_level"]) == (48, 1)
        assert coords.attrs["downsample"] == pytest.approx(boxes.level_downsamples[1])
        assert (coords.attrs["target_patch_size"], coords.attrs["target_downsample"]) == (32, 3.0)
        assert coords.attrs["slide"] == "boxes.tiff"
        assert f["tissue_fraction"].shape == (len(grid),)
    loaded = load_tiles_h5(path)
    np.testing.assert_array_equal(loaded.coords, grid.coords)
    np.testing.assert_array_equal(loaded.tissue_fraction, grid.tissue_fraction)
    names = ("patch_size", "patch_level", "downsample", "size0", "mpp", "overlap", "slide_dimensions")
    for name in (*names, "level_downsample"):
        assert getattr(loaded, name) == getattr(grid, name)
    assert [p.name for p in tmp_path.iterdir()] == ["tiles.h5"]  # no temp file left


def test_h5_without_mpp_or_tissue(tmp_path, shared):
    with open_slide(shared / "data" / "slides" / "boxes.tiff") as slide:  # no usable mpp
        grid = tile_grid(slide, 100)
    assert grid.mpp is None
    save_tiles_h5(tmp_path / "t.h5", grid)
    loaded = load_tiles_h5(tmp_path / "t.h5")
    assert loaded.mpp is None and loaded.tissue_fraction is None and len(loaded) == 6


def test_load_rejects_foreign_files(tmp_path):
    with pytest.raises(SlideError, match="missing.h5"):
        load_tiles_h5(tmp_path / "missing.h5")
    clam_only = tmp_path / "clam.h5"
    with h5py.File(clam_only, "w") as f:
        f.create_dataset("coords", data=np.zeros((3, 2), np.int64)).attrs["patch_size"] = 256
    with pytest.raises(SlideError, match=r"attributes \[.*'patch_level'.*delete it"):
        load_tiles_h5(clam_only)


def test_cached_tiles_reuses_and_rebuilds(tmp_path, boxes, caplog):
    path = tmp_path / "cache" / "tiles.h5"
    tissue = TissueMask(np.ones((25, 30), bool), downsample=10.0)
    first = cached_tiles(boxes, path, patch_size=32, mpp=0.5, tissue=tissue)
    inode = path.stat().st_ino
    again = cached_tiles(boxes, path, patch_size=32, mpp=0.5, tissue=tissue)
    assert path.stat().st_ino == inode  # read, not rewritten
    np.testing.assert_array_equal(again.coords, first.coords)
    with h5py.File(path, "r") as f:
        assert tuple(f["coords"].attrs["level_dim"]) == (150, 125)

    changes = [
        {"patch_size": 32, "mpp": 0.5, "tissue": tissue, "overlap": 8},
        {"patch_size": 32, "mpp": 0.75, "tissue": tissue},
        {"patch_size": 32, "magnification": 20, "tissue": tissue},
        {"patch_size": 32, "mpp": 0.5, "tissue": tissue, "theta": 0.9},
        {"patch_size": 32, "mpp": 0.5},
    ]
    half = TissueMask(np.arange(30)[None, :].repeat(25, 0) < 15, downsample=10.0)
    changes.append({"patch_size": 32, "mpp": 0.5, "tissue": half})
    for kwargs in changes:
        inode = path.stat().st_ino
        grid = cached_tiles(boxes, path, **kwargs)
        assert path.stat().st_ino != inode, kwargs
        np.testing.assert_array_equal(load_tiles_h5(path).coords, grid.coords)
        np.testing.assert_array_equal(grid.coords, tile_grid(boxes, **kwargs).coords)
    assert (grid.coords[:, 0] < 150).all()  # the last mask holds tissue in its left half only

    path.write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="patholite.wsi.tiling"):
        grid = cached_tiles(boxes, path, patch_size=32)
    assert "unusable" in caplog.text and len(load_tiles_h5(path)) == len(grid) == 9 * 7

    caplog.clear()
    with h5py.File(path, "r+") as f:  # a stale file of an older layout: an attribute is gone
        del f["coords"].attrs["size0"]
    with caplog.at_level(logging.WARNING, logger="patholite.wsi.tiling"):
        cached_tiles(boxes, path, patch_size=32)
    assert "size0" in caplog.text and load_tiles_h5(path).size0 == 32


def test_cached_tiles_validates_before_reading(tmp_path, boxes):
    with pytest.raises(ConfigError, match="tile.overlap"):
        cached_tiles(boxes, tmp_path / "t.h5", patch_size=32, overlap=40)
    assert not (tmp_path / "t.h5").exists()
