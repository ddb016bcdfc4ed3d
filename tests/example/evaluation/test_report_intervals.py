"""madlab.evaluation.report with resamples: intervals beside every figure, too-small test sets flagged."""

from __future__ import annotations

import json

import numpy as np
from madlab.evaluation.bootstrap import draw, interval, metric_samples
from madlab.evaluation.report import APCER_TARGETS, choose_threshold, format_table, iso_report, too_small


def _report(scores: np.ndarray, labels: np.ndarray, methods: list[str], identities=None) -> dict:
    return iso_report(scores, labels, methods, choose_threshold(scores, labels, "dev_eer"), draw(labels, identities))


def test_one_bona_fide_and_one_morph_print_no_bare_figure() -> None:
    report = _report(np.array([0.1, 0.9]), np.array([0, 1]), ["bona_fide", "blend"])
    assert report["overall"]["auc"] == 1.0, "metrics.json keeps the figure"
    assert set(report["overall"]["flags"]) == {"d_eer", "auc", *APCER_TARGETS}
    table = format_table(report)
    assert "1.000" not in table
    assert "fewer than 2 images in a class" in table
    assert "AUC -- (blend)" in table, "the worst case is not a bare number either"


def test_bpcer_at_apcer_needs_one_over_apcer_morphs() -> None:
    assert set(too_small(50, 9)) == set(APCER_TARGETS)  # 1/10% = 10 morphs needed at least
    assert set(too_small(50, 12)) == {"bpcer@apcer=1%", "bpcer@apcer=5%"}
    assert set(too_small(50, 20)) == {"bpcer@apcer=1%"}
    assert too_small(50, 100) == {} and too_small(2, 100) == {}
    rng = np.random.default_rng(0)
    labels = np.array([0] * 30 + [1] * 40)
    report = _report(rng.normal(labels, 1.0), labels, ["bona_fide"] * 30 + ["blend"] * 40)
    assert set(report["overall"]["flags"]) == {"bpcer@apcer=1%"}
    row = next(line for line in format_table(report).splitlines() if line.startswith("overall"))
    assert row.split()[5] == "--" and row.split()[6].endswith("%")


def test_every_figure_has_its_interval_over_the_test_people() -> None:
    rng = np.random.default_rng(1)
    people = [f"p{k}" for k in range(30)]
    identities = [(p,) for p in people] + [(people[k], people[(k + 1) % 30]) for k in range(30)] * 2
    labels = np.array([0] * 30 + [1] * 60)
    methods = ["bona_fide"] * 30 + ["blend"] * 30 + ["splice"] * 30
    scores = rng.normal(labels, 1.0)
    report = _report(scores, labels, methods, identities)
    assert report["bootstrap"]["unit"] == "identity" and report["bootstrap"]["n_units"] == 30
    resamples = draw(labels, identities)
    direct = metric_samples(scores, labels, resamples.weights, APCER_TARGETS)
    for key in ("auc", "d_eer", *APCER_TARGETS):
        assert report["overall"]["intervals"][key] == interval(direct[key])
        for method in ("blend", "splice"):
            low, high = report["per_method"][method]["intervals"][key]
            assert low <= high
        low, high = report["worst_case"][key]["interval"]
        assert low <= high
    keep = (labels == 0) | (np.array(methods) == "blend")
    blend = metric_samples(scores[keep], labels[keep], resamples.weights[:, keep], {})["auc"]
    splice = metric_samples(scores[~(np.array(methods) == "blend")], labels[~(np.array(methods) == "blend")],
                            resamples.weights[:, ~(np.array(methods) == "blend")], {})["auc"]
    assert report["worst_case"]["auc"]["interval"] == interval(np.minimum(blend, splice))
    table = format_table(report)
    assert "95% intervals (percentile bootstrap over the 30 test identities, 1000 resamples, seed 0)" in table
    json.dumps(report, allow_nan=False)  # metrics.json stays valid JSON


def test_old_keys_are_kept_beside_the_new_ones() -> None:
    rng = np.random.default_rng(2)
    labels = np.array([0] * 20 + [1] * 20)
    scores = rng.normal(labels, 1.0)
    methods = ["bona_fide"] * 20 + ["blend"] * 20
    plain = iso_report(scores, labels, methods, choose_threshold(scores, labels, "dev_eer"))
    report = _report(scores, labels, methods)
    for part in ("overall", "worst_case"):
        for key, value in plain[part].items():
            now = report[part][key]
            assert now == value or (isinstance(value, dict) and value.items() <= now.items())
