"""The pixel processing made attacks share with bona fides: matching an attack to its photo's
statistics, and the augmentation both classes get.

Blending averages pixels, so a raw made attack is blurrier and flatter than its photo, and a
detector would learn "blurred = attack" and pass every sharpened morph. Two steps take these
cues away:

* :func:`match_statistics` gives an attack's face (the region its mask covers) the
  per-channel mean and standard deviation and the sharpness (variance of the Laplacian of the
  grey image, the ``sharpness`` shortcut) of the same region of the photo it was made from,
  as morphing tools sharpen their morphs to their contributors' sharpness;
* :func:`matched_augment` then applies the same random colour jitter, blur or sharpening and
  JPEG compression to **both** classes, so neither is marked by its processing.

Every attack made in training passes through both, so they run on each training item:
filters are OpenCV's and region statistics are dot products with the region's indicator
(numpy's reductions over a 3-wide axis and boolean gathers cost several times more at the
image sizes a ViT takes). Images are ``H x W x 3`` float32 in [0, 1].
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.shortcuts import laplacian

__all__ = ["blur", "check_image", "colour_shift", "grey", "grey_sharpness", "is_grey", "match_statistics",
           "matched_augment", "resample", "resize", "unsharp"]

TRUNCATE = 3.0  # Gaussian kernels end at 3 sigma, so a blurred mask is exactly 0 far from the face
UNSHARP_SIGMA = 1.0
MATCH_ROUNDS = 3


def check_image(image: np.ndarray) -> np.ndarray:
    """``image`` as float32 (the filters run about twice as fast as in float64, and 8-bit pixels
    need nothing finer), or a ValueError unless it is ``H x W x 3`` of at least 8 x 8 pixels."""
    x = np.asarray(image, dtype=np.float32)
    if x.ndim != 3 or x.shape[2] != 3 or min(x.shape[:2]) < 8:
        raise ValueError(f"expected an H x W x 3 image of at least 8 x 8 pixels, got shape {x.shape}")
    return x


def grey(image: np.ndarray) -> np.ndarray:
    """The mean of the three channels, ``H x W``, in ``image``'s precision."""
    return (image[..., 0] + image[..., 1] + image[..., 2]) / 3


def is_grey(image: np.ndarray) -> bool:
    """Whether the three channels agree to 1e-6 everywhere."""
    return bool(np.abs(image[..., 0] - image[..., 1]).max() < 1e-6
                and np.abs(image[..., 1] - image[..., 2]).max() < 1e-6)


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur of each channel (``H x W`` or ``H x W x C``), ``sigma`` in pixels, ending at
    3 sigma, borders reflected: scipy's ``gaussian_filter(image, (sigma, sigma, 0), truncate=3)``
    to float rounding."""
    size = 2 * int(TRUNCATE * sigma + 0.5) + 1
    return cv2.GaussianBlur(np.ascontiguousarray(image), (size, size), sigmaX=sigma, sigmaY=sigma,
                            borderType=cv2.BORDER_REFLECT)


def unsharp(image: np.ndarray, amount: float, sigma: float = UNSHARP_SIGMA) -> np.ndarray:
    """``image + amount * (image - blur(image))``: sharpens for ``amount > 0``, blurs for ``-1 <= amount < 0``."""
    return image + amount * (image - blur(image, sigma))


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``image`` resampled to ``height x width`` (bilinear, antialiased when shrinking)."""
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    out = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return out[0].numpy().transpose(1, 2, 0)


