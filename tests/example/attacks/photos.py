"""Small images and face points the attack tests make their attacks from."""

from __future__ import annotations

import numpy as np


def make_photo(seed: int, height: int = 40, width: int = 36, grey: bool = False) -> np.ndarray:
    """A smooth random image with edges (a blurred random field plus a bright disc)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((height // 4 + 1, width // 4 + 1, 1 if grey else 3))
    img = np.kron(coarse, np.ones((4, 4, 1)))[:height, :width]
    yy, xx = np.mgrid[0:height, 0:width]
    disc = ((yy - height / 2) ** 2 + (xx - width / 2) ** 2 < (min(height, width) / 4) ** 2)[..., None]
    img = (0.7 * img + 0.3 * disc).astype(np.float32)  # the module computes in float32
    return np.repeat(img, 3, axis=2) if grey else img


def face_points(height: int, width: int, tilt: float = 0.0) -> np.ndarray:
    """Five plausible points (eyes, nose, mouth corners) of a face centred in the image, rotated by ``tilt``."""
    base = np.array([[-0.18, -0.12], [0.18, -0.12], [0.0, 0.05], [-0.13, 0.2], [0.13, 0.2]])
    c, s = np.cos(tilt), np.sin(tilt)
    rotated = base @ np.array([[c, s], [-s, c]])
    return np.array([width / 2, height / 2]) + rotated * np.array([width, height])
