"""Operating threshold from dev, ISO/IEC 30107-3 report on test, and the files that hold them.

Scores are detector logits (see :mod:`.inference`); any order-preserving score works the
same way, which is how the shortcut baselines (:mod:`.shortcuts`) are reported beside the
detector with the very same threshold rule.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..io.config import ConfigError
from ..io.files import write_text_atomically
from .metrics import apcer_bpcer, auc, bpcer_at_apcer, check_scores, d_eer, operating_curve

__all__ = [
    "SCORE_KIND",
    "choose_threshold",
    "format_table",
    "headline",
    "iso_report",
    "operating_points",
    "p_morph",
    "read_scores_csv",
    "shortcut_report",
    "shortcut_verdict",
    "write_json",
    "write_scores_csv",
]

SCORE_KIND = "logit"  # what a threshold value means: the detector logit, log(P(morph) / (1 - P(morph)))

OPERATING_APCERS = {"apcer=0.01": 0.01, "apcer=0.05": 0.05, "apcer=0.10": 0.10}
APCER_TARGETS = {"bpcer@apcer=1%": 0.01, "bpcer@apcer=5%": 0.05, "bpcer@apcer=10%": 0.10}
SCORE_COLUMNS = ["path", "label", "method", "score", "p_morph"]
_RULES = {
    "dev_eer": "tau minimises max(APCER, BPCER) over the dev scores (the dev equal-error point); among"
               " thresholds with the same max it is the one closest to APCER = BPCER (then the lower tau);"
               " a sample is a morph iff score >= tau",
    "dev_apcer5": "tau is the largest dev score threshold with dev APCER <= 5% (lowest dev BPCER there);"
                  " a sample is a morph iff score >= tau",
    "dev_apcer10": "tau is the largest dev score threshold with dev APCER <= 10% (lowest dev BPCER there);"
                   " a sample is a morph iff score >= tau",
}


def p_morph(logits: np.ndarray) -> np.ndarray:
    """P(morph) = sigmoid(logit) in float64, computed without overflow for large negative logits."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def choose_threshold(scores: np.ndarray, labels: np.ndarray, rule: str) -> dict[str, Any]:
    """Fix the operating threshold on dev scores with ``rule`` (see ``_RULES``); never on test.

    Raises:
        ConfigError: For an unknown rule.
        MetricsError: For scores no threshold can be set from (one class, NaN, empty).
    """
    if rule not in _RULES:
        raise ConfigError(f"threshold rule {rule!r} is not one of {sorted(_RULES)}")
    curve = operating_curve(scores, labels)
    if rule == "dev_eer":
        worst = np.maximum(curve.apcer, curve.bpcer)
        # Several thresholds can share the smallest max(APCER, BPCER) (e.g. (0.2, 0.3) and
        # (0.3, 0.3)); the balanced one is the equal-error point the rule's name promises.
        # Rates are ratios of counts, so equal values may differ in the last bit: compare with a tolerance.
        tied = np.flatnonzero(worst <= worst.min() + 1e-12)
        gap = np.abs(curve.apcer[tied] - curve.bpcer[tied])
        j = int(tied[np.flatnonzero(gap <= gap.min() + 1e-12)[0]])  # thresholds ascend: the lower τ
    else:
        j = curve.last_with_apcer_at_most(0.05 if rule == "dev_apcer5" else 0.10)
    return _threshold(scores, labels, float(curve.thresholds[j]), rule, _RULES[rule])


def _threshold(scores: np.ndarray, labels: np.ndarray, tau: float, rule: str, description: str) -> dict[str, Any]:
    if not math.isfinite(tau):  # everything accepted: keep a finite value for JSON and plots
        tau = float(np.nextafter(np.max(scores), np.inf))
    return {"rule": rule, "description": description, "value": tau, "score": SCORE_KIND,
            "dev": apcer_bpcer(scores, labels, tau)}


def operating_points(scores: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, Any]]:
    """The thresholds ``predict --operating_point`` offers, all fixed on the dev scores.

    Returns:
        ``{"eer": ..., "apcer=0.01": ..., "apcer=0.05": ..., "apcer=0.10": ...}``, each as
        :func:`choose_threshold` returns it: ``eer`` by the ``dev_eer`` rule, ``apcer=x`` the
        largest τ with dev APCER ≤ x.
    """
    points = {"eer": choose_threshold(scores, labels, "dev_eer")}
    curve = operating_curve(scores, labels)
    for name, x in OPERATING_APCERS.items():
        j = curve.last_with_apcer_at_most(x)
        points[name] = _threshold(scores, labels, float(curve.thresholds[j]), name,
                                  f"tau is the largest dev score threshold with dev APCER <= {100 * x:g}%;"
                                  " a sample is a morph iff score >= tau")
    return points


