"""read_rgb: every storage with an RGB meaning converts with the right pixel values; the rest is refused."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from patholite.data.images import read_rgb
from patholite.errors import DatasetError


def _save(tmp_path, name, img: Image.Image, **kw) -> str:
    path = tmp_path / name
    img.save(path, **kw)
    return str(path)


def _check(a: np.ndarray, shape: tuple[int, int]) -> None:
    assert a.dtype == np.uint8 and a.shape == (*shape, 3)
    assert a.flags.writeable and a.flags.c_contiguous


def test_rgb_jpeg_and_png_pass_through(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    a = read_rgb(_save(tmp_path, "x.png", Image.fromarray(rgb)))
    _check(a, (6, 5))
    np.testing.assert_array_equal(a, rgb)
    _check(read_rgb(_save(tmp_path, "x.jpg", Image.fromarray(rgb))), (6, 5))


def test_grayscale_becomes_three_equal_channels(tmp_path):
    a = read_rgb(_save(tmp_path, "g.png", Image.new("L", (4, 3), 77)))
    _check(a, (3, 4))
    assert (a == 77).all()
    b = read_rgb(_save(tmp_path, "b.png", Image.new("1", (4, 3), 1)))
    assert (b == 255).all()


def test_rgba_and_la_are_composited_on_white(tmp_path):
    a = read_rgb(_save(tmp_path, "a.png", Image.new("RGBA", (2, 2), (255, 0, 0, 128))))
    assert a[0, 0].tolist() == [255, 127, 127]
    opaque = read_rgb(_save(tmp_path, "o.png", Image.new("RGBA", (2, 2), (10, 20, 30, 255))))
    assert opaque[0, 0].tolist() == [10, 20, 30]
    la = np.zeros((2, 2, 2), np.uint8)
    la[0, 0] = (100, 255)  # opaque gray 100; the rest fully transparent
    b = read_rgb(_save(tmp_path, "la.png", Image.fromarray(la, mode="LA")))
    assert b[0, 0].tolist() == [100, 100, 100] and b[1, 1].tolist() == [255, 255, 255]


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    img.putpixel((1, 0), 1)
    a = read_rgb(_save(tmp_path, "p.png", img, transparency=0))
    assert a[0, 0].tolist() == [255, 255, 255]  # index 0 is transparent -> white
    assert a[0, 1].tolist() == [200, 10, 10]


def test_cmyk_converts(tmp_path):
    a = read_rgb(_save(tmp_path, "c.tif", Image.new("CMYK", (3, 3), (255, 0, 0, 0))))
    assert a[0, 0].tolist() == [0, 255, 255]  # pure cyan
    path = tmp_path / "c16.tif"  # 16-bit CMYK: PIL cannot, tifffile can
    tifffile.imwrite(path, np.full((3, 3, 4), [0, 65535, 0, 0], np.uint16), photometric="separated")
    assert read_rgb(str(path))[0, 0].tolist() == [255, 0, 255]


def test_16_bit_scaled_by_dtype_range(tmp_path):
    gray = np.array([[0, 32768, 65535]], np.uint16)
    a = read_rgb(_save(tmp_path, "g16.png", Image.fromarray(gray)))
    assert a[0, :, 0].tolist() == [0, 128, 255]
    path = tmp_path / "rgb16.tif"
    tifffile.imwrite(path, np.full((4, 4, 3), [65535, 32768, 0], np.uint16), photometric="rgb")
    assert read_rgb(str(path))[0, 0].tolist() == [255, 128, 0]
    planar = tmp_path / "planar16.tif"
    tifffile.imwrite(
        planar, np.zeros((3, 4, 5), np.uint16) + 65535, photometric="rgb", planarconfig="separate"
    )
    p = read_rgb(str(planar))
    _check(p, (4, 5))
    assert (p == 255).all()
    rgba16 = tmp_path / "rgba16.tif"
    tifffile.imwrite(
        rgba16, np.full((2, 2, 4), [0, 0, 0, 0], np.uint16), photometric="rgb", extrasamples=["unassalpha"]
    )
    assert read_rgb(str(rgba16))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize(
    ("name", "write", "words"),
    [
        ("float.tif", lambda p: tifffile.imwrite(p, np.zeros((4, 4), np.float32)), "floating-point"),
        (
            "five.tif",
            lambda p: tifffile.imwrite(
                p, np.zeros((4, 4, 5), np.uint8), photometric="minisblack", planarconfig="contig"
            ),
            "5 channels",
        ),
        (
            "pages.tif",
            lambda p: tifffile.imwrite(p, np.zeros((3, 4, 4), np.uint8), photometric="minisblack"),
            "3 frames",
        ),
        ("int32.tif", lambda p: Image.fromarray(np.full((2, 2), 70000, np.int32)).save(p), "16-bit range"),
        ("text.jpg", lambda p: p.write_text("not an image"), "not an image format"),
        ("empty.png", lambda p: p.write_bytes(b""), "not an image format"),
    ],
)
def test_refuses_what_has_no_rgb_meaning(tmp_path, name, write, words):
    path = tmp_path / name
    write(path)
    with pytest.raises(DatasetError, match=words) as err:
        read_rgb(str(path))
    assert str(path) in str(err.value)


def test_truncated_files_are_refused_with_the_path(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for name in ("t.jpg", "t.tif", "t.png"):
        path = tmp_path / name
        Image.fromarray(rgb).save(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(DatasetError, match="download it again|truncated|damaged") as err:
            read_rgb(str(path))
        assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        read_rgb(str(tmp_path / "gone.png"))


@pytest.mark.parametrize(
    "name", ["CMU-1-Small-Region.svs", "boxes.tiff", "unopenable.tiff", "unreadable.svs"]
)
def test_whole_slide_files_are_refused_as_tiles(shared, name):
    """A slide given where a tile image belongs (a user's image_folder) is refused with its path, not read."""
    path = shared / "data" / "slides" / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    with pytest.raises(DatasetError, match=name):
        read_rgb(str(path))
