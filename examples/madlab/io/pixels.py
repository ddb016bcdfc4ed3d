"""Reading one image file into RGB pixels: the leaf of the data layer (imports nothing of madlab but errors).

Every image, whatever its mode, goes through :func:`load_pixels` and comes out as ``H x W x 3``
float32 in [0, 1], so grey and colour photos take the same path; the face path reads uint8
through :func:`~madlab.io.shrunk.load_rgb8`, shrunk to the size it needs. What can be read is converted rather
than refused:

* EXIF orientation is applied first (a phone photo stored on its side is turned upright);
* an animated image (GIF, APNG, WebP) gives its first frame;
* CMYK, YCbCr, LAB, HSV, 1-bit, grey, grey+alpha, palette (with or without transparency)
  and RGBA become RGB (alpha is dropped: the colour under it is kept);
* 16-bit and 32-bit grey (``I;16*``, ``I``) are scaled by 1/65535, not clipped at 255.

What cannot be read raises :class:`UnreadableImageError` with a short ``status`` that names why: an
empty file, a missing or unreadable one, a symlink loop, anything but a regular file (a FIFO or
a device, refused from its ``stat`` and never opened), a file that is no image, an image in a
format Pillow has no decoder for here (HEIC, HEIF, AVIF, JPEG XL: named from its first bytes), a
truncated or corrupt one, and a decompression bomb, which is refused from its header (Pillow
checks the declared size when the file is opened, before a pixel is decoded).

Whether a file is an image is decided by its content alone, never by its name: every command
reads whatever Pillow opens.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import MadlabError

__all__ = [
    "UNREADABLE",
    "RejectedImageError",
    "UnreadableImageError",
    "eight_bit",
    "find_images",
    "image_suffixes",
    "is_turned",
    "load_pixels",
    "mode_label",
    "opened_image",
    "unsupported_format",
]

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # scaled by 1/65535 (PNG stores 16 bits at most)
_PLAIN = {"RGB"}

# Short reasons, one per way a file can fail; they are the ``status`` column of predict's CSV
# and the keys of the skip counts that train and test print.
UNREADABLE = {
    "missing": "file not found",
    "empty": "empty file (0 bytes)",
    "permission": "unreadable (permission denied)",
    "loop": "symlink loop",
    "not_file": "not a regular file",
    "not_image": "not an image",
    "format": "unreadable format",  # completed by the format's name: "unreadable format (HEIC)"
    "corrupt": "truncated or corrupt image",
    "bomb": "image too large (over Pillow's decompression-bomb limit of 2 x Image.MAX_IMAGE_PIXELS)",
    "memory": "image too large to decode in the memory available",
}


class RejectedImageError(MadlabError):
    """One image that cannot be scored; ``status`` is the short reason (a CSV cell).

    A per-image preprocessing step (e.g. a face detector that finds no face) raises this too,
    so that the image gets its own row with that status and the run goes on.
    """

    def __init__(self, path: str, status: str, detail: str = "") -> None:
        super().__init__(f"{path}: {status}{f' ({detail})' if detail else ''}")
        self.path, self.status, self.detail = path, status, detail


class UnreadableImageError(RejectedImageError):
    """A file that is not a decodable image (see :data:`UNREADABLE` for the statuses)."""


def image_suffixes() -> frozenset[str]:
    """Every file extension Pillow can open here (``.jpg``, ``.png``, ``.webp``, ``.tif``, ...), lower case."""
    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _check_file(path: Path) -> None:
    """Refuse before opening what cannot hold an image: missing, looping, unreadable or empty files,
    and anything but a regular file (opening a FIFO would wait for a writer forever)."""
    try:
        info = path.stat()  # follows links: a loop fails here with ELOOP
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnreadableImageError(str(path), UNREADABLE["loop"]) from None
        if err.errno in (errno.EACCES, errno.EPERM):
            raise UnreadableImageError(str(path), UNREADABLE["permission"]) from None
        raise UnreadableImageError(str(path), UNREADABLE["missing"]) from None
    if not stat.S_ISREG(info.st_mode):
        raise UnreadableImageError(str(path), UNREADABLE["not_file"])
    if info.st_size == 0:
        raise UnreadableImageError(str(path), UNREADABLE["empty"])
    if not os.access(path, os.R_OK):
        raise UnreadableImageError(str(path), UNREADABLE["permission"])


def is_turned(img: Image.Image) -> bool:
    """Whether ``img``'s EXIF orientation says it is stored turned or mirrored (``exif_transpose`` would change it)."""
    return img.getexif().get(0x0112, 1) not in (1, None)  # 0x0112: the EXIF Orientation tag


def mode_label(img: Image.Image) -> str | None:
    """What :func:`load_pixels` converts in ``img``, for the report: its mode, ``animated`` or
    ``EXIF-rotated``; ``None`` for a still, upright RGB image."""
    if getattr(img, "n_frames", 1) > 1:
        return "animated (first frame)"
    if is_turned(img):
        return "EXIF-rotated"
    return None if img.mode in _PLAIN else img.mode


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in _SIXTEEN_BIT:  # convert("RGB") would clip 16-bit values at 255 (white)
        grey = np.asarray(img, dtype=np.float32) / np.float32(65535.0)
        return np.repeat(np.clip(grey, 0, 1)[..., None], 3, axis=2)
    img = eight_bit(img)
    if img.mode != "RGB":
        img = img.convert("RGB")  # grey copied to R, G, B
    return np.asarray(img, dtype=np.float32) / np.float32(255.0)


