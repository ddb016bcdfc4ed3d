"""ROC, DET and score-histogram figures (matplotlib, Agg backend: no display needed).

Both curves join consecutive operating points with straight segments. Where bona fides and
morphs share a score, one threshold step moves both rates at once, so the segment is a
diagonal (the ROC then encloses exactly the AUC that counts ties as ½); without ties every
segment is horizontal or vertical, as a step plot would draw it. The dev threshold τ and the
test EER point are marked on the detector's overall curve; the legends give AUC and D-EER.
The shortcut baselines (:mod:`.shortcuts`) are drawn dashed beside the detector.
"""

from __future__ import annotations

import io
from pathlib import Path
from statistics import NormalDist

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from ..io.files import write_atomically
from .metrics import apcer_bpcer, auc, d_eer, operating_curve

__all__ = ["DET_CLIP", "det_figure", "roc_figure", "roc_points", "save_plots"]

DET_CLIP = 1e-3  # probit axes cannot show 0 or 1: rates below 0.1 % (or above 99.9 %) are drawn at the edge
Baselines = dict[str, tuple[np.ndarray, float]]  # name -> (test scores, dev threshold)
_BASELINE_STYLES = [{"ls": ls, "lw": 1, "color": c} for ls, c in
                    [("--", "0.35"), ("-.", "0.55"), (":", "0.35"), ((0, (5, 1, 1, 1)), "0.55")] * 4]


def _subsets(scores: np.ndarray, labels: np.ndarray, methods: list[str]):
    m = np.asarray(methods)
    yield "overall", scores, labels
    for method in sorted(set(m[labels == 1].tolist())):
        keep = (labels == 0) | (m == method)
        yield method, scores[keep], labels[keep]


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC vertices ``(BPCER, 1 - APCER)`` at every candidate threshold, from (1, 1) to (0, 0).

    Drawn joined by straight lines, tied scores give diagonal segments.
    """
    c = operating_curve(scores, labels)
    return c.bpcer, 1.0 - c.apcer


def _label(name: str, s: np.ndarray, y: np.ndarray) -> str:
    return f"{name} (AUC {auc(s, y):.3f}, D-EER {100 * d_eer(s, y)['eer']:.1f}%)"


def _marks(s: np.ndarray, y: np.ndarray, threshold: float) -> tuple[tuple[float, float], float]:
    """((APCER, BPCER) at τ, EER)."""
    at = apcer_bpcer(s, y, threshold)
    return (at["apcer"], at["bpcer"]), d_eer(s, y)["eer"]


def roc_figure(scores: np.ndarray, labels: np.ndarray, methods: list[str], threshold: float,
               baselines: Baselines | None = None) -> Figure:
    """The ROC figure; the first line is the detector's overall curve."""
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    for name, s, y in _subsets(scores, labels, methods):
        x, tpr = roc_points(s, y)
        ax.plot(x, tpr, label=_label(name, s, y), lw=2 if name == "overall" else 1)
    for (name, (s, _)), style in zip((baselines or {}).items(), _BASELINE_STYLES):
        x, tpr = roc_points(s, labels)
        ax.plot(x, tpr, **style, label=_label(f"shortcut: {name}", s, labels))
    (apcer, bpcer), eer = _marks(scores, labels, threshold)
    ax.plot([bpcer], [1 - apcer], "ko", label=f"dev threshold τ (APCER {100 * apcer:.1f}%, BPCER {100 * bpcer:.1f}%)")
    ax.plot([eer], [1 - eer], "k*", ms=10, label=f"EER point ({100 * eer:.1f}%)")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="BPCER (bona fide rejected)", ylabel="1 - APCER (morphs detected)", title="ROC (test)",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def det_figure(scores: np.ndarray, labels: np.ndarray, methods: list[str], threshold: float,
               baselines: Baselines | None = None) -> Figure:
    """The DET figure on normal-deviate axes; rates of 0 % (100 %) are drawn at 0.1 % (99.9 %) and say so."""
    nd = NormalDist()

    def probit(v: np.ndarray) -> np.ndarray:
        return np.array([nd.inv_cdf(float(x)) for x in np.clip(np.atleast_1d(v), DET_CLIP, 1 - DET_CLIP)])

    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    for name, s, y in _subsets(scores, labels, methods):
        c = operating_curve(s, y)
        ax.plot(probit(c.apcer), probit(c.bpcer), label=_label(name, s, y), lw=2 if name == "overall" else 1)
    for (name, (s, _)), style in zip((baselines or {}).items(), _BASELINE_STYLES):
        c = operating_curve(s, labels)
        ax.plot(probit(c.apcer), probit(c.bpcer), **style, label=_label(f"shortcut: {name}", s, labels))
    (apcer, bpcer), eer = _marks(scores, labels, threshold)
    ax.plot(probit(apcer), probit(bpcer), "ko", label=f"dev threshold τ (APCER {100 * apcer:.1f}%, BPCER"
                                                     f" {100 * bpcer:.1f}%)")
    ax.plot(probit(eer), probit(eer), "k*", ms=10, label=f"EER point ({100 * eer:.1f}%)")
    ticks = [DET_CLIP, 0.01, 0.05, 0.2, 0.5, 0.8, 0.95, 0.99, 1 - DET_CLIP]
    names = ["≤0.1 (incl. 0)"] + [f"{100 * t:g}" for t in ticks[1:-1]] + ["≥99.9 (incl. 100)"]
    ax.set_xticks(probit(np.array(ticks)), names, rotation=45, fontsize=7)
    ax.set_yticks(probit(np.array(ticks)), names, fontsize=7)
    ax.set(xlabel="APCER (%); 0 % is drawn at the ≤0.1 tick", ylabel="BPCER (%); 0 % is drawn at the ≤0.1 tick",
           title="DET (test, normal-deviate scale)")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    return fig


def _histogram(scores: np.ndarray, labels: np.ndarray, methods: list[str], threshold: float) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    lo, hi = float(scores.min()), float(scores.max())
    bins = np.linspace(lo, hi, 26) if hi > lo else np.linspace(lo - 0.01, hi + 0.01, 3)  # zoom on the scores
    m = np.asarray(methods)
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label=f"bona fide (n={int((labels == 0).sum())})")
    for method in sorted(set(m[labels == 1].tolist())):
        sel = (labels == 1) & (m == method)
        ax.hist(scores[sel], bins=bins, alpha=0.5, label=f"morph: {method} (n={int(sel.sum())})")
    ax.axvline(threshold, color="k", ls="--", label=f"dev threshold τ = {threshold:.3f}")
    ax.set(xlabel="score = logit of P(morph)", ylabel="images", title="Test score distributions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _save(fig: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return write_atomically(path, buffer.getvalue())


def save_plots(out: Path, scores: np.ndarray, labels: np.ndarray, methods: list[str], threshold: float,
               baselines: Baselines | None = None) -> list[Path]:
    """Write ``roc.png``, ``det.png`` and ``score_histogram.png`` into ``out`` atomically; return their paths.

    Args:
        baselines: Shortcut statistic name -> (its test scores, higher = morph; its dev threshold).
    """
    return [
        _save(roc_figure(scores, labels, methods, threshold, baselines), out / "roc.png"),
        _save(det_figure(scores, labels, methods, threshold, baselines), out / "det.png"),
        _save(_histogram(scores, labels, methods, threshold), out / "score_histogram.png"),
    ]
