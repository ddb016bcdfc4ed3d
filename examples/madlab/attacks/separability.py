"""Are synthetic attacks separable from bona fides by a trivial image statistic? Measured, per statistic.

A detector learns the easiest cue that separates its training classes. If synthetic attacks
were blurrier, flatter, differently coloured or differently compressed than the bona fides
they are trained against, it would learn that cue, and real morphs without it (sharpened
ones) would pass. This module scores both classes *as the model sees them in training* with
the example's shortcut statistics (:mod:`.shortcuts`: sharpness, contrast) and five more
(brightness, saturation, high-frequency energy, JPEG blockiness, and face softness: how much
softer the centre of the crop, where the face is, is than the rest) and reports the AUC of each.
0.5 means the statistic cannot tell the classes apart; the direction is not fixed here, so
an AUC far from 0.5 either way is a cue.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..data.shortcuts import contrast, laplacian, laplacian_variance
from ..evaluation.metrics import auc
from .masks import ellipse
from .sets import MADE_METHODS

__all__ = ["STATISTICS", "format_separability", "separability", "served_pairs"]


def _grey(image: np.ndarray) -> np.ndarray:
    return np.asarray(image, dtype=np.float64).mean(axis=2)


def _saturation(image: np.ndarray) -> float:
    x = np.asarray(image, dtype=np.float64)
    return float((x.max(axis=2) - x.min(axis=2)).mean())


def _high_frequency(image: np.ndarray) -> float:
    """The share of the grey image's spectral energy (mean removed) above half the Nyquist frequency."""
    g = _grey(image)
    power = np.abs(np.fft.fft2(g - g.mean())) ** 2
    fy = np.abs(np.fft.fftfreq(g.shape[0]))[:, None]
    fx = np.abs(np.fft.fftfreq(g.shape[1]))[None, :]
    high = np.maximum(fy, fx) > 0.25
    total = power.sum()
    return float(power[high].sum() / total) if total > 0 else 0.0


def _blockiness(image: np.ndarray) -> float:
    """JPEG blocking: mean absolute step across 8-pixel block borders over the mean step elsewhere."""
    g = _grey(image)
    steps = np.abs(np.diff(g, axis=1))
    if steps.shape[1] < 8:
        return 1.0
    border = np.arange(steps.shape[1]) % 8 == 7
    inside = steps[:, ~border].mean()
    return float(steps[:, border].mean() / inside) if inside > 0 else 1.0


def _face_softness(image: np.ndarray) -> float:
    """Mean absolute Laplacian outside a centred face ellipse over the mean inside it.

    A local cue no whole-image statistic sees: attacks whose blended face is softer than its
    surroundings (or whose surroundings were sharpened to hide it) score higher. The ellipse
    (centre at 55 % of the height, radii 30 % and 25 % of the sides) lies inside the inner face
    of a centred face crop.
    """
    g = _grey(image)
    height, width = g.shape
    whole = ellipse(height, width, (0.55 * (height - 1), 0.5 * (width - 1)), (0.30 * height, 0.25 * width))
    inside = whole[1:-1, 1:-1] > 0  # where the Laplacian is defined
    lap = np.abs(laplacian(np.asarray(g, dtype=np.float64)))
    face = lap[inside].mean() if inside.any() else 0.0
    return float(lap[~inside].mean() / face) if face > 0 else 0.0


STATISTICS: dict[str, Callable[[np.ndarray], float]] = {
    "sharpness": lambda x: laplacian_variance(_grey(x)),
    "contrast": lambda x: contrast(_grey(x)),
    "brightness": lambda x: float(_grey(x).mean()),
    "saturation": _saturation,
    "high_frequency": _high_frequency,
    "jpeg_blockiness": _blockiness,
    "face_softness": _face_softness,
}


def separability(bona_fides: list[np.ndarray], attacks: list[np.ndarray]) -> dict[str, float]:
    """The AUC of every statistic in :data:`STATISTICS`, attacks as the positive class.

    Args:
        bona_fides, attacks: ``H x W x 3`` images in [0, 1].

    Returns:
        Statistic name -> AUC (0.5 = not separable; below 0.5 = lower values mark attacks).
    """
    labels = np.r_[np.zeros(len(bona_fides)), np.ones(len(attacks))]
    images = [*bona_fides, *attacks]
    return {name: auc(np.array([stat(x) for x in images]), labels) for name, stat in STATISTICS.items()}


def served_pairs(dataset, limit: int = 256) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Up to ``limit`` bona fides and as many made attacks exactly as a training set serves them.

    The items are drawn inside :func:`torch.random.fork_rng`, so checking does not change
    the random numbers training then uses (runs stay reproducible and resumable).

    Args:
        dataset: A :class:`~.attacks.SyntheticTrainSet`.
    """
    real = [k for k, s in enumerate(dataset.samples) if s.label == 0][:limit]
    made = [k for k, s in enumerate(dataset.samples) if s.method in MADE_METHODS][:limit]
    mean = dataset.base.mean.numpy().reshape(1, 1, 3)
    std = dataset.base.std.numpy().reshape(1, 1, 3)

    def image(k: int) -> np.ndarray:
        x = dataset[k][0].numpy().transpose(1, 2, 0)
        return np.clip(x * std + mean, 0.0, 1.0)

    with torch.random.fork_rng(devices=[]):
        return [image(k) for k in real], [image(k) for k in made]


def format_separability(aucs: dict[str, float], n: int) -> str:
    """One line for the training log: the AUC of each statistic and the worst distance from 0.5."""
    worst = max(aucs, key=lambda name: abs(aucs[name] - 0.5))
    figures = ", ".join(f"{name} {value:.3f}" for name, value in aucs.items())
    return (f"made attacks vs training bona fides as served ({n} of each): AUC of one image statistic:"
            f" {figures} (0.5 = not separable; furthest from 0.5: {worst})")
