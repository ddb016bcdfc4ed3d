"""ISO/IEC 30107-3 detection metrics with morph = attack = the positive class.

Convention everywhere: a higher score means "more likely a morph", and a sample is
classified as a morph when ``score >= threshold``. Then

* APCER(t) = share of morphs (attacks) with ``score < t`` (accepted as bona fide),
* BPCER(t) = share of bona fides with ``score >= t`` (rejected as attacks).

The candidate thresholds are the distinct scores plus ``+inf``; between two distinct scores
both rates are constant, so these points are the whole operating curve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..io.errors import MadlabError

__all__ = [
    "MetricsError",
    "OperatingCurve",
    "apcer_bpcer",
    "auc",
    "bpcer_at_apcer",
    "check_scores",
    "d_eer",
    "operating_curve",
]


class MetricsError(MadlabError):
    """Scores or labels that no ISO metric can be computed from; the message says why."""


def check_scores(scores: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert: finite float scores, labels in {0 (bona fide), 1 (morph)}, both classes.

    Raises:
        MetricsError: On empty or mismatched inputs, non-finite scores, other labels, or a
            single class (the message gives both counts).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.size == 0:
        raise MetricsError("no scores given: need at least one bona fide (0) and one morph (1) sample")
    if s.shape != y.shape:
        raise MetricsError(f"{s.size} scores but {y.size} labels")
    if not np.isfinite(s).all():
        raise MetricsError(f"{int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    bad = sorted({v.item() if hasattr(v, "item") else v for v in y if v not in (0, 1)})
    if bad:
        raise MetricsError(f"labels must be 0 (bona fide) or 1 (morph), got {bad[:5]}")
    y = y.astype(np.int64)
    n_bf, n_m = int((y == 0).sum()), int((y == 1).sum())
    if n_bf == 0 or n_m == 0:
        raise MetricsError(
            f"APCER/BPCER need both classes: got {n_bf} bona fide and {n_m} morph samples"
        )
    return s, y


@dataclass(frozen=True)
class OperatingCurve:
    """APCER and BPCER at every candidate threshold, thresholds ascending.

    APCER is non-decreasing and BPCER non-increasing along the arrays. The first threshold
    is the smallest score (everything flagged: APCER 0, BPCER 1), the last is ``+inf``.
    """

    thresholds: np.ndarray
    apcer: np.ndarray
    bpcer: np.ndarray
    n_bona_fide: int
    n_morph: int

    def last_with_apcer_at_most(self, target: float) -> int:
        """The index of the largest threshold whose APCER is at most ``target``.

        APCER is non-decreasing and BPCER non-increasing, so this point has the lowest BPCER
        of all admissible ones. The first point (APCER 0) is always admissible. Rates are
        ratios of counts: the 1e-12 keeps a rate equal to ``target`` in exact arithmetic.
        """
        return int(np.nonzero(self.apcer <= target + 1e-12)[0][-1])


def operating_curve(scores: object, labels: object) -> OperatingCurve:
    """Compute :class:`OperatingCurve` in O(n log n)."""
    s, y = check_scores(scores, labels)
    morph = np.sort(s[y == 1])
    bona = np.sort(s[y == 0])
    thresholds = np.append(np.unique(s), np.inf)
    # searchsorted 'left' counts scores strictly below t.
    apcer = np.searchsorted(morph, thresholds, side="left") / morph.size
    bpcer = 1.0 - np.searchsorted(bona, thresholds, side="left") / bona.size
    return OperatingCurve(thresholds, apcer, bpcer, int(bona.size), int(morph.size))


def apcer_bpcer(scores: object, labels: object, threshold: float) -> dict[str, float | int]:
    """APCER and BPCER at a fixed threshold, with the error counts and class sizes.

    Returns:
        ``apcer``, ``apcer_errors`` (morphs accepted), ``n_morph``, ``bpcer``,
        ``bpcer_errors`` (bona fides rejected), ``n_bona_fide``.
    """
    s, y = check_scores(scores, labels)
    accepted = int(((s < threshold) & (y == 1)).sum())
    rejected = int(((s >= threshold) & (y == 0)).sum())
    n_m, n_bf = int((y == 1).sum()), int((y == 0).sum())
    return {
        "apcer": accepted / n_m,
        "apcer_errors": accepted,
        "n_morph": n_m,
        "bpcer": rejected / n_bf,
        "bpcer_errors": rejected,
        "n_bona_fide": n_bf,
    }


def d_eer(scores: object, labels: object) -> dict[str, float]:
    """Detection equal error rate, linearly interpolated between operating points.

    Along the curve ``d = APCER - BPCER`` goes from -1 to +1. The D-EER is where the straight
    segment between the last point with ``d < 0`` and the first with ``d >= 0`` crosses
    ``d = 0`` (as SelfMAD's ``brentq`` over the interpolated ROC does).

    Returns:
        ``eer`` and ``threshold``, a threshold halfway along that segment's scores (for
        reference only: operating thresholds come from the dev split).
    """
    curve = operating_curve(scores, labels)
    d = curve.apcer - curve.bpcer
    i = int(np.argmax(d >= 0))  # first index with d >= 0; exists since d[-1] = 1
    if i == 0 or d[i] == 0:
        t = curve.thresholds[i]
        return {"eer": float(curve.apcer[i]), "threshold": float(t)}
    f = -d[i - 1] / (d[i] - d[i - 1])
    eer = curve.apcer[i - 1] + f * (curve.apcer[i] - curve.apcer[i - 1])
    lo, hi = curve.thresholds[i - 1], curve.thresholds[i]
    t = lo + f * (hi - lo) if np.isfinite(hi) else lo
    return {"eer": float(eer), "threshold": float(t)}


def bpcer_at_apcer(scores: object, labels: object, target: float) -> dict[str, float | int]:
    """BPCER at APCER = ``target``, conservative ISO reading.

    The lowest BPCER among the thresholds whose APCER is at most ``target`` (never a point
    with APCER above it, unlike ``argmin |APCER - target|``).

    Returns:
        ``bpcer``, ``bpcer_errors``, ``n_bona_fide``, the ``apcer`` actually achieved,
        ``apcer_errors``, ``n_morph`` and the ``threshold``.
    """
    if not 0.0 <= target <= 1.0:
        raise MetricsError(f"target APCER must be in [0, 1], got {target}")
    curve = operating_curve(scores, labels)
    j = curve.last_with_apcer_at_most(target)
    return {
        "bpcer": float(curve.bpcer[j]),
        "bpcer_errors": round(curve.bpcer[j] * curve.n_bona_fide),
        "n_bona_fide": curve.n_bona_fide,
        "apcer": float(curve.apcer[j]),
        "apcer_errors": round(curve.apcer[j] * curve.n_morph),
        "n_morph": curve.n_morph,
        "threshold": float(curve.thresholds[j]),
    }


def auc(scores: object, labels: object) -> float:
    """Area under the ROC curve: P(morph score > bona fide score) + 0.5 P(tie) (Mann-Whitney)."""
    s, y = check_scores(scores, labels)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    # Average ranks over ties, so tied pairs count one half.
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    n_m, n_bf = int((y == 1).sum()), int((y == 0).sum())
    u = ranks[y == 1].sum() - n_m * (n_m + 1) / 2.0
    return float(u / (n_m * n_bf))
