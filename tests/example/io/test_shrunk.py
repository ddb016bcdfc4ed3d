"""madlab.io.shrunk: photos read shrunk, in uint8, with points mapped back to full resolution.

The expected pixels are numpy's block means of the array the file was made from; the expected
points are where a bright square was drawn in the upright photo, never the code under test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from madlab.io.pixels import UnreadableImageError
from madlab.io.shrunk import ShrunkImage, load_rgb8
from PIL import Image


def blocks(pixels: np.ndarray, k: int) -> np.ndarray:
    h, w = pixels.shape[0] // k, pixels.shape[1] // k
    return pixels[: h * k, : w * k].reshape(h, k, w, k, -1).astype(np.float64).mean(axis=(1, 3))


def test_a_png_is_box_reduced_to_numpys_block_means(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image = load_rgb8(tmp_path / "a.png", factor=4)
    assert image.factor == 4 and image.pixels.shape == (16, 24, 3) and image.pixels.dtype == np.uint8
    assert np.abs(image.pixels - blocks(pixels, 4)).max() <= 0.5 + 1e-9  # rounding only
    whole = load_rgb8(tmp_path / "a.png")
    assert whole.factor == 1 and (whole.pixels == pixels).all()


def test_a_large_jpeg_is_shrunk_in_the_decoder_to_the_longest_side_asked_for(tmp_path: Path) -> None:
    y, x = np.mgrid[0:3000, 0:4000]
    pixels = np.stack([x * 255 // 4000, y * 255 // 3000, (x + y) * 255 // 7000], axis=2).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=95)
    image = load_rgb8(tmp_path / "big.jpg", longest=640)  # 4000 // 640 = 6: the decoder's 1/4, not more
    assert image.factor == 4 and image.pixels.shape == (750, 1000, 3)
    assert np.abs(image.pixels - blocks(pixels, 4)).mean() < 1.5
    assert load_rgb8(tmp_path / "big.jpg", longest=640, factor=2).factor == 2  # both bounds hold


# How a photo is stored for each EXIF orientation so that, turned upright, it is the given array.
STORED = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1],
          6: lambda a: np.rot90(a, 1), 8: lambda a: np.rot90(a, -1)}


@pytest.mark.parametrize("orientation", sorted(STORED))
@pytest.mark.parametrize("shape", [(1200, 1600), (1203, 1601)], ids=["sides divisible by 8", "odd sides"])
def test_points_map_back_to_the_upright_full_photo(tmp_path: Path, orientation: int, shape) -> None:
    upright = np.zeros((*shape, 3), np.uint8)
    centre = np.array([1234.5, 345.5])  # x, y of a 32 x 32 white square's centre
    upright[330:362, 1219:1251] = 255
    stored = Image.fromarray(np.ascontiguousarray(STORED[orientation](upright)))
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "p.jpg", quality=95, exif=exif)
    image = load_rgb8(tmp_path / "p.jpg", factor=8)
    grey = image.pixels.astype(np.float64).mean(axis=2)
    assert grey.shape[0] * image.factor == pytest.approx(shape[0], abs=image.factor)
    ys, xs = np.mgrid[0:grey.shape[0], 0:grey.shape[1]]
    found = np.array([(grey * xs).sum(), (grey * ys).sum()]) / grey.sum()
    assert np.abs(image.full_coordinates(found[None])[0] - centre).max() < 1.0
    np.testing.assert_allclose(image.coordinates(image.full_coordinates(found[None])), found[None], atol=1e-9)


def test_a_box_reads_the_same_pixels_as_the_whole_photo_there(tmp_path: Path) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (300, 500, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    whole = load_rgb8(tmp_path / "a.png", factor=3)
    part = load_rgb8(tmp_path / "a.png", factor=3, box=(101.2, 50.0, 250.7, 199.9))
    (x0, y0), (h, w) = part.origin, part.pixels.shape[:2]
    assert part.factor == 3 and (part.pixels == whole.pixels[y0:y0 + h, x0:x0 + w]).all()
    left, top = part.full_coordinates([[0, 0]])[0]
    right, bottom = part.full_coordinates([[w - 1, h - 1]])[0]
    assert left <= 101.2 - 3 and top <= 50.0 - 3 and right >= 250.7 + 3 and bottom >= 199.9 + 3
    outside = load_rgb8(tmp_path / "a.png", factor=3, box=(-900, -900, -800, -800))  # still one block
    assert outside.pixels.size > 0 and outside.origin == (0, 0)


def test_sixteen_bit_grey_keeps_its_level_in_eight_bits(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 6), 32896, dtype=np.uint16)).save(tmp_path / "g.png")  # 32896 = 128 * 257
    assert (load_rgb8(tmp_path / "g.png").pixels == 128).all()


def test_an_unreadable_file_says_why(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"not an image at all")
    with pytest.raises(UnreadableImageError, match="not an image"):
        load_rgb8(tmp_path / "x.jpg", longest=640)


def test_an_image_in_memory_maps_points_unchanged() -> None:
    image = ShrunkImage(np.zeros((4, 4, 3), np.uint8))
    points = np.array([[0.1, 2.7]])
    assert (image.full_coordinates(points) == points).all() and (image.coordinates(points) == points).all()


def test_a_photo_too_large_for_the_memory_left_is_refused_with_its_own_status(tmp_path: Path, monkeypatch) -> None:
    from PIL import ImageFile

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.jpg")

    def out_of_memory(self):
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", out_of_memory)
    with pytest.raises(UnreadableImageError, match="too large to decode in the memory available"):
        load_rgb8(tmp_path / "a.jpg")
