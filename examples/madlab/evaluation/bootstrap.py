"""Bootstrap confidence intervals for AUC, D-EER and BPCER@APCER, and for paired differences.

A test set is a sample; its figures would move on another draw of people. The interval says
how far: the test set is resampled with replacement ``RESAMPLES`` times, each figure computed
on every resample, and the 2.5th and 97.5th percentiles taken (the percentile bootstrap).

What is resampled:

* **identities**, when every test image names its people (folder or CSV identities, the
  embedded ORL set): the people are drawn with replacement, and an image is in a resample once
  per drawn copy of each of its people, so a morph of ``a`` and ``b`` counts ``n_a x n_b``
  times (the subsets bootstrap of Bolle, Ratha and Pankanti, 2004, for pairs of people).
  Images of one person are not independent, so resampling images would be too narrow.
* **images** otherwise, bona fides and morphs separately (the class sizes stay fixed).

A resample is a row of weights (how many times each image is in it), so every figure of every
resample comes from one sort of the scores and cumulative sums over the rows (vectorised numpy,
no loop over resamples). Two scores of the same images (the detector and a
shortcut) are compared on the same rows: the paired bootstrap. The seed is fixed, so a report
is reproducible digit for digit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

__all__ = ["LEVEL", "RESAMPLES", "SEED", "Resamples", "draw", "interval", "metric_samples"]

RESAMPLES = 1000
SEED = 0  # fixed, not the run's seed: the same scores always get the same interval
LEVEL = 0.95
CHUNK = 2**21  # weights (resamples x images) handled at once: about 16 MB for each float array


@dataclass(frozen=True)
class Resamples:
    """``weights[b, i]``: how many times image ``i`` is in resample ``b``.

    Attributes:
        weights: ``B x n`` non-negative integers.
        unit: ``"identity"`` or ``"image"``: what was drawn with replacement.
        n_units: How many identities (or images) there were to draw from.
        seed: The random generator's seed.
    """

    weights: np.ndarray
    unit: str
    n_units: int
    seed: int = SEED

    def subset(self, keep: np.ndarray) -> Resamples:
        """The same resamples restricted to the images ``keep`` (a boolean mask or indices)."""
        return replace(self, weights=self.weights[:, keep])

    def describe(self) -> dict[str, object]:
        """What metrics.json says about how the intervals were made."""
        what = ("identities (people), an image counted once per drawn copy of each of its people"
                if self.unit == "identity" else "images, bona fides and morphs separately")
        return {"method": "percentile bootstrap", "level": LEVEL, "resamples": int(self.weights.shape[0]),
                "seed": self.seed, "unit": self.unit, "n_units": self.n_units, "resampled": what}


def draw(labels: np.ndarray, identities: Sequence[Sequence[str]] | None = None, n: int = RESAMPLES,
         seed: int = SEED) -> Resamples:
    """``n`` resamples of the images with ``labels`` (0 bona fide, 1 morph): over identities when
    every image has some, else over the images of each class."""
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    if identities is not None and len(identities) == labels.size and all(len(ids) for ids in identities):
        return _by_identity(identities, n, rng, seed)
    weights = np.zeros((n, labels.size), dtype=np.int32)
    for label in (0, 1):
        members = np.flatnonzero(labels == label)
        if members.size:
            weights[:, members] = rng.multinomial(members.size, np.full(members.size, 1.0 / members.size), size=n)
    return Resamples(weights, "image", int(labels.size), seed)


def _by_identity(identities: Sequence[Sequence[str]], n: int, rng: np.random.Generator, seed: int) -> Resamples:
    people = sorted({p for ids in identities for p in ids})
    column = {p: k for k, p in enumerate(people)}
    width = max(len(set(ids)) for ids in identities)
    table = np.full((len(identities), width), len(people))  # the extra last column counts 1: padding
    for i, ids in enumerate(identities):
        table[i, : len(set(ids))] = [column[p] for p in sorted(set(ids))]
    drawn = rng.multinomial(len(people), np.full(len(people), 1.0 / len(people)), size=n).astype(np.int32)
    drawn = np.hstack([drawn, np.ones((n, 1), dtype=np.int32)])
    weights = drawn[:, table[:, 0]]
    for column in table.T[1:]:  # one column at a time: never a B x n x people array
        weights *= drawn[:, column]
    return Resamples(weights, "identity", len(people), seed)


def metric_samples(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                   targets: Mapping[str, float]) -> dict[str, np.ndarray]:
    """AUC, D-EER and BPCER at each APCER target, once per row of ``weights``.

    The same definitions as :mod:`.metrics` (ties count one half in the AUC; D-EER interpolated
    between the operating points around APCER = BPCER; BPCER at the largest threshold with APCER
    at most the target), on the images repeated as the weights say. A row without a bona fide or
    without a morph gives NaN.

    Returns:
        ``{"auc": B, "d_eer": B, <target name>: B}`` float arrays.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    weights = np.atleast_2d(weights)
    order = np.argsort(scores, kind="mergesort")
    ordered = scores[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # one group per distinct score
    rows = max(1, CHUNK // max(1, scores.size))  # a few B x n float arrays at once: bounded, whatever the test size
    parts = [_figures(weights[first:first + rows, order], labels[order], starts, targets)
             for first in range(0, weights.shape[0], rows)]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _figures(w: np.ndarray, labels: np.ndarray, starts: np.ndarray,
             targets: Mapping[str, float]) -> dict[str, np.ndarray]:
    """:func:`metric_samples` for weight rows ``w`` of the images in score order, grouped at ``starts``."""
    w = w.astype(np.float64)
    morph = np.add.reduceat(np.where(labels == 1, w, 0.0), starts, axis=1)
    bona = np.add.reduceat(np.where(labels == 0, w, 0.0), starts, axis=1)
    n_m, n_bf = morph.sum(axis=1, keepdims=True), bona.sum(axis=1, keepdims=True)
    valid = (n_m[:, 0] > 0) & (n_bf[:, 0] > 0)
    n_m, n_bf = np.where(n_m > 0, n_m, 1.0), np.where(n_bf > 0, n_bf, 1.0)
    below = np.cumsum(bona, axis=1) - bona
    out = {"auc": ((morph * (below + 0.5 * bona)).sum(axis=1) / (n_m * n_bf)[:, 0])}
    # Thresholds: each distinct score, then +inf; rates count the scores strictly below.
    zero = np.zeros((w.shape[0], 1))
    apcer = np.hstack([zero, np.cumsum(morph, axis=1)]) / n_m
    bpcer = 1.0 - np.hstack([zero, np.cumsum(bona, axis=1)]) / n_bf
    out["d_eer"] = _equal_error(apcer, bpcer)
    for name, target in targets.items():
        last = (apcer <= target + 1e-12).sum(axis=1) - 1  # APCER ascends: the largest admissible threshold
        out[name] = bpcer[np.arange(len(last)), last]
    return {name: np.where(valid, values, np.nan) for name, values in out.items()}


def _equal_error(apcer: np.ndarray, bpcer: np.ndarray) -> np.ndarray:
    """:func:`.metrics.d_eer` row by row: the crossing of APCER - BPCER with 0, linearly interpolated."""
    d = apcer - bpcer
    rows = np.arange(d.shape[0])
    i = np.argmax(d >= 0, axis=1)  # exists: d = 1 at +inf
    before = np.maximum(i - 1, 0)
    exact = (i == 0) | (d[rows, i] == 0)
    step = np.where(exact, 1.0, d[rows, i] - d[rows, before])
    f = np.where(exact, 0.0, -d[rows, before] / step)
    start = np.where(exact, apcer[rows, i], apcer[rows, before])
    return start + f * (apcer[rows, i] - start)


def interval(values: np.ndarray, level: float = LEVEL) -> list[float] | None:
    """The percentile interval of the finite ``values`` (``[low, high]``), or ``None`` if there are none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return None
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return [float(low), float(high)]
