"""Shortcut baselines of the morph-detection example: the image statistics and how reports carry them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from madlab.data.shortcuts import SHORTCUTS, contrast, grey, laplacian_variance, sample_greys, shortcut_scores
from madlab.evaluation.bootstrap import draw
from madlab.evaluation.report import (
    add_auc_differences,
    choose_threshold,
    format_table,
    iso_report,
    shortcut_report,
    shortcut_verdict,
)
from scipy.ndimage import gaussian_filter


def _brute_laplacian_variance(g: np.ndarray) -> float:
    values = []
    for i in range(1, g.shape[0] - 1):
        for j in range(1, g.shape[1] - 1):
            values.append(g[i - 1, j] + g[i + 1, j] + g[i, j - 1] + g[i, j + 1] - 4 * g[i, j])
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


@settings(deadline=None, max_examples=50)
@given(arrays(np.float64, st.tuples(st.integers(3, 9), st.integers(3, 9)), elements=st.floats(0, 1)))
def test_laplacian_variance_matches_the_definition(g: np.ndarray) -> None:
    assert laplacian_variance(g) == pytest.approx(_brute_laplacian_variance(g), abs=1e-12)
    assert contrast(g) == pytest.approx(float(np.sqrt(((g - g.mean()) ** 2).mean())), abs=1e-12)


def test_laplacian_variance_errors_and_blur() -> None:
    with pytest.raises(ValueError, match="at least 3 x 3"):
        laplacian_variance(np.zeros((2, 5)))
    g = np.random.default_rng(0).random((32, 32))
    assert laplacian_variance(gaussian_filter(g, 1.0)) < laplacian_variance(g), "blurring lowers sharpness"
    assert laplacian_variance(np.full((8, 8), 0.3)) == 0.0


def test_scores_are_oriented_higher_means_morph() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.random((16, 16, 3)), rng.random((16, 16, 3))
    scores = shortcut_scores([grey(a), grey((a + b) / 2)])  # a blend: blurrier and flatter
    assert set(scores) == set(SHORTCUTS) == {"sharpness", "contrast"}
    for name, s in scores.items():
        assert s[1] > s[0], f"{name}: the blended image must score as more morph-like"
    np.testing.assert_allclose(grey(a), a.mean(axis=2))


def test_greys_are_the_pixels_the_detector_sees() -> None:
    # The dataset resizes with antialiased bilinear interpolation; grey() must do the same.
    from madlab.data.images import ImageDataset
    from madlab.data.samples import Sample

    rng = np.random.default_rng(3)
    pixels = rng.random((25, 25, 3))
    sample = Sample("x", 0, "bona_fide", "test", (), pixels)
    x, _, _ = ImageDataset([sample], 32)[0]
    expected = (x.double().numpy() * 0.5 + 0.5).mean(axis=0)  # undo mean = std = 0.5
    (g,) = sample_greys([sample], 32)
    assert g.shape == (32, 32)
    np.testing.assert_allclose(g, expected, atol=3e-3)  # a dataset may cache uint8 pixels: half a grey level


def test_shortcut_report_uses_the_detector_rule_on_dev() -> None:
    rng = np.random.default_rng(2)
    dev_y, test_y = np.array([0] * 10 + [1] * 10), np.array([0] * 8 + [1] * 12)
    dev = {"sharpness": rng.normal(dev_y, 1.0)}
    test = {"sharpness": rng.normal(test_y, 1.0)}
    methods = ["bona_fide"] * 8 + ["blend"] * 6 + ["splice"] * 6
    for rule in ("dev_eer", "dev_apcer5"):
        out = shortcut_report(dev, dev_y, test, test_y, methods, rule, {"sharpness": "d"})["sharpness"]
        assert out["threshold"]["value"] == choose_threshold(dev["sharpness"], dev_y, rule)["value"]
        full = iso_report(test["sharpness"], test_y, methods, out["threshold"])
        assert out["overall"] == full["overall"] and out["per_method"] == full["per_method"]


def _report(detector: np.ndarray, shortcut: np.ndarray, labels: np.ndarray) -> dict:
    methods = ["bona_fide" if y == 0 else "blend" for y in labels]
    threshold = choose_threshold(detector, labels, "dev_eer")
    resamples = draw(labels)
    report = iso_report(detector, labels, methods, threshold, resamples)
    report["shortcuts"] = shortcut_report({"sharpness": shortcut}, labels, {"sharpness": shortcut}, labels, methods,
                                          "dev_eer", {"sharpness": "variance of the Laplacian"}, resamples=resamples)
    add_auc_differences(report, detector, {"sharpness": shortcut}, labels, resamples)
    report["shortcut_verdict"] = shortcut_verdict(report)
    return report


def test_verdict_follows_the_interval_of_the_paired_auc_difference() -> None:
    rng = np.random.default_rng(4)
    labels = np.array([0] * 100 + [1] * 100)
    strong, weak = rng.normal(2.0 * labels, 1.0), rng.normal(0.3 * labels, 1.0)
    lost = _report(weak, strong, labels)
    assert lost["shortcut_verdict"][0].startswith("The detector does NOT beat the shortcut baseline 'sharpness'")
    assert lost["shortcuts"]["sharpness"]["auc_difference"]["interval"][1] < 0
    table = format_table(lost)
    assert "shortcut:sharpness" in table and "does NOT beat" in table
    won = _report(strong, weak, labels)
    assert won["shortcut_verdict"] == [won["shortcut_verdict"][0]]
    assert won["shortcut_verdict"][0].startswith("The detector beats the shortcut baseline 'sharpness'")
    assert won["shortcuts"]["sharpness"]["auc_difference"]["interval"][0] > 0
    # A tie is not a win, and neither is a lead the interval does not confirm.
    assert "does NOT measurably beat" in _report(strong, strong, labels)["shortcut_verdict"][0]
    close = _report(strong, strong + rng.normal(0, 0.3, 200), labels)
    low, high = close["shortcuts"]["sharpness"]["auc_difference"]["interval"]
    assert low < 0 < high and "within noise" in close["shortcut_verdict"][0]


def test_one_standard_error_is_not_a_win() -> None:
    # The case: AUC 0.624 against 0.604 on 160 images is a lead, not evidence.
    rng = np.random.default_rng(11)
    labels = np.array([0] * 80 + [1] * 80)
    shortcut = rng.normal(0.37 * labels, 1.0)
    detector = shortcut + rng.normal(0.12 * labels, 0.8)
    report = _report(detector, shortcut, labels)
    assert report["overall"]["auc"] > report["shortcuts"]["sharpness"]["overall"]["auc"]
    assert not report["shortcut_verdict"][0].startswith("The detector beats")


def test_compare_table_carries_the_shortcut_rows() -> None:
    from madlab.run.app import format_compare

    row = {"strategy": "lora", "trainable_params": 9313, "checkpoint_kib": 46.0, "train_seconds": 7.7,
           "peak_rss_mb": 523.0, "train_state_mb": 0.11, "best_epoch": 4, "d_eer": 0.475, "auc": 0.547,
           "worst_d_eer": 0.5}
    base = {**dict.fromkeys(row), "strategy": "shortcut:sharpness", "d_eer": 0.25, "auc": 0.858, "worst_d_eer": 0.3,
            "auc_low": 0.8012, "auc_high": 0.9049}
    lines = format_compare([row, base]).splitlines()
    assert lines[3].split() == ["shortcut:sharpness", "-", "-", "-", "-", "-", "25.0%", "0.858", "0.801-0.905",
                                "30.0%"]
    assert lines[2].split()[-2] == "--", "a run without intervals (an older metrics.json) shows none"
