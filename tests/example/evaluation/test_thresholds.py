"""Operating threshold rule and score precision of the morph-detection example, against brute force."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from madlab.data.images import ImageDataset
from madlab.data.samples import Sample
from madlab.evaluation.metrics import auc
from madlab.evaluation.report import SCORE_KIND, choose_threshold, p_morph
from madlab.run.inference import predict
from torch import nn

labelled_scores = st.lists(
    st.tuples(st.integers(0, 8).map(lambda v: v / 8), st.integers(0, 1)), min_size=2, max_size=30
).filter(lambda rows: {y for _, y in rows} == {0, 1})


def _points(scores, labels):
    morph = [s for s, y in zip(scores, labels) if y == 1]
    bona = [s for s, y in zip(scores, labels) if y == 0]
    out = []
    for t in [*sorted(set(scores)), float("inf")]:
        out.append((t, sum(s < t for s in morph) / len(morph), sum(s >= t for s in bona) / len(bona)))
    return out


@settings(deadline=None, max_examples=200)
@given(labelled_scores)
def test_dev_eer_takes_the_most_balanced_of_the_minimax_thresholds(rows) -> None:
    scores = [s for s, _ in rows]
    labels = [y for _, y in rows]
    points = _points(scores, labels)
    best = min(max(a, b) for _, a, b in points)
    tied = [(t, a, b) for t, a, b in points if max(a, b) == pytest.approx(best)]
    gap = min(abs(a - b) for _, a, b in tied)
    expected = min(t for t, a, b in tied if abs(a - b) == pytest.approx(gap))  # then the lower threshold
    chosen = choose_threshold(np.array(scores), np.array(labels), "dev_eer")
    if np.isfinite(expected):
        assert chosen["value"] == expected
    dev = chosen["dev"]
    assert max(dev["apcer"], dev["bpcer"]) == pytest.approx(best)
    assert abs(dev["apcer"] - dev["bpcer"]) == pytest.approx(gap)
    assert chosen["score"] == SCORE_KIND


def test_dev_eer_hand_case_prefers_the_balanced_point() -> None:
    # Bona fide 0.1, 0.2, 0.3, 0.6, 0.7 ; morph 0.4, 0.5, 0.65, 0.8, 0.9.
    # t=0.4: APCER 0/5, BPCER 2/5 -> max .4 ; t=0.6: APCER 2/5, BPCER 2/5 -> max .4, balanced.
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.4, 0.5, 0.65, 0.8, 0.9])
    labels = np.array([0] * 5 + [1] * 5)
    chosen = choose_threshold(scores, labels, "dev_eer")
    assert chosen["value"] == 0.6
    assert (chosen["dev"]["apcer"], chosen["dev"]["bpcer"]) == (0.4, 0.4)


class _Confident(nn.Module):
    """A "model" whose logit is the mean pixel times 40: far past float32 sigmoid saturation (~16.6)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3)) * 40.0


def test_confident_scores_do_not_tie() -> None:
    levels = np.linspace(0.5, 0.9, 6)  # logits 0 .. 32 after normalisation
    samples = [Sample(f"s{i}", i % 2, "bona_fide" if i % 2 == 0 else "m", "test", (),
                      np.full((4, 4, 3), v)) for i, v in enumerate(levels)]
    scores, _ = predict(_Confident(), ImageDataset(samples, 4), batch_size=4, progress=False)
    assert scores.dtype == np.float64
    assert len(set(scores.tolist())) == len(samples), "distinct logits stay distinct"
    assert (torch.sigmoid(torch.tensor(scores[-3:], dtype=torch.float32)) == 1.0).all(), \
        "the old float32 probabilities would have tied these"
    labels = np.array([s.label for s in samples])
    morph, bona = scores[labels == 1], scores[labels == 0]
    assert auc(scores, labels) == sum(float(m > b) + 0.5 * float(m == b) for m in morph for b in bona) / 9


def test_p_morph_is_a_stable_sigmoid() -> None:
    z = np.array([-800.0, -40.0, -1.0, 0.0, 1.0, 40.0, 800.0])
    p = p_morph(z)
    assert np.all(np.isfinite(p)) and p[0] == 0.0 and p[-1] == 1.0
    np.testing.assert_allclose(p[1:-1], 1 / (1 + np.exp(-z[1:-1])), rtol=1e-12)
    assert p[1] > 0, "no underflow to 0 at logit -40"


def test_probability_threshold_of_an_older_model_file_becomes_its_logit(tmp_path: Path) -> None:
    from madlab.model.checkpoint import CheckpointError
    from madlab.run.detector import stored_threshold as _stored_threshold

    new = {"rule": "dev_eer", "value": 1.5, "score": SCORE_KIND}
    assert _stored_threshold(new, tmp_path / "m") is new
    old = _stored_threshold({"rule": "dev_eer", "value": 0.8}, tmp_path / "m")
    assert old["value"] == pytest.approx(np.log(4.0)) and old["score"] == SCORE_KIND
    assert p_morph(old["value"]) == pytest.approx(0.8)
    with pytest.raises(CheckpointError, match=r"probability threshold 1\.0 of an older version"):
        _stored_threshold({"rule": "dev_eer", "value": 1.0}, tmp_path / "m")