def _curve_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    eer = d_eer(scores, labels)
    return {
        "n_bona_fide": int((labels == 0).sum()),
        "n_morph": int((labels == 1).sum()),
        "d_eer": eer["eer"],
        "auc": auc(scores, labels),
        **{name: bpcer_at_apcer(scores, labels, x) for name, x in APCER_TARGETS.items()},
    }


def iso_report(scores: np.ndarray, labels: np.ndarray, methods: list[str], threshold: dict[str, Any]) -> dict:
    """Overall, per-method and worst-case metrics, with counts beside every rate.

    Per method, the morphs of that method are scored against all bona fides. The worst
    case takes the maximum D-EER, BPCER@APCER and APCER at tau over methods (the ISO rule
    for APCER over PAI species) and the minimum AUC.
    """
    scores, labels = check_scores(scores, labels)
    methods_arr = np.asarray(methods)
    tau = threshold["value"]
    report: dict[str, Any] = {
        "positive_class": "morph (attack); score = detector logit of P(morph); morph iff score >= threshold",
        "threshold": threshold,
        "overall": {**_curve_metrics(scores, labels), "at_threshold": apcer_bpcer(scores, labels, tau)},
        "per_method": {},
    }
    for method in sorted(set(methods_arr[labels == 1].tolist())):
        keep = (labels == 0) | (methods_arr == method)
        s, y = scores[keep], labels[keep]
        report["per_method"][method] = {**_curve_metrics(s, y), "at_threshold": apcer_bpcer(s, y, tau)}
    per = report["per_method"]

    def worst(key: str, pick=max, sub: str | None = None) -> dict[str, Any]:
        def value(m: str) -> float:
            item = per[m][key]
            return item[sub] if sub else item
        name = pick(per, key=value)
        return {"value": value(name), "method": name}

    report["worst_case"] = {
        "d_eer": worst("d_eer"),
        "auc": worst("auc", min),
        **{k: worst(k, sub="bpcer") for k in APCER_TARGETS},
        "apcer_at_threshold": worst("at_threshold", sub="apcer"),
    }
    return report


