"""Trivial image statistics that can separate morphs from bona fides without any learning.

Blending two faces averages them, which blurs edges and lowers contrast. On many morph sets
one such number already detects a good share of the morphs, so a detector's result means
little until it is seen beside them. Every report scores the test split with each statistic
here, with the direction fixed in advance (below, never chosen on test) and the threshold set
on dev by the detector's own rule.

The statistics are computed at the detector's input size, on the decoded pixels in [0, 1]
resized the way the dataset resizes them and averaged to grey, independent of any backbone's
normalisation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .images import sample_pixels
from .samples import Sample

__all__ = ["SHORTCUTS", "Shortcut", "contrast", "grey", "laplacian", "laplacian_variance", "sample_greys",
           "shortcut_scores"]


def grey(pixels: np.ndarray, size: int | None = None) -> np.ndarray:
    """``H x W x C`` (or ``H x W``) pixels in [0, 1] as a float64 grey image, resized to ``size x size``.

    Resizing is bilinear with antialiasing, as the detector's dataset resizes its inputs.
    """
    x = np.asarray(pixels, dtype=np.float64)
    g = x.mean(axis=2) if x.ndim == 3 else x
    if size is not None and g.shape != (size, size):
        t = torch.from_numpy(np.ascontiguousarray(g))[None, None]
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        g = t[0, 0].clamp(0, 1).numpy()
    return g


def sample_greys(samples: list[Sample], size: int) -> list[np.ndarray]:
    """The grey ``size x size`` image of every sample (decoded as the dataset decodes it)."""
    return [grey(sample_pixels(s, size), size) for s in samples]


def laplacian(g: np.ndarray) -> np.ndarray:
    """The 4-neighbour Laplacian of a grey image over its interior pixels: ``(H-2) x (W-2)``.

    ``L[i, j] = g[i-1, j] + g[i+1, j] + g[i, j-1] + g[i, j+1] - 4 g[i, j]`` for every pixel
    with four neighbours (no padding, so borders add no artificial edges). Computed in ``g``'s
    float precision (integers in float64), so a float32 image costs no copy.

    Raises:
        ValueError: If ``g`` is not a 2-D image of at least 3 x 3 pixels.
    """
    g = np.asarray(g)
    if not np.issubdtype(g.dtype, np.floating):
        g = g.astype(np.float64)
    if g.ndim != 2 or min(g.shape) < 3:
        raise ValueError(f"need a grey image of at least 3 x 3 pixels, got shape {g.shape}")
    return g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * g[1:-1, 1:-1]


def laplacian_variance(g: np.ndarray) -> float:
    """Sharpness: the variance of :func:`laplacian` over the interior pixels of a grey image."""
    return float(laplacian(np.asarray(g, dtype=np.float64)).var())


def contrast(g: np.ndarray) -> float:
    """Global contrast: the standard deviation of the grey pixel values."""
    return float(np.asarray(g, dtype=np.float64).std())


@dataclass(frozen=True)
class Shortcut:
    """A statistic and its fixed direction: ``sign`` = -1 means lower values = morph."""

    statistic: Callable[[np.ndarray], float]
    sign: float
    description: str

    def score(self, g: np.ndarray) -> float:
        """The statistic oriented like a detector score: higher = more likely a morph."""
        return self.sign * self.statistic(g)


# Directions fixed before looking at any split: averaging two images blurs and flattens them.
SHORTCUTS: dict[str, Shortcut] = {
    "sharpness": Shortcut(laplacian_variance, -1.0,
                          "variance of the Laplacian (sharpness), lower = morph because blending blurs"),
    "contrast": Shortcut(contrast, -1.0,
                         "standard deviation of the grey pixels, lower = morph because averaging two faces"
                         " flattens contrast"),
}


def shortcut_scores(greys: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Every statistic in :data:`SHORTCUTS` for every grey image, oriented so that higher = morph.

    Returns:
        Name -> float64 array of shape ``(len(greys),)``.
    """
    return {name: np.array([s.score(g) for g in greys], dtype=np.float64) for name, s in SHORTCUTS.items()}