def load_pixels(path: str | os.PathLike[str], size: int | None = None) -> tuple[np.ndarray, str | None]:
    """Decode ``path`` into ``H x W x 3`` float32 RGB pixels in [0, 1].

    Images far larger than ``size`` are first shrunk by an integer box filter (JPEG: in the
    decoder), so a 50-megapixel photo never becomes a 1 GB float array.

    Args:
        path: The image file.
        size: The model's input side, or ``None`` for the full resolution.

    Returns:
        The pixels and what was converted (:func:`mode_label`), or ``None``.

    Raises:
        UnreadableImageError: If the file cannot be decoded; ``status`` says why.
    """
    with opened_image(Path(path)) as img:
        label = mode_label(img)
        img.seek(0)
        if size and img.format == "JPEG":
            img.draft("RGB", (2 * size, 2 * size))
        img.load()
        upright = ImageOps.exif_transpose(img)
        factor = min(upright.size) // (2 * size) if size else 0
        if factor >= 2 and upright.mode not in _SIXTEEN_BIT:
            upright = upright.reduce(factor)
        return _to_rgb(upright), label


def eight_bit(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit grey (``L``) or ``RGB``: the modes ``reduce`` takes and uint8 holds."""
    if img.mode in _SIXTEEN_BIT:  # convert("L") would clip 16-bit values at 255: scale them instead
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        return Image.fromarray(((wide + 128) // 257).astype(np.uint8))
    if img.mode in ("L", "RGB"):
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow wants palette transparency expanded first
    return img.convert("RGB")  # CMYK/YCbCr/LAB/HSV: Pillow's conversions; LA, 1: grey copied to R, G, B


@contextmanager
def opened_image(path: Path) -> Iterator[Image.Image]:
    """``Image.open(path)``, with every way of failing turned into :class:`UnreadableImageError`."""
    _check_file(path)
    try:
        with Image.open(path) as img:  # checks the header's size against the bomb limit
            yield img
    except Image.DecompressionBombError:
        raise UnreadableImageError(str(path), UNREADABLE["bomb"]) from None
    except MemoryError:  # one photo too large for this machine costs its own row, not the run
        raise UnreadableImageError(str(path), UNREADABLE["memory"]) from None
    except UnidentifiedImageError:
        known = unsupported_format(path)
        status = UNREADABLE["not_image"] if known is None else f"{UNREADABLE['format']} ({known})"
        raise UnreadableImageError(str(path), status) from None
    except PermissionError:
        raise UnreadableImageError(str(path), UNREADABLE["permission"]) from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # truncated data, broken chunks
        raise UnreadableImageError(str(path), UNREADABLE["corrupt"], type(err).__name__) from None


# Image formats Pillow has no decoder for here, told apart by their first bytes so that a phone's
# HEIC photo is reported as an image that cannot be read rather than as "not an image".
_BMFF_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"heim": "HEIC", b"heis": "HEIC", b"hevc": "HEIC",
                b"hevx": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}
_JXL_MAGIC = (b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")


def unsupported_format(path: str | os.PathLike[str]) -> str | None:
    """The name of the image format ``path`` holds if it is one Pillow cannot decode here
    (``HEIC``, ``HEIF``, ``AVIF``, ``JPEG XL``), read from its first bytes; else ``None``."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError:
        return None
    if head[4:8] == b"ftyp" and head[8:12] in _BMFF_BRANDS:
        return _BMFF_BRANDS[head[8:12]]
    return "JPEG XL" if head.startswith(_JXL_MAGIC) else None


def find_images(folder: Path) -> list[tuple[Path, str | None]]:
    """Every file under ``folder``, sorted by name within each folder, following links to folders.

    Whether a file is an image is decided by reading it, not by its name, so every file is
    listed. What is no regular file (a FIFO, a socket, a device) is listed with the status
    ``not a regular file`` and never opened; a folder reached again through a link (a symlink
    loop) is not searched twice but listed with the status ``symlink loop``, as is a link that
    loops on itself; a dangling link is listed as ``broken symlink``, a folder that cannot be
    listed as ``unreadable (permission denied)``.

    Returns:
        ``(path, status)`` pairs; ``status`` is ``None`` for a file to be read (reading it may
        still fail, with its own reason).
    """
    found: list[tuple[Path, str | None]] = []
    seen: set[tuple[int, int]] = set()

    def visit(directory: Path) -> None:
        info = directory.stat()
        if (info.st_dev, info.st_ino) in seen:
            found.append((directory, UNREADABLE["loop"]))
            return
        seen.add((info.st_dev, info.st_ino))
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            found.append((directory, UNREADABLE["permission"]))
            return
        for entry in entries:
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir()  # follows links
            except OSError:
                is_dir = False
            if is_dir:
                visit(path)
            else:
                found.append((path, _entry_status(path)))

    visit(Path(folder))
    return found


def _entry_status(path: Path) -> str | None:
    """``None`` for a regular file (links followed), else why it is no file to read; nothing is opened."""
    try:
        info = path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            return UNREADABLE["loop"]
        if err.errno in (errno.EACCES, errno.EPERM):
            return UNREADABLE["permission"]
        return "broken symlink" if path.is_symlink() else UNREADABLE["missing"]
    return None if stat.S_ISREG(info.st_mode) else UNREADABLE["not_file"]
