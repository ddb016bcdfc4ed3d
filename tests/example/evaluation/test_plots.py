"""ROC and DET figures of the morph-detection example: tied scores, clipped rates, τ and EER marks, legends."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from madlab.evaluation.metrics import apcer_bpcer, auc, d_eer
from madlab.evaluation.plots import det_figure, roc_figure, roc_points, save_plots

labelled_scores = st.lists(
    st.tuples(st.integers(0, 6).map(lambda v: v / 6), st.integers(0, 1)), min_size=2, max_size=30
).filter(lambda rows: {y for _, y in rows} == {0, 1})


def _brute_auc(scores, labels) -> float:
    morph = [s for s, y in zip(scores, labels) if y == 1]
    bona = [s for s, y in zip(scores, labels) if y == 0]
    return sum(1.0 if m > b else 0.5 if m == b else 0.0 for m in morph for b in bona) / (len(morph) * len(bona))


@settings(deadline=None, max_examples=150)
@given(labelled_scores)
def test_roc_polyline_encloses_the_tie_aware_auc(rows) -> None:
    # Straight segments between the operating points: the area under the drawn curve is the
    # Mann-Whitney AUC with ties counted 1/2. A step-post curve would give P(morph > bona fide) only.
    scores = np.array([s for s, _ in rows])
    labels = np.array([y for _, y in rows])
    x, y = roc_points(scores, labels)
    area = float(np.sum((x[:-1] - x[1:]) * (y[:-1] + y[1:]) / 2))
    assert area == pytest.approx(_brute_auc(scores.tolist(), labels.tolist()), abs=1e-12)


def test_tied_scores_draw_a_diagonal() -> None:
    scores = np.array([0.5, 0.5, 0.5, 0.5])
    labels = np.array([0, 0, 1, 1])
    fig = roc_figure(scores, labels, ["bona_fide", "bona_fide", "m", "m"], 0.5)
    line = fig.axes[0].lines[0]
    assert line.get_drawstyle() == "default", "no step-post jumps"
    assert line.get_xydata().tolist() == [[1.0, 1.0], [0.0, 0.0]], "one diagonal from (1, 1) to (0, 0)"
    assert "AUC 0.500" in line.get_label() and "D-EER 50.0%" in line.get_label()
    plt.close(fig)


def _data():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 20 + [1] * 30)
    scores = rng.normal(labels * 1.2, 1.0)
    methods = ["bona_fide"] * 20 + ["blend"] * 15 + ["splice"] * 15
    return scores, labels, methods


def test_roc_marks_tau_and_eer_and_shows_baselines() -> None:
    scores, labels, methods = _data()
    tau = 0.4
    shortcut = -scores + 0.3  # some other score
    fig = roc_figure(scores, labels, methods, tau, {"sharpness": (shortcut, 0.0)})
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    at = apcer_bpcer(scores, labels, tau)
    eer = d_eer(scores, labels)["eer"]
    tau_line = next(v for k, v in lines.items() if k.startswith("dev threshold τ"))
    assert tau_line.get_xydata().tolist() == [[at["bpcer"], 1 - at["apcer"]]]
    eer_line = next(v for k, v in lines.items() if k.startswith("EER point"))
    assert eer_line.get_xydata().tolist() == [[eer, 1 - eer]]
    assert f"overall (AUC {auc(scores, labels):.3f}, D-EER {100 * eer:.1f}%)" in lines
    assert any(k.startswith("shortcut: sharpness (AUC ") for k in lines)
    assert fig.axes[0].get_legend() is not None
    plt.close(fig)


def test_det_labels_the_clipped_rates_for_what_they_are() -> None:
    scores, labels, methods = _data()
    fig = det_figure(scores, labels, methods, 0.4)
    ax = fig.axes[0]
    xt = [t.get_text() for t in ax.get_xticklabels()]
    assert xt[0] == "≤0.1 (incl. 0)" and xt[-1] == "≥99.9 (incl. 100)"
    assert "0.1" not in xt, "a clipped 0 % is never labelled as a plain 0.1"
    assert "0 % is drawn" in ax.get_xlabel()
    labels_ = [line.get_label() for line in ax.lines]
    assert any(k.startswith("dev threshold τ") for k in labels_) and any(k.startswith("EER point") for k in labels_)
    assert any("AUC" in k and "D-EER" in k for k in labels_)
    plt.close(fig)


def test_save_plots_writes_three_pngs(tmp_path: Path) -> None:
    scores, labels, methods = _data()
    paths = save_plots(tmp_path, scores, labels, methods, 0.4, {"sharpness": (scores[::-1].copy(), 0.0)})
    assert [p.name for p in paths] == ["roc.png", "det.png", "score_histogram.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp")), "no temporary files left behind"
