"""Operating threshold from dev, ISO/IEC 30107-3 report on test, and the files that hold them."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import apcer_bpcer, auc, bpcer_at_apcer, check_scores, d_eer, operating_curve

__all__ = ["choose_threshold", "format_table", "iso_report", "read_scores_csv", "write_json", "write_scores_csv"]

APCER_TARGETS = {"bpcer@apcer=1%": 0.01, "bpcer@apcer=5%": 0.05, "bpcer@apcer=10%": 0.10}
SCORE_COLUMNS = ["path", "label", "method", "score"]
_RULES = {
    "dev_eer": "tau minimises max(APCER, BPCER) over the dev scores (the dev equal-error point);"
               " a sample is a morph iff score >= tau",
    "dev_apcer5": "tau is the largest dev score threshold with dev APCER <= 5% (lowest dev BPCER there);"
                  " a sample is a morph iff score >= tau",
    "dev_apcer10": "tau is the largest dev score threshold with dev APCER <= 10% (lowest dev BPCER there);"
                   " a sample is a morph iff score >= tau",
}


def choose_threshold(scores: np.ndarray, labels: np.ndarray, rule: str) -> dict[str, Any]:
    """Fix the operating threshold on dev scores with ``rule`` (see ``_RULES``); never on test."""
    if rule not in _RULES:
        raise ValueError(f"threshold rule {rule!r} is not one of {sorted(_RULES)}")
    curve = operating_curve(scores, labels)
    if rule == "dev_eer":
        worst = np.maximum(curve.apcer, curve.bpcer)
        j = int(np.argmin(worst))
    else:
        x = 0.05 if rule == "dev_apcer5" else 0.10
        j = int(np.nonzero(curve.apcer <= x + 1e-12)[0][-1])
    tau = float(curve.thresholds[j])
    if not math.isfinite(tau):  # everything accepted: keep a finite value for JSON and plots
        tau = float(np.nextafter(np.max(scores), np.inf))
    return {"rule": rule, "description": _RULES[rule], "value": tau, "dev": apcer_bpcer(scores, labels, tau)}


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
        "positive_class": "morph (attack); score = P(morph); morph iff score >= threshold",
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


def format_table(report: dict) -> str:
    """The terminal summary: one row per method plus overall and worst case, counts included."""
    head = (f"{'subset':<14}{'BF':>5}{'M':>5}{'D-EER':>8}{'AUC':>7}{'BPCER@1%':>10}{'@5%':>7}{'@10%':>7}"
            f"{'APCER@t':>14}{'BPCER@t':>14}")
    lines = [head, "-" * len(head)]

    def row(name: str, m: dict) -> str:
        at = m["at_threshold"]
        return (f"{name:<14}{m['n_bona_fide']:>5}{m['n_morph']:>5}{100 * m['d_eer']:>7.1f}%{m['auc']:>7.3f}"
                + "".join(f"{100 * m[k]['bpcer']:>{w}.1f}%" for k, w in zip(APCER_TARGETS, (9, 6, 6)))
                + f"{100 * at['apcer']:>6.1f}% ({at['apcer_errors']}/{at['n_morph']})"
                + f"{100 * at['bpcer']:>6.1f}% ({at['bpcer_errors']}/{at['n_bona_fide']})")

    for name, m in report["per_method"].items():
        lines.append(row(name, m))
    lines.append(row("overall", report["overall"]))
    w = report["worst_case"]
    lines.append(f"worst case over methods: D-EER {100 * w['d_eer']['value']:.1f}% ({w['d_eer']['method']}),"
                 f" AUC {w['auc']['value']:.3f} ({w['auc']['method']}),"
                 f" APCER@t {100 * w['apcer_at_threshold']['value']:.1f}% ({w['apcer_at_threshold']['method']})")
    t = report["threshold"]
    lines.append(f"threshold t = {t['value']:.4f} fixed on dev by rule {t['rule']}: {t['description']}")
    return "\n".join(lines)


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
        with os.fdopen(fd, "w", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    _atomic_text(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_scores_csv(path: Path, paths: list[str], labels: np.ndarray, methods: list[str], scores: np.ndarray) -> None:
    """One row per image: ``path,label,method,score`` (label 1 = morph; full float precision)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(SCORE_COLUMNS)
    for p, y, m, s in zip(paths, labels, methods, scores):
        writer.writerow([p, int(y), m, repr(float(s))])
    _atomic_text(path, buffer.getvalue())


def read_scores_csv(path: Path) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return ([r["path"] for r in rows], np.array([int(r["label"]) for r in rows]),
            [r["method"] for r in rows], np.array([float(r["score"]) for r in rows]))
