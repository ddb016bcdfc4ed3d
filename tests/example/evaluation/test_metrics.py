"""ISO/IEC 30107-3 metrics of the morph-detection example: hand-computed cases and brute force."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from madlab.evaluation.metrics import MetricsError, apcer_bpcer, auc, bpcer_at_apcer, d_eer, operating_curve
from madlab.evaluation.report import choose_threshold, iso_report

# ---------------------------------------------------------------- hand-computed cases


def test_perfect_separation() -> None:
    scores = [0.1, 0.2, 0.8, 0.9]
    labels = [0, 0, 1, 1]
    assert d_eer(scores, labels)["eer"] == 0.0
    assert auc(scores, labels) == 1.0
    assert bpcer_at_apcer(scores, labels, 0.01)["bpcer"] == 0.0


def test_inverted_scores_are_not_flipped() -> None:
    # Polarity is fixed (higher = morph); a detector that is exactly wrong must look wrong.
    scores = [0.9, 0.8, 0.2, 0.1]
    labels = [0, 0, 1, 1]
    assert d_eer(scores, labels)["eer"] == 1.0
    assert auc(scores, labels) == 0.0


def test_apcer_bpcer_at_threshold_counts() -> None:
    scores = [0.1, 0.4, 0.6, 0.35, 0.7, 0.9]
    labels = [0, 0, 0, 1, 1, 1]
    r = apcer_bpcer(scores, labels, 0.5)
    # morphs below 0.5: 0.35 -> 1 of 3; bona fides at or above 0.5: 0.6 -> 1 of 3
    assert (r["apcer_errors"], r["n_morph"], r["bpcer_errors"], r["n_bona_fide"]) == (1, 3, 1, 3)
    assert r["apcer"] == pytest.approx(1 / 3) and r["bpcer"] == pytest.approx(1 / 3)
    # score == threshold counts as morph
    assert apcer_bpcer([0.5, 0.5], [0, 1], 0.5) == {
        "apcer": 0.0, "apcer_errors": 0, "n_morph": 1, "bpcer": 1.0, "bpcer_errors": 1, "n_bona_fide": 1}


def test_interpolated_eer_hand_case() -> None:
    # Bona fide 0.1, 0.3; morph 0.2, 0.4. Points (APCER, BPCER) by threshold:
    # t=0.1 (0,1), 0.2 (0,.5), 0.3 (.5,.5) -> d = 0 exactly at t=0.3: EER 0.5.
    assert d_eer([0.1, 0.3, 0.2, 0.4], [0, 0, 1, 1])["eer"] == pytest.approx(0.5)
    # Bona fide 0,1,2 ; morph 1.5, 3, 4. Points: t=0 (0,1) t=1 (0,2/3) t=1.5 (0,1/3)
    # t=2 (1/3,1/3) -> d=0 at t=2: EER 1/3.
    assert d_eer([0, 1, 2, 1.5, 3, 4], [0, 0, 0, 1, 1, 1])["eer"] == pytest.approx(1 / 3)
    # Crossing inside a segment: bona fide 0,1,2,3 ; morph 2.5, 4.
    # t=2.5: (0, 1/4)  d=-1/4 ; t=3: (1/2, 1/4) d=+1/4 -> f = 1/2, EER = 1/4.
    assert d_eer([0, 1, 2, 3, 2.5, 4], [0, 0, 0, 0, 1, 1])["eer"] == pytest.approx(0.25)


def test_bpcer_at_apcer_is_conservative() -> None:
    # 10 morphs at 0.1..1.0, 4 bona fides. APCER = 5% is impossible above 0 with 10 morphs,
    # so the conservative reading must use APCER = 0 (t <= 0.1), not APCER = 10%.
    morph = np.linspace(0.1, 1.0, 10)
    bona = np.array([0.05, 0.15, 0.25, 0.95])
    scores = np.concatenate([bona, morph])
    labels = np.array([0] * 4 + [1] * 10)
    r5 = bpcer_at_apcer(scores, labels, 0.05)
    assert r5["apcer"] == 0.0 and r5["bpcer"] == pytest.approx(3 / 4) and r5["bpcer_errors"] == 3
    r10 = bpcer_at_apcer(scores, labels, 0.10)
    assert r10["apcer"] == pytest.approx(0.1) and r10["bpcer"] == pytest.approx(2 / 4)


def test_auc_with_ties_counts_half() -> None:
    assert auc([0.5, 0.5], [0, 1]) == 0.5
    assert auc([0.2, 0.5, 0.5, 0.7], [0, 0, 1, 1]) == pytest.approx((1 + 0.5 + 1 + 1) / 4)


def test_all_tied_scores() -> None:
    scores, labels = [0.3] * 6, [0, 0, 0, 1, 1, 1]
    assert d_eer(scores, labels)["eer"] == pytest.approx(0.5)
    assert auc(scores, labels) == 0.5
    assert bpcer_at_apcer(scores, labels, 0.01)["bpcer"] == 1.0


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        ([0.1, 0.2], [0, 0], "0 morph"),
        ([0.1, 0.2], [1, 1], "0 bona fide"),
        ([], [], "no scores"),
        ([0.1], [0, 1], "1 scores but 2 labels"),
        ([0.1, float("nan")], [0, 1], "NaN"),
        ([0.1, 0.2], [0, 2], "labels must be 0"),
    ],
)
def test_bad_inputs_give_clear_errors(scores, labels, match) -> None:
    for fn in (d_eer, auc, lambda s, y: bpcer_at_apcer(s, y, 0.05), operating_curve):
        with pytest.raises(MetricsError, match=match):
            fn(scores, labels)


def test_tiny_input_works() -> None:
    assert d_eer([0.2, 0.8], [0, 1])["eer"] == 0.0
    assert d_eer([0.8, 0.2], [0, 1])["eer"] == 1.0


def test_bad_apcer_target() -> None:
    with pytest.raises(MetricsError, match="target APCER"):
        bpcer_at_apcer([0.1, 0.9], [0, 1], 5)


# ---------------------------------------------------------------- brute force under hypothesis


def _brute_points(scores, labels):
    """(threshold, APCER, BPCER) for every candidate threshold, by counting."""
    morph = [s for s, y in zip(scores, labels) if y == 1]
    bona = [s for s, y in zip(scores, labels) if y == 0]
    points = []
    for t in [*sorted(set(scores)), float("inf")]:
        apcer = sum(1 for s in morph if s < t) / len(morph)
        bpcer = sum(1 for s in bona if s >= t) / len(bona)
        points.append((t, apcer, bpcer))
    return points


def _brute_eer_candidates(points):
    """Every value where a straight segment between consecutive points crosses APCER = BPCER."""
    values = [a for _, a, b in points if a == b]
    for (_, a0, b0), (_, a1, b1) in zip(points, points[1:]):
        d0, d1 = a0 - b0, a1 - b1
        if d0 < 0 < d1:
            f = -d0 / (d1 - d0)
            values.append(a0 + f * (a1 - a0))
    return values


# Scores on a coarse grid so ties are frequent.
labelled_scores = st.lists(
    st.tuples(st.integers(0, 12).map(lambda v: v / 12), st.integers(0, 1)), min_size=2, max_size=40
).filter(lambda rows: {y for _, y in rows} == {0, 1})


@settings(deadline=None, max_examples=150)
@given(labelled_scores)
def test_against_brute_force(rows) -> None:
    scores = [s for s, _ in rows]
    labels = [y for _, y in rows]
    points = _brute_points(scores, labels)
    eer = d_eer(scores, labels)["eer"]
    candidates = _brute_eer_candidates(points)
    assert candidates, "the curve always crosses APCER = BPCER"
    assert any(abs(eer - c) < 1e-9 for c in candidates)
    # The crossing value is unique along a monotone curve.
    assert max(candidates) - min(candidates) < 1e-9
    for x in (0.01, 0.05, 0.10, 0.3):
        expected = min(b for _, a, b in points if a <= x)
        assert bpcer_at_apcer(scores, labels, x)["bpcer"] == pytest.approx(expected)
    morph = [s for s, y in zip(scores, labels) if y == 1]
    bona = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if m > b else 0.5 if m == b else 0.0 for m in morph for b in bona)
    assert auc(scores, labels) == pytest.approx(wins / (len(morph) * len(bona)))
    for t, a, b in points[:-1]:
        r = apcer_bpcer(scores, labels, t)
        assert (r["apcer"], r["bpcer"]) == (pytest.approx(a), pytest.approx(b))


@settings(deadline=None, max_examples=60)
@given(labelled_scores, st.sampled_from(["dev_eer", "dev_apcer5", "dev_apcer10"]))
def test_dev_threshold_rules(rows, rule) -> None:
    scores = np.array([s for s, _ in rows])
    labels = np.array([y for _, y in rows])
    chosen = choose_threshold(scores, labels, rule)
    points = _brute_points(scores.tolist(), labels.tolist())
    dev = chosen["dev"]
    if rule == "dev_eer":
        best = min(max(a, b) for _, a, b in points)
        assert max(dev["apcer"], dev["bpcer"]) == pytest.approx(best)
    else:
        x = 0.05 if rule == "dev_apcer5" else 0.10
        assert dev["apcer"] <= x + 1e-12
        assert dev["bpcer"] == pytest.approx(min(b for _, a, b in points if a <= x))


def test_iso_report_per_method_and_worst_case() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.25, 0.15])
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    methods = ["bona_fide"] * 3 + ["easy", "easy", "hard", "hard"]
    threshold = {"value": 0.5, "rule": "dev_eer", "description": "test"}
    r = iso_report(scores, labels, methods, threshold)
    assert r["per_method"]["easy"]["d_eer"] == 0.0
    assert r["per_method"]["easy"]["n_morph"] == 2 and r["per_method"]["easy"]["n_bona_fide"] == 3
    assert r["worst_case"]["d_eer"]["method"] == "hard"
    assert r["worst_case"]["d_eer"]["value"] == r["per_method"]["hard"]["d_eer"] > 0
    # ISO: APCER over species is the maximum over species, not the pooled value.
    assert r["worst_case"]["apcer_at_threshold"]["value"] == 1.0
    assert r["overall"]["at_threshold"]["apcer"] == 0.5
