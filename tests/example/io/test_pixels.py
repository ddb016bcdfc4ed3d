"""madlab.io.pixels: odd image files are converted to the same RGB pixels, broken ones refused with a reason.

Every file is made here with Pillow (or by hand, for headers Pillow will not write); the
expected pixels come from an independent reading of the same content (the array the file was
made from, rotated or converted by numpy), never from the code under test.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from madlab.data.images import resize_pixels
from madlab.io.pixels import (
    UNREADABLE,
    UnreadableImageError,
    find_images,
    image_suffixes,
    load_pixels,
    unsupported_format,
)
from PIL import Image


def rgb(seed: int = 0, shape: tuple[int, int] = (10, 14)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def png_chunks(width: int, height: int, bit_depth: int, colour: int, rows: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_grey_and_colour_take_the_same_three_channel_path(tmp_path: Path) -> None:
    grey = np.random.default_rng(1).integers(0, 256, (9, 11), dtype=np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(tmp_path / "colour.png")
    a, label_a = load_pixels(tmp_path / "grey.png")
    b, label_b = load_pixels(tmp_path / "colour.png")
    assert a.shape == b.shape == (9, 11, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[..., 0], grey / np.float32(255))
    assert (label_a, label_b) == ("L", None)
    assert (resize_pixels(a, 8) == resize_pixels(b, 8)).all()


def test_cmyk_jpeg_is_converted(tmp_path: Path) -> None:
    cmyk = np.zeros((8, 8, 4), dtype=np.uint8)
    cmyk[..., 0] = 255  # full cyan, nothing else: R = 0, G = B = 255
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.jpg", quality=100)
    pixels, label = load_pixels(tmp_path / "c.jpg")
    assert label == "CMYK" and pixels.shape == (8, 8, 3)
    np.testing.assert_allclose(pixels.mean(axis=(0, 1)), [0, 1, 1], atol=0.03)


def test_sixteen_bit_grey_png_keeps_its_level(tmp_path: Path) -> None:
    levels = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16).repeat(3, 0)
    Image.fromarray(levels).save(tmp_path / "g16.png")
    pixels, _ = load_pixels(tmp_path / "g16.png")
    np.testing.assert_allclose(pixels[..., 1], levels / 65535.0, atol=1e-6)


def test_sixteen_bit_rgb_png_is_read(tmp_path: Path) -> None:
    rows = b"".join(b"\x00" + np.full((4, 3), 0xC000, dtype=">u2").tobytes() for _ in range(4))
    (tmp_path / "rgb16.png").write_bytes(png_chunks(4, 4, 16, 2, rows))
    pixels, _ = load_pixels(tmp_path / "rgb16.png")
    np.testing.assert_allclose(pixels, 0xC0 / 255, atol=1 / 255)


def test_palette_with_transparency_and_rgba_keep_their_colours(tmp_path: Path) -> None:
    palette = Image.new("P", (4, 4))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putdata([0, 1] * 8)
    palette.info["transparency"] = 1
    palette.save(tmp_path / "p.png", transparency=1)
    pixels, label = load_pixels(tmp_path / "p.png")
    assert label == "P"
    expected = np.array([[1, 0, 0], [0, 0, 1]] * 8, dtype=np.float32).reshape(4, 4, 3)
    np.testing.assert_array_equal(pixels, expected)  # alpha dropped, colour under it kept
    rgba = np.concatenate([rgb(2, (5, 5)), np.full((5, 5, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    pixels, label = load_pixels(tmp_path / "a.png")
    assert label == "RGBA"
    np.testing.assert_array_equal(pixels, rgba[..., :3] / np.float32(255))


def test_exif_rotated_jpeg_is_turned_upright(tmp_path: Path) -> None:
    upright = np.zeros((12, 20, 3), dtype=np.uint8)  # wide: 12 rows, 20 columns
    upright[:, :10] = 255  # left half white
    stored = np.rot90(upright, k=1)  # as a camera held sideways stores it (20 x 12)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(np.ascontiguousarray(stored)).save(tmp_path / "r.jpg", exif=exif, quality=100)
    pixels, label = load_pixels(tmp_path / "r.jpg")
    assert label == "EXIF-rotated"
    assert pixels.shape == (12, 20, 3)
    np.testing.assert_allclose(pixels, upright / 255.0, atol=0.1)


def test_animated_image_gives_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.fromarray(np.full((6, 6, 3), v, np.uint8)) for v in (200, 30, 90)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    pixels, label = load_pixels(tmp_path / "a.gif")
    assert label == "animated (first frame)"
    np.testing.assert_allclose(pixels, 200 / 255, atol=2 / 255)


def test_decompression_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    # 40000 x 40000 declared over 64 bytes of data: decoding would need 4.8 GB; the header alone refuses it.
    (tmp_path / "bomb.png").write_bytes(png_chunks(40000, 40000, 8, 2, b"\x00" * 64))
    with pytest.raises(UnreadableImageError) as err:
        load_pixels(tmp_path / "bomb.png")
    assert err.value.status == UNREADABLE["bomb"]


@pytest.mark.parametrize(("make", "status"), [
    (lambda p: p.write_bytes(b""), UNREADABLE["empty"]),
    (lambda p: p.write_text("a text file named like an image"), UNREADABLE["not_image"]),
    (lambda p: p.write_bytes(Image.fromarray(rgb(3, (64, 64))).tobytes()[:10]), UNREADABLE["not_image"]),
    (lambda p: p.symlink_to(p), UNREADABLE["loop"]),
    (lambda p: None, UNREADABLE["missing"]),
    (lambda p: p.mkdir(), UNREADABLE["not_file"]),
])
def test_broken_files_are_refused_with_a_short_reason(tmp_path: Path, make, status: str) -> None:
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(UnreadableImageError) as err:
        load_pixels(path)
    assert err.value.status == status and str(path) in str(err.value)


def test_truncated_image_is_refused(tmp_path: Path) -> None:
    Image.fromarray(rgb(4, (64, 64))).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImageError) as err:
        load_pixels(tmp_path / "t.png")
    assert err.value.status == UNREADABLE["corrupt"]


def test_every_format_pillow_opens_is_an_image_suffix() -> None:
    suffixes = image_suffixes()
    assert {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"} <= suffixes
    assert ".txt" not in suffixes and ".csv" not in suffixes


def test_pixel_loading_is_a_leaf_and_data_does_not_import_images() -> None:
    """One-way imports: pixels <- data <- images; no module __getattr__ shim in data."""
    import subprocess

    code = ("import sys; sys.path.insert(0, 'examples'); import madlab.data.samples, madlab.io.pixels;"
            " print(sorted(m for m in sys.modules if m.startswith('madlab.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[3]).stdout
    assert "madlab.data.images" not in loaded and "madlab.io.pixels" in loaded
    import madlab.data.samples
    import madlab.io.pixels

    assert not hasattr(madlab.data.samples, "__getattr__")
    source = Path(madlab.io.pixels.__file__).read_text()
    assert [line for line in source.splitlines() if line.startswith("from .")] == ["from .errors import MadlabError"]


def test_every_file_is_listed_whatever_its_name_and_what_is_no_file_is_not_opened(tmp_path: Path) -> None:
    Image.fromarray(rgb()).save(tmp_path / "a.bmp")
    Image.fromarray(rgb()).save(tmp_path / "b", format="PNG")  # no extension: its bytes say PNG
    (tmp_path / "c.txt").write_text("notes")
    os.mkfifo(tmp_path / "d.jpg")
    (tmp_path / "e.png").symlink_to("/dev/null")
    (tmp_path / "f.png").symlink_to(tmp_path / "gone.png")
    found = {path.name: status for path, status in find_images(tmp_path)}
    assert found == {"a.bmp": None, "b": None, "c.txt": None, "d.jpg": UNREADABLE["not_file"],
                     "e.png": UNREADABLE["not_file"], "f.png": "broken symlink"}
    assert load_pixels(tmp_path / "b")[0].shape == (10, 14, 3)
    with pytest.raises(UnreadableImageError) as err:
        load_pixels(tmp_path / "d.jpg")  # refused from its stat, before any open
    assert err.value.status == UNREADABLE["not_file"]


@pytest.mark.parametrize(("head", "name"), [
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIC"),
    (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1", "AVIF"),
    (b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1heic", "HEIF"),
    (b"\xff\x0a\xfa\x7f", "JPEG XL"),
    (b"\x00\x00\x00\x18ftypisom\x00\x00\x00\x00", None),  # an MP4 video: not an image format
    (b"plain text", None),
])
def test_image_formats_without_a_decoder_are_named(tmp_path: Path, head: bytes, name: str | None) -> None:
    path = tmp_path / "photo"
    path.write_bytes(head + bytes(64))
    assert unsupported_format(path) == name
    if Image.registered_extensions().get(".avif") == "AVIF" and name == "AVIF":
        return  # this Pillow decodes AVIF (the bytes above are no valid AVIF, so it fails as corrupt)
    with pytest.raises(UnreadableImageError) as err:
        load_pixels(path)
    assert err.value.status == (UNREADABLE["not_image"] if name is None else f"unreadable format ({name})")
