"""ROC, DET and score-histogram figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from statistics import NormalDist

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from .metrics import operating_curve

__all__ = ["save_plots"]


def _subsets(scores: np.ndarray, labels: np.ndarray, methods: list[str]):
    m = np.asarray(methods)
    yield "overall", scores, labels
    for method in sorted(set(m[labels == 1].tolist())):
        keep = (labels == 0) | (m == method)
        yield method, scores[keep], labels[keep]


def save_plots(out: Path, scores: np.ndarray, labels: np.ndarray, methods: list[str], threshold: float) -> list[Path]:
    """Write ``roc.png``, ``det.png`` and ``score_histogram.png`` into ``out``; return their paths."""
    paths = [out / "roc.png", out / "det.png", out / "score_histogram.png"]
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, s, y in _subsets(scores, labels, methods):
        c = operating_curve(s, y)
        ax.plot(c.bpcer, 1 - c.apcer, label=name, drawstyle="steps-post")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="BPCER (bona fide rejected)", ylabel="1 - APCER (morphs detected)", title="ROC (test)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    nd = NormalDist()
    clip = 1e-3  # probit axes cannot show 0 or 1

    def probit(v: np.ndarray) -> np.ndarray:
        return np.array([nd.inv_cdf(float(x)) for x in np.clip(v, clip, 1 - clip)])

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, s, y in _subsets(scores, labels, methods):
        c = operating_curve(s, y)
        ax.plot(probit(c.apcer), probit(c.bpcer), label=name)
    ticks = [0.001, 0.01, 0.05, 0.2, 0.5, 0.8, 0.95, 0.99]
    ax.set_xticks(probit(np.array(ticks)), [f"{100 * t:g}" for t in ticks])
    ax.set_yticks(probit(np.array(ticks)), [f"{100 * t:g}" for t in ticks])
    ax.set(xlabel="APCER (%)", ylabel="BPCER (%)", title="DET (test, normal-deviate scale)")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    lo, hi = float(scores.min()), float(scores.max())
    bins = np.linspace(lo, hi, 26) if hi > lo else np.linspace(lo - 0.01, hi + 0.01, 3)  # zoom on the scores
    m = np.asarray(methods)
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label=f"bona fide (n={int((labels == 0).sum())})")
    for method in sorted(set(m[labels == 1].tolist())):
        sel = (labels == 1) & (m == method)
        ax.hist(scores[sel], bins=bins, alpha=0.5, label=f"morph: {method} (n={int(sel.sum())})")
    ax.axvline(threshold, color="k", ls="--", label=f"dev threshold {threshold:.3f}")
    ax.set(xlabel="score = P(morph)", ylabel="images", title="Test score distributions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=100)
    plt.close(fig)
    return paths
