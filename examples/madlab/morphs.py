"""Morph generation for the embedded smoke test: two methods on pre-aligned face crops.

The ``lfw_subset`` crops are already aligned, so a landmark warp is not needed for a
naive morph. Two methods give two attack species (PAIS) so that per-method reporting runs:

* ``blend``: the whole images averaged, leaving ghosting everywhere (an OpenCV-style morph
  with border points).
* ``splice``: the averaged inner face pasted into the first contributor through a soft
  elliptical mask, so hair and background stay sharp and only a blended face remains (a
  "combined" morph as in AMSL).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = ["METHODS", "blend", "inner_face_mask", "morph", "splice"]

METHODS = ("blend", "splice")


def blend(a: np.ndarray, b: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(1 - alpha) * a + alpha * b`` of two float images in [0, 1] of the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"contributors must have the same shape, got {a.shape} and {b.shape}")
    return (1.0 - alpha) * a + alpha * b


def inner_face_mask(height: int, width: int, softness: float = 1.2) -> np.ndarray:
    """A soft ellipse over the inner face (eyes to chin) of a centred crop, values in [0, 1]."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    cy, cx = 0.55 * (height - 1), 0.5 * (width - 1)
    ry, rx = 0.36 * height, 0.30 * width
    hard = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0).astype(np.float64)
    # Blurring the hard mask feathers the seam, as splicing tools do before pasting.
    return np.clip(gaussian_filter(hard, sigma=softness * height / 25.0), 0.0, 1.0)


def splice(a: np.ndarray, b: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Paste the ``alpha`` blend of ``a`` and ``b`` into ``a`` inside :func:`inner_face_mask`."""
    mask = inner_face_mask(a.shape[0], a.shape[1])
    if a.ndim == 3:
        mask = mask[..., None]
    return mask * blend(a, b, alpha) + (1.0 - mask) * a


def morph(method: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Apply the named morphing method.

    Raises:
        ValueError: For an unknown method (the message lists :data:`METHODS`).
    """
    if method == "blend":
        return blend(a, b)
    if method == "splice":
        return splice(a, b)
    raise ValueError(f"unknown morph method {method!r}; choose from {METHODS}")
