"""madlab.evaluation.bootstrap: intervals checked against explicit loops and known cases.

The vectorised figures of every resample are compared with :mod:`madlab.evaluation.metrics`
run on the resampled images written out one by one; the interval with a percentile computed
by hand; the coverage on data whose AUC is known (0.5 for scores that ignore the label).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from madlab.evaluation.bootstrap import LEVEL, draw, interval, metric_samples
from madlab.evaluation.metrics import auc, bpcer_at_apcer, d_eer

TARGETS = {"bpcer@apcer=1%": 0.01, "bpcer@apcer=5%": 0.05, "bpcer@apcer=10%": 0.10}


@settings(deadline=None, max_examples=60)
@given(st.integers(0, 2**31), st.integers(2, 40), st.integers(0, 2))
def test_every_resample_equals_the_metrics_on_its_images_written_out(seed: int, n: int, digits: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(labels * rng.uniform(0, 2), 1.0), digits)  # rounding makes ties
    weights = rng.integers(0, 3, (6, n))
    weights[:, :2] += 1  # every row keeps both classes
    got = metric_samples(scores, labels, weights, TARGETS)
    for b, row in enumerate(weights):
        s, y = np.repeat(scores, row), np.repeat(labels, row)
        assert got["auc"][b] == pytest.approx(auc(s, y), abs=1e-12)
        assert got["d_eer"][b] == pytest.approx(d_eer(s, y)["eer"], abs=1e-12)
        for name, target in TARGETS.items():
            assert got[name][b] == pytest.approx(bpcer_at_apcer(s, y, target)["bpcer"], abs=1e-12)


def test_a_resample_without_a_class_gives_nan() -> None:
    got = metric_samples(np.array([0.1, 0.9]), np.array([0, 1]), np.array([[1, 1], [2, 0], [0, 3]]), TARGETS)
    assert got["auc"][0] == 1.0 and np.isnan(got["auc"][1:]).all() and np.isnan(got["d_eer"][1:]).all()


def test_the_interval_of_a_tiny_case_is_the_percentile_computed_by_hand() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.3, 0.8, 0.5])
    resamples = draw(labels, n=200, seed=3)
    by_hand = []
    for row in resamples.weights:
        assert row[labels == 0].sum() == 3 and row[labels == 1].sum() == 3  # images: classes keep their sizes
        by_hand.append(auc(np.repeat(scores, row), np.repeat(labels, row)))
    ordered = sorted(by_hand)

    def percentile(q: float) -> float:  # linear interpolation between order statistics
        position = q / 100 * (len(ordered) - 1)
        low = int(position)
        return ordered[low] + (position - low) * (ordered[min(low + 1, len(ordered) - 1)] - ordered[low])

    tail = 100 * (1 - LEVEL) / 2
    assert interval(metric_samples(scores, labels, resamples.weights, {})["auc"]) == pytest.approx(
        [percentile(tail), percentile(100 - tail)], abs=1e-12)


def test_identities_move_together_and_a_morph_counts_once_per_pair_of_copies() -> None:
    people = [f"p{k}" for k in range(6)]
    identities = [(p,) for p in people] + [(p,) for p in people] + [("p0", "p1"), ("p2", "p4"), ("p3", "p3")]
    labels = np.array([0] * 12 + [1] * 3)
    resamples = draw(labels, identities, n=300, seed=1)
    w = resamples.weights
    assert resamples.unit == "identity" and resamples.n_units == 6
    np.testing.assert_array_equal(w[:, :6], w[:, 6:12])  # a person's two photos are drawn together
    np.testing.assert_array_equal(w[:, 12], w[:, 0] * w[:, 1])
    np.testing.assert_array_equal(w[:, 13], w[:, 2] * w[:, 4])
    np.testing.assert_array_equal(w[:, 14], w[:, 3])  # a person named twice is one person
    assert (w[:, :6].sum(axis=1) == 6).all()  # 6 people drawn, with replacement
    assert resamples.describe()["unit"] == "identity"


def test_without_identities_for_every_image_the_images_are_resampled() -> None:
    labels = np.array([0, 0, 1, 1])
    resamples = draw(labels, [("a",), ("b",), (), ("c",)], n=50)
    assert resamples.unit == "image" and resamples.n_units == 4
    assert (resamples.weights[:, :2].sum(axis=1) == 2).all() and (resamples.weights[:, 2:].sum(axis=1) == 2).all()


def test_the_same_inputs_give_the_same_interval() -> None:
    labels = np.array([0] * 5 + [1] * 5)
    np.testing.assert_array_equal(draw(labels).weights, draw(labels).weights)


def test_a_separable_case_has_a_point_interval() -> None:
    labels = np.array([0] * 30 + [1] * 30)
    scores = labels + np.random.default_rng(0).uniform(0, 0.5, 60)
    got = metric_samples(scores, labels, draw(labels).weights, TARGETS)
    assert interval(got["auc"]) == [1.0, 1.0] and interval(got["d_eer"]) == [0.0, 0.0]


def test_scores_that_ignore_the_label_get_intervals_that_cover_one_half() -> None:
    # 200 test sets whose true AUC is 0.5: a 95% interval should hold it about 95% of the time.
    rng = np.random.default_rng(7)
    labels = np.array([0] * 60 + [1] * 60)
    covered = 0
    for trial in range(200):
        scores = rng.normal(size=120)
        low, high = interval(metric_samples(scores, labels, draw(labels, n=400, seed=trial).weights, {})["auc"])
        covered += low <= 0.5 <= high
    assert 0.88 <= covered / 200 <= 0.995


def test_a_paired_difference_of_a_score_with_itself_is_exactly_zero() -> None:
    labels = np.array([0] * 20 + [1] * 20)
    scores = np.random.default_rng(2).normal(labels, 1.0)
    weights = draw(labels).weights
    same = metric_samples(scores, labels, weights, {})["auc"]
    assert interval(same - metric_samples(scores.copy(), labels, weights, {})["auc"]) == [0.0, 0.0]


def test_resamples_taken_a_few_rows_at_a_time_give_the_same_figures(monkeypatch) -> None:
    from madlab.evaluation import bootstrap

    labels = np.array([0] * 15 + [1] * 25)
    scores = np.random.default_rng(5).normal(labels, 1.0)
    weights = draw(labels, n=100).weights
    whole = metric_samples(scores, labels, weights, TARGETS)
    monkeypatch.setattr(bootstrap, "CHUNK", 7 * labels.size)  # 7 resamples a chunk: 15 chunks, the last short
    for name, values in metric_samples(scores, labels, weights, TARGETS).items():
        np.testing.assert_array_equal(values, whole[name])
