"""Tissue detection: drawn slides with ink, folds, fat and a background gradient; the real CMU slide; the
exact tile fractions; the mask file round trip; the errors a user sees."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from patholite.errors import ConfigError, SlideError
from patholite.wsi.tissue import TissueMask, detect_tissue, detect_tissue_image, pen_mask

H, W = 240, 320
DS, MPP = 16.0, 0.5  # 8 um per drawn pixel, as a 2048-px view of a large 40x slide


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def drawn_slide(seed: int = 0) -> dict[str, np.ndarray]:
    """A pink textured blob with a darker fold and pale fat on glass that darkens to the right, crossed by
    ink (a blue stroke, a green stroke and a black dot on the glass) and a grey air-bubble rim."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    image = np.full((H, W, 3), 240.0, np.float32) - (20.0 * xx / W)[..., None]  # illumination gradient
    blob = ((xx - 150) / 90.0) ** 2 + ((yy - 125) / 75.0) ** 2 < 1
    texture = rng.normal(0, 15, (H, W, 1)) * np.array([0.3, 1.0, 0.6])
    image[blob] = (np.array([225.0, 140.0, 190.0]) + texture)[blob]
    fold = blob & (np.abs(xx - 130 - 0.3 * (yy - 125)) < 6)
    image[fold] *= 0.6
    fat = (((xx - 235) / 30.0) ** 2 + ((yy - 140) / 25.0) ** 2 < 1) & ~blob
    image[fat] = (242, 226, 234)  # faint pink, barely off the glass: still tissue
    pen = (np.abs(yy - 30 - 0.08 * xx) < 4) & (xx > 20) & (xx < 300)
    image[pen] = (40, 70, 190)
    green = (np.abs(xx - 300) < 3) & (yy > 150) & (yy < 230)
    image[green] = (40, 150, 60)
    dot = (xx - 30) ** 2 + (yy - 210) ** 2 < 64
    image[dot] = 20
    rim = np.abs(np.hypot(xx - 40, yy - 120) - 18) < 1.2
    image[rim] -= 50
    image += rng.normal(0, 3, image.shape)
    rgb = cv2.GaussianBlur(np.clip(image, 0, 255).astype(np.uint8), (3, 3), 0)
    return {"rgb": rgb, "tissue": blob | fat, "blob": blob, "fat": fat, "ink": pen | green | dot}


# darkness cannot see the drawn fat (as bright as the darker glass beside it): otsu_gray is scored on the blob
@pytest.mark.parametrize("method, truth", [("otsu_saturation", "tissue"), ("otsu_gray", "blob")])
def test_finds_the_drawn_tissue_and_leaves_out_ink(method, truth):
    slide = drawn_slide()
    found = detect_tissue_image(slide["rgb"], DS, MPP, method=method)
    assert found.mask.shape == (H, W) and found.mask.dtype == bool and found.downsample == DS
    assert iou(found.mask, slide[truth]) > 0.9
    off_tissue_ink = slide["ink"] & ~slide["blob"]
    assert not (found.mask & off_tissue_ink).any()
    # ink crossing tissue is cut out of it too
    assert not (found.mask & slide["ink"]).any()


def test_saturation_keeps_pale_fat_that_touches_tissue():
    slide = drawn_slide(seed=1)
    found = detect_tissue_image(slide["rgb"], DS, MPP)
    assert iou(found.mask, slide["tissue"]) > 0.9
    assert found.mask[slide["fat"]].mean() > 0.9


