"""The slide reader on the real fixtures in ../shared/data/slides: facts, levels, mpp, reads, errors."""

from __future__ import annotations

import numpy as np
import pytest

from patholite.errors import ConfigError, SlideError
from patholite.wsi.reader import find_slides, open_slide


def test_real_aperio_slide_facts(slides):
    with open_slide(slides / "CMU-1-Small-Region.svs") as s:
        assert s.backend == "openslide"
        assert s.dimensions == (2220, 2967)
        assert s.level_count == 1
        assert s.mpp == pytest.approx(0.499)
        assert s.objective_power == 20
        assert s.describe()["vendor"] == "aperio"
        region = s.read_region((1000, 1500), 0, (64, 32))
        assert region.shape == (32, 64, 3) and region.dtype == np.uint8
        assert region.std() > 5  # tissue, not a blank


def test_single_level_slide_low_resolution_is_downsampled_in_strips(slides):
    with open_slide(slides / "CMU-1-Small-Region.svs") as s:
        image, ds = s.low_resolution(max_side=512)
        assert max(image.shape[:2]) == 512
        assert ds == pytest.approx(2967 / 512, rel=0.01)
        whole = s.read_region((0, 0), 0, s.dimensions)
    import cv2

    expected = cv2.resize(whole, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_AREA)
    assert np.abs(image.astype(int) - expected.astype(int)).mean() < 3


def test_target_resolution_and_scaled_reads(slides):
    with open_slide(slides / "CMU-1-Small-Region.svs") as s:
        assert s.downsample_for(mpp=0.998) == pytest.approx(2.0)
        assert s.downsample_for(magnification=10) == pytest.approx(2.0)  # objective 20x
        assert s.downsample_for() == 1.0
        tile = s.read_scaled((0, 0), (256, 256), (128, 128))
        assert tile.shape == (128, 128, 3)
        with pytest.raises(ConfigError, match="not both"):
            s.downsample_for(mpp=1.0, magnification=10)


def test_pyramid_levels_and_nonsense_mpp_needs_override(slides):
    with open_slide(slides / "boxes.tiff") as s:
        assert s.level_count == 4
        assert s.level_dimensions[0] == (300, 250)
        assert s.native_mpp == pytest.approx(352.8, rel=0.01)
        assert s.mpp is None  # a print resolution, not a scan's
        with pytest.raises(SlideError, match=r"reader\.mpp="):
            s.require_mpp()
        assert s.best_level_for_downsample(1.0) == 0
        assert s.best_level_for_downsample(s.level_downsamples[2] * 1.5) == 2
        # a downsample between levels reads from the finer level and resizes
        tile = s.read_scaled((0, 0), (200, 200), (30, 30))
        assert tile.shape == (30, 30, 3)
    with open_slide(slides / "boxes.tiff", mpp=0.25) as s:
        assert s.mpp == 0.25
        assert s.downsample_for(mpp=1.0) == pytest.approx(4.0)


def test_implausible_override_is_refused(slides):
    with pytest.raises(ConfigError, match="plausible"):
        open_slide(slides / "small.svs", mpp=352.8)


def test_unopenable_slide_names_file_and_both_backends(slides):
    with pytest.raises(SlideError) as err:
        open_slide(slides / "unopenable.tiff")
    text = str(err.value)
    assert "unopenable.tiff" in text and "openslide" in text and "tiffslide" in text


def test_read_failure_names_slide_and_region(slides):
    # it opens fine; the tile data is corrupt
    with open_slide(slides / "unreadable.svs") as s, pytest.raises(SlideError) as err:
        s.read_region((0, 0), 0, (16, 16))
    text = str(err.value)
    assert "unreadable.svs" in text and "(0, 0)" in text and "16x16" in text


def test_missing_slide_and_bad_backend(tmp_path):
    with pytest.raises(SlideError, match="does not exist"):
        open_slide(tmp_path / "nope.svs")
    (tmp_path / "x.svs").write_bytes(b"not a slide")
    with pytest.raises(ConfigError, match="backend"):
        open_slide(tmp_path / "x.svs", backend="pillow")
    with pytest.raises(SlideError, match="cannot open"):
        open_slide(tmp_path / "x.svs")


def test_find_slides_folder_list_and_file(tmp_path, slides):
    (tmp_path / "a.svs").write_bytes(b"")
    (tmp_path / "b.tif").write_bytes(b"")
    (tmp_path / "a.xml").write_text("<x/>")  # annotations beside slides are not slides
    assert [p.name for p in find_slides(tmp_path)] == ["a.svs", "b.tif"]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# slides\n{slides / 'small.svs'}\nb.tif\n")
    assert find_slides(listing) == [slides / "small.svs", tmp_path / "b.tif"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlideError, match="no slide files"):
        find_slides(tmp_path / "empty")
    with pytest.raises(SlideError, match="does not exist"):
        find_slides(tmp_path / "missing")


def test_tiffslide_backend_reads_the_same_slide(slides):
    with (
        open_slide(slides / "CMU-1-Small-Region.svs") as a,
        open_slide(slides / "CMU-1-Small-Region.svs", backend="tiffslide") as b,
    ):
        assert b.backend == "tiffslide"
        assert b.dimensions == a.dimensions and b.mpp == pytest.approx(a.mpp)
        ra, rb = a.read_region((1000, 1500), 0, (64, 64)), b.read_region((1000, 1500), 0, (64, 64))
        assert np.abs(ra.astype(int) - rb.astype(int)).mean() < 2  # same JPEG tiles, decoders may differ


def test_folder_without_dicom_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SlideError, match="without DICOM"):
        open_slide(tmp_path)


def test_a_dicom_folder_is_one_slide(tmp_path):
    dicom = tmp_path / "slide_a"
    dicom.mkdir()
    for i in range(3):
        (dicom / f"instance{i}.dcm").write_bytes(b"")
    assert find_slides(dicom) == [dicom]  # slides=<the DICOM folder>: one slide, not one per instance
    (tmp_path / "b.svs").write_bytes(b"")
    assert find_slides(tmp_path) == [tmp_path / "b.svs", dicom]
