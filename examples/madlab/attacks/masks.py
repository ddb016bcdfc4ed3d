"""Elliptic masks: the one shape every face region of the attacks is cut from.

Synthetic attacks, the given morphs' splice, the ORL landmark morphs and the separability
check each place their ellipse differently (centred in a crop or from 5 landmarks); the
ellipse itself is drawn here.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ellipse"]


def ellipse(height: int, width: int, centre: tuple[float, float], radii: tuple[float, float],
             angle: float = 0.0) -> np.ndarray:
    """A hard 0/1 ellipse; ``centre`` and ``radii`` are ``(y, x)``, ``angle`` rotates it (radians)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    dy, dx = yy - centre[0], xx - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # along and across the eye line
    return ((v / radii[0]) ** 2 + (u / radii[1]) ** 2 <= 1.0).astype(np.float64)