def test_textured_fat_joins_tissue_it_touches_only():
    """Fat as faint grey membranes on glass: no colour, so only its texture tells it from the glass."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:H, 0:W]
    rgb = np.full((H, W, 3), 236.0, np.float32)
    blob = ((xx - 110) / 70.0) ** 2 + ((yy - 120) / 60.0) ** 2 < 1
    rgb[blob] = (215, 130, 180)
    attached = ((xx - 185) ** 2 + (yy - 120) ** 2 < 35**2) & ~blob
    alone = (xx - 275) ** 2 + (yy - 50) ** 2 < 30**2
    membranes = (xx % 6 == 0) | (yy % 6 == 0)
    rgb[(attached | alone) & membranes] = 222
    rgb = np.clip(rgb + rng.normal(0, 1.5, rgb.shape), 0, 255).astype(np.uint8)
    found = detect_tissue_image(rgb, DS, MPP).mask
    assert found[attached].mean() > 0.85 and found[blob].mean() > 0.98
    assert not found[alone].any()  # texture alone never seeds tissue
    assert found[~(blob | attached)].mean() < 0.001
    no_texture = detect_tissue_image(rgb, DS, MPP, min_texture=1e6).mask
    assert no_texture[attached].mean() < 0.3


def test_pen_rules_split_ink_from_stains():
    colours = {
        "blue ink": ((40, 70, 190), True),
        "deep blue ink": ((40, 40, 200), True),
        "green ink": ((40, 150, 60), True),
        "black ink": ((20, 20, 25), True),
        "eosin": ((230, 120, 180), False),
        "hematoxylin": ((57, 51, 131), False),
        "dark fold": ((120, 40, 100), False),
        "glass": ((240, 240, 240), False),
        "pale fat": ((242, 226, 234), False),
    }
    rgb = np.array([[c for c, _ in colours.values()]], np.uint8)
    assert pen_mask(rgb)[0].tolist() == [ink for _, ink in colours.values()]


@pytest.mark.parametrize("value, noise", [(255, 0), (236, 2)])
def test_blank_glass_has_no_tissue(value, noise):
    rng = np.random.default_rng(0)
    rgb = np.clip(value + rng.normal(0, noise, (H, W, 3)), 0, 255).astype(np.uint8) if noise else None
    rgb = np.full((H, W, 3), value, np.uint8) if rgb is None else rgb
    with pytest.raises(SlideError, match="no tissue found in blank.svs") as err:
        detect_tissue_image(rgb, DS, MPP, source="blank.svs")
    assert "tissue.method=otsu_gray" in str(err.value)


def test_sizes_in_micrometres_follow_mpp_and_pixels_without_it():
    rgb = np.full((H, W, 3), 240, np.uint8)
    cv2.circle(rgb, (120, 120), 60, (200, 100, 170), -1)  # ~11300 px
    cv2.rectangle(rgb, (260, 20), (271, 31), (200, 100, 170), -1)  # a 12x12 speck: 144 px
    speck, core = (slice(20, 32), slice(260, 272)), (slice(23, 29), slice(263, 269))  # (blur rounds corners)
    # at 8 um/px the speck is at most 9216 um^2
    assert not detect_tissue_image(rgb, DS, MPP, min_object_um2=10_000).mask[speck].any()
    assert detect_tissue_image(rgb, DS, MPP, min_object_um2=5_000).mask[core].all()
    # without an mpp the *_px sizes rule, whatever the micrometre ones say
    assert not detect_tissue_image(rgb, DS, None, min_object_px=200, min_object_um2=0).mask[speck].any()
    assert detect_tissue_image(rgb, DS, None, min_object_px=100, min_object_um2=1e9).mask[core].all()


def test_small_holes_are_filled_and_large_ones_kept():
    rgb = np.full((H, W, 3), 240, np.uint8)
    cv2.rectangle(rgb, (20, 20), (300, 220), (200, 100, 170), -1)
    cv2.rectangle(rgb, (50, 50), (59, 59), (240, 240, 240), -1)  # 100 px = 6400 um^2
    cv2.rectangle(rgb, (150, 80), (229, 159), (240, 240, 240), -1)  # 6400 px
    found = detect_tissue_image(rgb, DS, MPP, min_hole_um2=20_000).mask
    assert found[50:60, 50:60].all()
    assert not found[90:150, 160:220].any()


def test_bad_requests_are_reported():
    rgb = drawn_slide()["rgb"]
    with pytest.raises(ConfigError, match="tissue.method='otsu'"):
        detect_tissue_image(rgb, DS, MPP, method="otsu")
    with pytest.raises(SlideError, match="HxWx3 uint8"):
        detect_tissue_image(rgb.astype(np.float32), DS, MPP)


def test_fractions_are_exact_area_integrals():
    rng = np.random.default_rng(0)
    mask = rng.random((12, 9)) < 0.4
    tissue = TissueMask(mask, downsample=10.0)
    level0 = np.kron(mask, np.ones((10, 10), bool))  # the same mask at level 0
    coords = np.concatenate([rng.integers(-40, 120, (200, 2)), [[0, 0], [85, 115], [-500, -500]]])
    sizes = [7, 10, 33]
    for size0 in sizes:
        got = tissue.fractions(coords, size0)
        want = []
        for x, y in coords:
            window = level0[max(y, 0) : max(y + size0, 0), max(x, 0) : max(x + size0, 0)]
            want.append(window.sum() / size0**2)  # outside the slide counts as no tissue
        np.testing.assert_allclose(got, want, atol=1e-9)
    assert tissue.fractions(np.empty((0, 2)), 10).shape == (0,)


def test_fractions_of_a_half_covered_tile():
    tissue = TissueMask(np.array([[True, False], [True, False]]), downsample=4.0)
    # a 4-px tile straddling the boundary between the tissue column and the glass column
    np.testing.assert_allclose(tissue.fractions(np.array([[2, 0], [0, 2], [5, 0]]), 4), [0.5, 1.0, 0.0])


@pytest.mark.parametrize("name", ["mask.png", "mask.npz"])
def test_mask_file_round_trip(tmp_path, name):
    mask = np.zeros((30, 40), bool)
    mask[5:20, 10:33] = True
    path = tmp_path / "cache" / name
    TissueMask(mask, 12.345678901).save(path)
    loaded = TissueMask.load(path)
    np.testing.assert_array_equal(loaded.mask, mask)
    assert loaded.downsample == 12.345678901
    assert sorted(p.name for p in path.parent.iterdir()) == [name]  # no temp files left behind


def test_mask_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"\.png or \.npz"):
        TissueMask(np.ones((2, 2), bool), 1.0).save(tmp_path / "mask.tif")
    bad = tmp_path / "mask.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(SlideError, match="delete it"):
        TissueMask.load(bad)
    plain = tmp_path / "plain.png"
    cv2.imwrite(str(plain), np.zeros((4, 4), np.uint8))  # a PNG without our downsample
    with pytest.raises(SlideError, match="plain.png"):
        TissueMask.load(plain)
    with pytest.raises(SlideError, match="missing.npz"):
        TissueMask.load(tmp_path / "missing.npz")


def test_real_slide_tissue(shared):
    from patholite.wsi.reader import open_slide

    with open_slide(shared / "data" / "slides" / "CMU-1-Small-Region.svs") as slide:
        found = detect_tissue(slide, max_side=1024)
        width, height = slide.dimensions
    assert max(found.mask.shape) == 1024
    assert abs(found.mask.shape[0] * found.downsample - height) <= found.downsample
    assert abs(found.mask.shape[1] * found.downsample - width) <= found.downsample
    assert 0.25 < found.tissue_share < 0.55  # a strip of skin down the middle of the glass
    # glass left of the strip, and the middle of the strip
    shares = found.fractions(np.array([[0, 1200], [1100, 1500]]), 300)
    np.testing.assert_allclose(shares, [0.0, 1.0], atol=0.02)
