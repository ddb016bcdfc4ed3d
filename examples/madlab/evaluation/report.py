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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io.config import ConfigError
from ..io.files import write_text_atomically
from .bootstrap import LEVEL, Resamples, interval, metric_samples
from .metrics import apcer_bpcer, auc, bpcer_at_apcer, check_scores, d_eer, operating_curve

__all__ = [
    "SCORE_KIND",
    "add_auc_differences",
    "choose_threshold",
    "figure_text",
    "format_table",
    "headline",
    "interval_text",
    "iso_report",
    "operating_points",
    "p_morph",
    "read_scores_csv",
    "shortcut_report",
    "shortcut_verdict",
    "too_small",
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


MIN_PER_CLASS = 2  # images of each class below which no rate, D-EER or AUC is printed as a number


def too_small(n_bona_fide: int, n_morph: int) -> dict[str, str]:
    """The figures a test set of these sizes cannot give, each with why (``flags`` in metrics.json).

    With one image in a class every figure is 0 or 1 (an AUC of 1.000 from one bona fide and one
    morph says nothing). BPCER@APCER=x needs at least 1/x morphs: with fewer, the only APCER at
    most x is 0, so the figure is the BPCER at APCER 0, not at x.
    """
    if min(n_bona_fide, n_morph) < MIN_PER_CLASS:
        why = f"fewer than {MIN_PER_CLASS} images in a class: the figure can only be 0 or 1"
        return {name: why for name in ("d_eer", "auc", *APCER_TARGETS)}
    flags = {}
    for name, x in APCER_TARGETS.items():
        needed = math.ceil(1.0 / x - 1e-9)
        if n_morph < needed:
            flags[name] = (f"fewer than {needed} morphs: APCER = {100 * x:g}% cannot be measured (the figure is"
                           " the BPCER at APCER 0)")
    return flags


def _curve_metrics(scores: np.ndarray, labels: np.ndarray,
                   resamples: Resamples | None) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """The threshold-free figures, their flags and (with ``resamples``) their intervals; and the
    figures of every resample, for the worst case's interval."""
    eer = d_eer(scores, labels)
    n_bf, n_m = int((labels == 0).sum()), int((labels == 1).sum())
    metrics = {
        "n_bona_fide": n_bf,
        "n_morph": n_m,
        "d_eer": eer["eer"],
        "auc": auc(scores, labels),
        **{name: bpcer_at_apcer(scores, labels, x) for name, x in APCER_TARGETS.items()},
        "flags": too_small(n_bf, n_m),
    }
    if resamples is None:
        return metrics, None
    draws = metric_samples(scores, labels, resamples.weights, APCER_TARGETS)
    metrics["intervals"] = _intervals(draws)
    return metrics, draws


def _intervals(draws: dict[str, np.ndarray]) -> dict[str, Any]:
    """``name -> [low, high]`` (None when no resample had both classes), and how many resamples did."""
    return {**{name: interval(values) for name, values in draws.items()},
            "valid_resamples": int(np.isfinite(draws["auc"]).sum())}


def iso_report(scores: np.ndarray, labels: np.ndarray, methods: list[str], threshold: dict[str, Any],
               resamples: Resamples | None = None) -> dict:
    """Overall, per-method and worst-case metrics, with counts beside every rate.

    Per method, the morphs of that method are scored against all bona fides. The worst
    case takes the maximum D-EER, BPCER@APCER and APCER at tau over methods (the ISO rule
    for APCER over PAI species) and the minimum AUC. With ``resamples`` (:func:`.bootstrap.draw`
    over these images), every D-EER, AUC and BPCER@APCER gets its interval (``intervals``), the
    worst case one of the worst case taken in every resample.
    """
    scores, labels = check_scores(scores, labels)
    methods_arr = np.asarray(methods)
    tau = threshold["value"]
    overall, _ = _curve_metrics(scores, labels, resamples)
    report: dict[str, Any] = {
        "positive_class": "morph (attack); score = detector logit of P(morph); morph iff score >= threshold",
        "threshold": threshold,
        "overall": {**overall, "at_threshold": apcer_bpcer(scores, labels, tau)},
        "per_method": {},
    }
    if resamples is not None:
        report["bootstrap"] = resamples.describe()
    draws = {}
    for method in sorted(set(methods_arr[labels == 1].tolist())):
        keep = (labels == 0) | (methods_arr == method)
        s, y = scores[keep], labels[keep]
        metrics, draws[method] = _curve_metrics(s, y, None if resamples is None else resamples.subset(keep))
        report["per_method"][method] = {**metrics, "at_threshold": apcer_bpcer(s, y, tau)}
    per = report["per_method"]

    def worst(key: str, pick=max, sub: str | None = None) -> dict[str, Any]:
        def value(m: str) -> float:
            item = per[m][key]
            return item[sub] if sub else item
        name = pick(per, key=value)
        found = {"value": value(name), "method": name}
        if resamples is not None and key in draws[name]:
            every = np.stack([draws[m][key] for m in per])  # a resample lacking a method's morphs has no worst case
            found["interval"] = interval(every.max(axis=0) if pick is max else every.min(axis=0))
        return found

    report["worst_case"] = {
        "d_eer": worst("d_eer"),
        "auc": worst("auc", min),
        **{k: worst(k, sub="bpcer") for k in APCER_TARGETS},
        "apcer_at_threshold": worst("at_threshold", sub="apcer"),
    }
    return report


def shortcut_report(dev: dict[str, np.ndarray] | None, dev_labels: np.ndarray | None, test: dict[str, np.ndarray],
                    test_labels: np.ndarray, test_methods: list[str], rule: str,
                    descriptions: dict[str, str], fixed: dict[str, dict[str, Any]] | None = None,
                    resamples: Resamples | None = None) -> dict[str, Any]:
    """Each shortcut statistic scored exactly as the detector is: τ on dev by ``rule``, report on test.

    Args:
        dev, test: Statistic name -> scores oriented so that higher = morph, one per sample.
        descriptions: Statistic name -> what it measures and why its direction was fixed.
        fixed: Statistic name -> a τ already fixed on dev (as :func:`choose_threshold` returns it),
            used instead of ``dev`` (a model file records them for scoring other data sets).
        resamples: The detector's resamples of the test images, for the same intervals (paired).

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
        report = iso_report(test[name], test_labels, test_methods, threshold, resamples)
        out[name] = {"description": descriptions[name], "threshold": threshold, "overall": report["overall"],
                     "per_method": report["per_method"], "worst_case": report["worst_case"]}
    return out


def add_auc_differences(report: dict[str, Any], scores: np.ndarray, shortcut_scores: dict[str, np.ndarray],
                        labels: np.ndarray, resamples: Resamples) -> None:
    """Give each shortcut of ``report`` the detector's AUC minus its own (``auc_difference``), with the
    interval of that difference over the same resamples of the same test images (paired bootstrap)."""
    mine = metric_samples(scores, labels, resamples.weights, {})["auc"]
    for name, base in report.get("shortcuts", {}).items():
        theirs = metric_samples(shortcut_scores[name], labels, resamples.weights, {})["auc"]
        base["auc_difference"] = {"value": report["overall"]["auc"] - base["overall"]["auc"],
                                  "interval": interval(mine - theirs), "paired": True}


def shortcut_verdict(report: dict[str, Any]) -> list[str]:
    """Plain sentences comparing the detector with each shortcut baseline on the overall test AUC.

    The detector *beats* a shortcut only when the interval of the AUC difference
    (:func:`add_auc_differences`) lies above zero; an interval that holds zero is "within noise".
    """
    mine = report["overall"]
    over = _resampled(report)
    lines = []
    for name, base in report.get("shortcuts", {}).items():
        theirs = base["overall"]
        figures = (f"AUC {mine['auc']:.3f} vs {theirs['auc']:.3f},"
                   f" D-EER {100 * mine['d_eer']:.1f}% vs {100 * theirs['d_eer']:.1f}%")
        difference = base.get("auc_difference") or {}
        bounds = difference.get("interval")
        if "auc" in mine.get("flags", {}):
            lines.append(f"The detector cannot be compared with the shortcut baseline '{name}': too few test images"
                         f" ({mine['flags']['auc']}).")
            continue
        if bounds is None:
            lines.append(f"The detector is not compared with the shortcut baseline '{name}' ({figures}): no interval"
                         " of the difference was computed, so no verdict.")
            continue
        noise = (f"AUC difference {difference['value']:+.3f}, {100 * LEVEL:g}% interval {bounds[0]:+.3f} to"
                 f" {bounds[1]:+.3f} by a paired bootstrap over {over}")
        if bounds[0] > 0:
            lines.append(f"The detector beats the shortcut baseline '{name}' ({figures}; {noise}).")
        elif bounds[1] < 0:
            lines.append(
                f"The detector does NOT beat the shortcut baseline '{name}' ({figures}; {noise}): this one image"
                " statistic separates these test morphs better, so the result is no evidence that the detector"
                " learned more than that cue.")
        else:
            lines.append(
                f"The detector does NOT measurably beat the shortcut baseline '{name}' ({figures}; {noise}): the"
                " interval holds zero, the difference is within noise, so the result is no evidence that the"
                " detector learned more than that cue.")
    return lines


def _resampled(report: dict[str, Any]) -> str:
    """What the intervals resampled, for the terminal: ``the 12 test identities`` or ``the 60 test images``."""
    info = report.get("bootstrap")
    if not info:
        return "no resamples"
    unit = "identities" if info["unit"] == "identity" else "images (per class)"
    return f"the {info['n_units']} test {unit}"


def _rate(rate: float, errors: int, n: int) -> str:
    """A rate with its counts, right-aligned in a 17-character column: ``  52.5% (21/40)``."""
    return f"{100 * rate:.1f}% ({errors}/{n})".rjust(17)


def figure_text(key: str, value: float, flagged: bool = False) -> str:
    """A figure as every table prints it: ``0.955`` for an AUC, ``11.2%`` for a rate, ``--`` when the
    test set is too small for it (:func:`too_small`)."""
    if flagged:
        return "--"
    return f"{value:.3f}" if key == "auc" else f"{100 * value:.1f}%"


def interval_text(key: str, bounds: Sequence[float] | None, flagged: bool = False) -> str:
    """An interval as every table prints it: ``0.912-0.981`` for an AUC, ``2.1-9.8%`` for a rate, or ``--``."""
    if bounds is None or flagged:
        return "--"
    if key == "auc":
        return f"{bounds[0]:.3f}-{bounds[1]:.3f}"
    return f"{100 * bounds[0]:.1f}-{100 * bounds[1]:.1f}%"


def _figure(m: dict, key: str, width: int) -> str:
    """One threshold-free figure of a report part, right-aligned in ``width`` characters."""
    value = m[key]["bpcer"] if isinstance(m[key], dict) else m[key]
    return figure_text(key, value, key in m.get("flags", {})).rjust(width)


def _span(m: dict, key: str, width: int) -> str:
    """The interval of one figure of a report part, right-aligned."""
    return interval_text(key, m.get("intervals", {}).get(key), key in m.get("flags", {})).rjust(width)


def format_table(report: dict) -> str:
    """The terminal summary: one row per method plus overall, worst case and the shortcut baselines,
    the intervals of the same rows, and every figure the test set is too small for."""
    head = (f"{'subset':<20}{'BF':>5}{'M':>5}{'D-EER':>8}{'AUC':>7}{'BPCER@1%':>10}{'@5%':>7}{'@10%':>7}"
            f"{'APCER@t':>17}{'BPCER@t':>17}")
    lines = [head, "-" * len(head)]
    rows = [*report["per_method"].items(), ("overall", report["overall"]),
            *((f"shortcut:{name}", base["overall"]) for name, base in report.get("shortcuts", {}).items())]

    def row(name: str, m: dict) -> str:
        at = m["at_threshold"]
        return (f"{name:<20}{m['n_bona_fide']:>5}{m['n_morph']:>5}{_figure(m, 'd_eer', 8)}{_figure(m, 'auc', 7)}"
                + "".join(_figure(m, k, w) for k, w in zip(APCER_TARGETS, (10, 7, 7)))
                + _rate(at["apcer"], at["apcer_errors"], at["n_morph"])
                + _rate(at["bpcer"], at["bpcer_errors"], at["n_bona_fide"]))

    lines += [row(name, m) for name, m in rows]
    w = report["worst_case"]

    def worst(key: str) -> str:
        method = w[key]["method"]
        return f"{_figure({**report['per_method'][method], key: w[key]['value']}, key, 0)} ({method})"

    lines.append(f"worst case over methods: D-EER {worst('d_eer')}, AUC {worst('auc')},"
                 f" APCER@t {100 * w['apcer_at_threshold']['value']:.1f}% ({w['apcer_at_threshold']['method']})")
    if report.get("bootstrap"):
        info = report["bootstrap"]
        lines.append(f"{100 * LEVEL:g}% intervals (percentile bootstrap over {_resampled(report)},"
                     f" {info['resamples']} resamples, seed {info['seed']}):")
        # The worst case is flagged wherever a method is: it is the worst of figures that are not numbers.
        worst_case = {"intervals": {k: w[k].get("interval") for k in w},
                      "flags": {k: why for m in report["per_method"].values() for k, why in m.get("flags", {}).items()}}
        for name, m in [*rows, ("worst case", worst_case)]:
            lines.append(f"  {name:<20}D-EER {_span(m, 'd_eer', 11)}  AUC {_span(m, 'auc', 11)}  BPCER@1/5/10% "
                         + " ".join(_span(m, k, 11) for k in APCER_TARGETS))
    lines += _flag_lines(rows)
    t = report["threshold"]
    lines.append(f"threshold t = {t['value']:.4f} (logit; P(morph) = {float(p_morph(t['value'])):.4f}) fixed on dev"
                 f" by rule {t['rule']}: {t['description']}")
    if report.get("shortcuts"):
        lines.append("shortcut:<name> rows score the test images by one image statistic alone (direction fixed in"
                     " advance, threshold on dev by the same rule):")
        lines += [f"  {name}: {base['description']}" for name, base in report["shortcuts"].items()]
        lines += report.get("shortcut_verdict", [])
    return "\n".join(lines)


def _flag_lines(rows: list[tuple[str, dict]]) -> list[str]:
    """Why each ``--`` of the table is not a number: one line per reason, naming its subsets and figures."""
    reasons: dict[str, tuple[list[str], list[str]]] = {}
    for name, m in rows:
        for key, why in m.get("flags", {}).items():
            subsets, keys = reasons.setdefault(why, ([], []))
            subsets += [name] if name not in subsets else []
            keys += [key] if key not in keys else []
    if not reasons:
        return []
    return ["-- = too few test images for that figure (metrics.json keeps it, flagged under flags):",
            *(f"  {', '.join(keys)} of {', '.join(subsets)}: {why}" for why, (subsets, keys) in reasons.items())]


def headline(report: dict) -> str:
    """The report's one-line result, which every command that tests ends with: the overall figures
    with their counts and 95 % intervals, and whether the detector beats every shortcut baseline
    (:func:`shortcut_verdict`: only when the interval of the AUC difference excludes zero)."""
    m = report["overall"]
    at = m["at_threshold"]
    flags = m.get("flags", {})
    parts = []
    for key, name in (("auc", "AUC"), ("d_eer", "D-EER")):
        if key in flags:
            parts.append(f"{name} -- ({flags[key]})")
            continue
        value = f"{m[key]:.3f}" if key == "auc" else f"{100 * m[key]:.1f}%"
        bounds = m.get("intervals", {}).get(key)
        parts.append(f"{name} {value}" + (f" (95% {interval_text(key, bounds)})" if bounds else ""))
    line = (f"{', '.join(parts)} on {m['n_bona_fide']} bona fide and {m['n_morph']} morph images;"
            f" at the dev threshold APCER {100 * at['apcer']:.1f}%, BPCER {100 * at['bpcer']:.1f}%")
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
