"""Reading a photo at the size a step needs, in uint8: what keeps a huge photo's memory bounded.

Face detection looks at a few hundred pixels and a face crop needs a few photo pixels per crop
pixel, so the face path never needs a 50-megapixel photo whole. :func:`load_rgb8` decodes it
shrunk by an integer factor (a JPEG at 1/2, 1/4 or 1/8 scale inside the decoder, ``draft``;
then Pillow's box ``reduce``), optionally only the part a crop needs, and in uint8: 3 bytes a
pixel, never float. :class:`ShrunkImage` maps points between its pixels and the full-resolution
photo, where landmarks are kept (so cached detections do not depend on the size read).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .pixels import eight_bit, is_turned, opened_image

__all__ = ["ShrunkImage", "load_rgb8"]


@dataclass(frozen=True)
class ShrunkImage:
    """Pixels of a photo shrunk by ``factor``, from ``origin`` (in the shrunk image) on.

    Pixel ``(x, y)`` averages the full-resolution photo's ``factor x factor`` block whose corner is
    ``factor * (x + origin_x, y + origin_y)``: blocks are anchored at the photo's top-left corner.

    Attributes:
        pixels: ``H x W x 3`` uint8 RGB (an image held in memory: as it is, with factor 1).
        factor: The shrink factor, 1 for full resolution.
        origin: Where ``pixels`` start in the whole shrunk image (``(0, 0)`` unless a box was read).
    """

    pixels: np.ndarray
    factor: int = 1
    origin: tuple[int, int] = (0, 0)

    def full_coordinates(self, points: np.ndarray) -> np.ndarray:
        """``N x 2`` points ``(x, y)`` of :attr:`pixels` in the full photo's pixel coordinates
        (pixel centres at integers: block ``i``'s centre is ``factor * (i + 0.5) - 0.5``)."""
        points = np.asarray(points, dtype=np.float64)
        if self.factor == 1:  # the very same numbers, not rounded through +0.5 - 0.5
            return points + np.asarray(self.origin, dtype=np.float64)
        return self.factor * (points + np.asarray(self.origin) + 0.5) - 0.5

    def coordinates(self, points: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`full_coordinates`: full-resolution points in :attr:`pixels`."""
        points = np.asarray(points, dtype=np.float64)
        if self.factor == 1:
            return points - np.asarray(self.origin, dtype=np.float64)
        return (points + 0.5) / self.factor - 0.5 - np.asarray(self.origin)


def load_rgb8(path: str | os.PathLike[str], *, longest: int | None = None, factor: int | None = None,
              box: tuple[float, float, float, float] | None = None) -> ShrunkImage:
    """Decode ``path`` as uint8 RGB, shrunk by the largest integer factor within both bounds.

    EXIF orientation is applied (as :func:`~madlab.io.pixels.load_pixels` does). A turned JPEG
    whose sides are not multiples of the decoder's scale would get a partial block at its top
    or left once upright, so it is decoded at the largest scale that divides its sides.

    Args:
        path: The image file.
        longest: Keep the longer side at least this long (``None``: no such bound).
        factor: Shrink by at most this factor (``None``: no such bound).
        box: ``(left, top, right, bottom)`` in full-resolution pixels: only this part is needed
            (a crop's source); the part read covers it with 2 pixels to spare, clipped to the photo.

    Raises:
        UnreadableImageError: If the file cannot be decoded; ``status`` says why.
    """
    with opened_image(Path(path)) as img:
        img.seek(0)
        wanted = _shrink_factor(img.size, longest, factor)
        scale = _draft(img, wanted)
        img.load()
        upright = ImageOps.exif_transpose(img) if is_turned(img) else img  # a copy only when it must turn
        rest = max(1, wanted // scale)
        corner = (0, 0)
        if box is not None:
            upright, corner = _part(upright, box, scale, rest)
        eight = eight_bit(upright)
        if rest >= 2:
            eight = eight.reduce(rest)
        pixels = np.asarray(eight if eight.mode == "RGB" else eight.convert("RGB"), dtype=np.uint8)
        return ShrunkImage(np.ascontiguousarray(pixels), scale * rest, (corner[0] // rest, corner[1] // rest))


def _shrink_factor(size: tuple[int, int], longest: int | None, factor: int | None) -> int:
    """The largest integer factor within both bounds (at least 1)."""
    bounds = [factor] if factor else []
    if longest:
        bounds.append(max(size) // longest)
    return max(1, min(bounds)) if bounds else 1


def _draft(img: Image.Image, wanted: int) -> int:
    """Ask a JPEG decoder for a 1/2, 1/4 or 1/8 scale not above ``wanted``; the scale it will use."""
    if img.format != "JPEG" or wanted < 2:
        return 1
    turned = is_turned(img)
    for scale in (8, 4, 2):
        if scale <= wanted and not (turned and (img.width % scale or img.height % scale)):
            width = img.width
            drafted = img.draft(img.mode, (width // scale, img.height // scale))
            return 1 if drafted is None else round(width / drafted[1][2])  # the box is the full size / scale
    return 1


def _part(img: Image.Image, box: tuple[float, float, float, float], scale: int,
          rest: int) -> tuple[Image.Image, tuple[int, int]]:
    """The part of ``img`` (decoded at ``scale``, to be reduced by ``rest``) that covers ``box``
    (full-resolution pixels) with 2 reduced pixels to spare, cut at ``rest``-blocks so that the
    reduction's blocks are the whole photo's blocks; and its corner in ``img``."""
    spare = 2 * rest
    left, top, right, bottom = (v / scale for v in box)
    x0 = max(0, min(math.floor(left) - spare, img.width - 1)) // rest * rest
    y0 = max(0, min(math.floor(top) - spare, img.height - 1)) // rest * rest
    x1 = min(img.width, -(-max(math.ceil(right) + spare, x0 + rest) // rest) * rest)  # whole blocks, as the photo's
    y1 = min(img.height, -(-max(math.ceil(bottom) + spare, y0 + rest) // rest) * rest)
    return img.crop((x0, y0, x1, y1)), (x0, y0)