def colour_shift(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Per-channel shifts (±20/255 at strength 1), brightness and contrast (±10 %); grey images stay grey."""
    shift = rng.uniform(-20 / 255, 20 / 255, size=3) * strength
    if is_grey(image):  # a channel shift would colour a grey face, a cue no real morph of it has
        shift[:] = shift.mean()
    brightness = 1.0 + rng.uniform(-0.1, 0.1) * strength
    contrast = 1.0 + rng.uniform(-0.1, 0.1) * strength
    mean = image.mean()
    return ((image - mean) * contrast + mean * brightness + shift).astype(np.float32)


def grey_sharpness(image: np.ndarray) -> float:
    """The variance of the 4-neighbour Laplacian of the grey image (interior pixels): the ``sharpness`` shortcut."""
    return float(laplacian(grey(np.asarray(image, dtype=np.float64))).var())


class _Region:
    """Means and variances over a fixed set of pixels, as dot products with its 0/1 indicator."""

    def __init__(self, inside: np.ndarray) -> None:
        self.indicator = inside.ravel().astype(np.float64)
        self.count = float(self.indicator.sum())

    def moments(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per channel mean and standard deviation over the region."""
        flat = values.reshape(self.indicator.size, -1).astype(np.float64)
        mean = self.indicator @ flat / self.count
        square = self.indicator @ (flat * flat) / self.count
        return mean, np.sqrt(np.maximum(square - mean * mean, 0.0))

    def covariance(self, a: np.ndarray, b: np.ndarray) -> float:
        """The covariance of two ``H x W`` images over the region."""
        a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
        return float(self.indicator @ (a * b) / self.count
                     - (self.indicator @ a) * (self.indicator @ b) / self.count ** 2)


def _sharpness_amount(g: np.ndarray, weighted_detail: np.ndarray, interior: _Region, target: float) -> float:
    """The unsharp amount ``k`` in [-1, 4] for which ``g + k * weighted_detail`` has the Laplacian
    variance ``target`` over the ``interior`` pixels (``g``: the grey image; ``weighted_detail``:
    the mask times the grey of ``image - blur(image)``).

    The Laplacian is linear, so that variance is a quadratic in ``k``; its root nearest 0 is
    taken (or its minimum when the target cannot be reached).
    """
    lx, ly = laplacian(g), laplacian(weighted_detail)
    a, b = interior.covariance(ly, ly), 2.0 * interior.covariance(lx, ly)
    c = interior.covariance(lx, lx) - target
    if a <= 1e-18:
        return 0.0
    disc = b * b - 4 * a * c
    if disc < 0:
        k = -b / (2 * a)
    else:
        roots = ((-b - np.sqrt(disc)) / (2 * a), (-b + np.sqrt(disc)) / (2 * a))
        k = min(roots, key=abs)
    return float(np.clip(k, -1.0, 4.0))


def _check_weight(weight: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    if weight is None:
        return np.ones(shape, dtype=np.float32)
    w = np.asarray(weight, dtype=np.float32)
    if w.shape != shape or not np.isfinite(w).all() or w.min() < 0:
        raise ValueError(f"weight must be a finite non-negative {shape[0]} x {shape[1]} array (the attack's"
                         f" mask), got shape {w.shape}")
    peak = float(w.max())
    return w / peak if peak > 0 else w


def match_statistics(image: np.ndarray, reference: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    """``image`` given the per-channel mean and std and the grey Laplacian variance of ``reference``
    over the region where ``weight`` is at least half its maximum, the change blended in through ``weight``.

    Applied to a synthetic attack with its own bona fide as ``reference`` and the attack's mask
    as ``weight``, it gives the altered face the colour, contrast and sharpness of the photo's
    face and leaves every pixel outside the mask as the photo has it. What stays are the local
    cues (seams, double contours, texture). Matching the whole image instead (``weight=None``)
    hides a blurred face from whole-image statistics by sharpening the background, which leaves
    a cue of its own, "face softer than its surroundings", that sharpened morphs do not carry
    (see examples/README.md). Three rounds, clipped to [0, 1] each time: sharpening moves the
    contrast a little, the contrast moves the sharpness, and clipping moves both.

    Args:
        image: ``H x W x 3`` in [0, 1].
        reference: ``H x W x 3`` in [0, 1].
        weight: ``H x W`` non-negative (scaled to a maximum of 1); None = the whole image.

    Returns:
        ``H x W x 3`` float32, equal to ``image`` wherever ``weight`` is 0; ``image`` unchanged
        when the region has fewer than 9 interior pixels.

    Raises:
        ValueError: For images that are not ``H x W x 3`` or a weight of another shape.
    """
    x = check_image(image).copy()
    ref = check_image(reference)
    w = _check_weight(weight, x.shape[:2])
    inside = w >= 0.5
    if inside[1:-1, 1:-1].sum() < 9:
        return x
    region, interior = _Region(inside), _Region(inside[1:-1, 1:-1])
    ref_grey_laplacian = laplacian(grey(ref.astype(np.float64)))
    target = float(interior.covariance(ref_grey_laplacian, ref_grey_laplacian))
    ref_mean, ref_std = region.moments(ref)
    blend = w[..., None]
    for _ in range(MATCH_ROUNDS):
        mean, std = region.moments(x)
        gain = np.where(std > 1e-8, ref_std / np.maximum(std, 1e-8), 1.0)
        # x + blend * ((x - mean) * gain + ref_mean - x), with the per-channel terms folded first
        x += blend * (x * (gain - 1.0).astype(np.float32) + (ref_mean - mean * gain).astype(np.float32))
        detail = x - blur(x, UNSHARP_SIGMA)
        amount = _sharpness_amount(grey(x), w * grey(detail), interior, target)
        x = np.clip(x + np.float32(amount) * blend * detail, 0.0, 1.0)
    return x


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float32) / np.float32(255.0)


def resample(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` moved by a small random similarity (rotation ±3 degrees, scale 0.95-1.05, shift
    ±1 px) and sampled back bilinearly, borders reflected: the interpolation a warp leaves."""
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), rng.uniform(-3.0, 3.0),
                                     rng.uniform(0.95, 1.05))
    matrix[:, 2] += rng.uniform(-1.0, 1.0, size=2)
    return cv2.warpAffine(np.ascontiguousarray(image), matrix, (width, height), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)


def matched_augment(image: np.ndarray, rng: np.random.Generator, resample_p: float = 0.0) -> np.ndarray:
    """The processing every training image gets, whatever its class.

    A resampling (:func:`resample`, p = ``resample_p``), then colour jitter (p = 0.3), then a
    Gaussian blur (sigma 0.3-1.2 px, p = 1/3) or a sharpening (unsharp amount 0.2-1.5,
    p = 1/3), then JPEG at quality 40-100 (p = 0.5). Drawing these for bona fides and attacks
    alike means no amount of blur, sharpness, interpolation or compression marks a class.
    With ``resample_p = 0`` no number is drawn for it, so earlier runs repeat exactly.
    """
    x = check_image(image)
    if resample_p > 0 and rng.random() < resample_p:
        x = resample(x, rng)
    if rng.random() < 0.3:
        x = colour_shift(x, rng, 0.5)
    pick = rng.random()
    if pick < 1 / 3:
        x = blur(x, rng.uniform(0.3, 1.2))
    elif pick < 2 / 3:
        x = unsharp(x, rng.uniform(0.2, 1.5))
    x = np.clip(x, 0.0, 1.0)
    if rng.random() < 0.5:
        x = _jpeg(x, int(rng.integers(40, 101)))
    return x