def shortcut_report(dev: dict[str, np.ndarray] | None, dev_labels: np.ndarray | None, test: dict[str, np.ndarray],
                    test_labels: np.ndarray, test_methods: list[str], rule: str,
                    descriptions: dict[str, str], fixed: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Each shortcut statistic scored exactly as the detector is: τ on dev by ``rule``, report on test.

    Args:
        dev, test: Statistic name -> scores oriented so that higher = morph, one per sample.
        descriptions: Statistic name -> what it measures and why its direction was fixed.
        fixed: Statistic name -> a τ already fixed on dev (as :func:`choose_threshold` returns it),
            used instead of ``dev`` (a model file records them for scoring other data sets).

    Returns:
        Name -> ``{"description", "threshold", "overall", "per_method", "worst_case"}``.
    """
    out = {}
    for name in test:
        if fixed is not None:
            if name not in fixed:
                continue
            threshold = dict(fixed[name])
        else:
            assert dev is not None and dev_labels is not None
            threshold = choose_threshold(dev[name], dev_labels, rule)
        threshold["score"] = f"shortcut statistic {name!r}, oriented so that higher = morph"
        report = iso_report(test[name], test_labels, test_methods, threshold)
        out[name] = {"description": descriptions[name], "threshold": threshold, "overall": report["overall"],
                     "per_method": report["per_method"], "worst_case": report["worst_case"]}
    return out


def shortcut_verdict(report: dict[str, Any]) -> list[str]:
    """Plain sentences comparing the detector with each shortcut baseline on the overall test D-EER and AUC.

    The detector *beats* a shortcut only with both a lower D-EER and a higher AUC.
    """
    mine = report["overall"]
    lines = []
    for name, base in report.get("shortcuts", {}).items():
        theirs = base["overall"]
        figures = (f"D-EER {100 * mine['d_eer']:.1f}% vs {100 * theirs['d_eer']:.1f}%,"
                   f" AUC {mine['auc']:.3f} vs {theirs['auc']:.3f}")
        if mine["d_eer"] < theirs["d_eer"] and mine["auc"] > theirs["auc"]:
            lines.append(f"The detector beats the shortcut baseline '{name}' ({figures}).")
        else:
            lines.append(
                f"The detector does NOT beat the shortcut baseline '{name}' ({figures}): this one image"
                " statistic separates these test morphs at least as well, so the result is no evidence that"
                " the detector learned more than that cue.")
    return lines


def _rate(rate: float, errors: int, n: int) -> str:
    """A rate with its counts, right-aligned in a 17-character column: ``  52.5% (21/40)``."""
    return f"{100 * rate:.1f}% ({errors}/{n})".rjust(17)


def format_table(report: dict) -> str:
    """The terminal summary: one row per method plus overall, worst case and the shortcut baselines."""
    head = (f"{'subset':<20}{'BF':>5}{'M':>5}{'D-EER':>8}{'AUC':>7}{'BPCER@1%':>10}{'@5%':>7}{'@10%':>7}"
            f"{'APCER@t':>17}{'BPCER@t':>17}")
    lines = [head, "-" * len(head)]

    def row(name: str, m: dict) -> str:
        at = m["at_threshold"]
        return (f"{name:<20}{m['n_bona_fide']:>5}{m['n_morph']:>5}{100 * m['d_eer']:>7.1f}%{m['auc']:>7.3f}"
                + "".join(f"{100 * m[k]['bpcer']:>{w}.1f}%" for k, w in zip(APCER_TARGETS, (9, 6, 6)))
                + _rate(at["apcer"], at["apcer_errors"], at["n_morph"])
                + _rate(at["bpcer"], at["bpcer_errors"], at["n_bona_fide"]))

    for name, m in report["per_method"].items():
        lines.append(row(name, m))
    lines.append(row("overall", report["overall"]))
    for name, base in report.get("shortcuts", {}).items():
        lines.append(row(f"shortcut:{name}", base["overall"]))
    w = report["worst_case"]
    lines.append(f"worst case over methods: D-EER {100 * w['d_eer']['value']:.1f}% ({w['d_eer']['method']}),"
                 f" AUC {w['auc']['value']:.3f} ({w['auc']['method']}),"
                 f" APCER@t {100 * w['apcer_at_threshold']['value']:.1f}% ({w['apcer_at_threshold']['method']})")
    t = report["threshold"]
    lines.append(f"threshold t = {t['value']:.4f} (logit; P(morph) = {float(p_morph(t['value'])):.4f}) fixed on dev"
                 f" by rule {t['rule']}: {t['description']}")
    if report.get("shortcuts"):
        lines.append("shortcut:<name> rows score the test images by one image statistic alone (direction fixed in"
                     " advance, threshold on dev by the same rule):")
        lines += [f"  {name}: {base['description']}" for name, base in report["shortcuts"].items()]
        lines += report.get("shortcut_verdict", [])
    return "\n".join(lines)


def headline(report: dict) -> str:
    """The report's one-line result, which every command that tests ends with: the overall figures
    with their counts, and whether the detector beats every shortcut baseline (:func:`shortcut_verdict`)."""
    m = report["overall"]
    at = m["at_threshold"]
    line = (f"AUC {m['auc']:.3f}, D-EER {100 * m['d_eer']:.1f}% on {m['n_bona_fide']} bona fide and"
            f" {m['n_morph']} morph images; at the dev threshold APCER {100 * at['apcer']:.1f}%,"
            f" BPCER {100 * at['bpcer']:.1f}%")
    verdicts = report.get("shortcut_verdict") or []
    if verdicts:
        beaten = sum(v.startswith("The detector beats") for v in verdicts)
        line += f"; beats {beaten} of {len(verdicts)} shortcut baselines"
    return line


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON (no NaN or infinity), written atomically."""
    write_text_atomically(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_scores_csv(path: Path, paths: list[str], labels: np.ndarray, methods: list[str], scores: np.ndarray) -> None:
    """One row per image: ``path,label,method,score,p_morph`` (label 1 = morph; score = logit, full precision)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(SCORE_COLUMNS)
    for p, y, m, s in zip(paths, labels, methods, scores):
        writer.writerow([p, int(y), m, repr(float(s)), repr(float(p_morph(s)))])
    write_text_atomically(path, buffer.getvalue())


def read_scores_csv(path: Path) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """``(paths, labels, methods, scores)`` from a file written by :func:`write_scores_csv`."""
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return ([r["path"] for r in rows], np.array([int(r["label"]) for r in rows]),
            [r["method"] for r in rows], np.array([float(r["score"]) for r in rows]))
