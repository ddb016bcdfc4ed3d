"""Scoring a dataset with a trained detector: the scores every evaluation and threshold is computed from.

A score is the detector's **logit** (log-odds of "morph"), kept in float64. Thresholds,
metrics and plots only need an order-preserving score, and the logit keeps that order where
a probability cannot: ``sigmoid`` in float32 returns exactly 1.0 from a logit of about 16.6
on (float64: about 36.7), so a confident model would turn distinct scores into ties.
``evaluation.report.p_morph`` converts for display.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from ..data.images import ImageDataset, make_loader
from .distributed import Dist, current, gather_by_index
from .speed import autocast

__all__ = ["predict", "weighted_loss"]


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                  reduction: str = "mean") -> torch.Tensor:
    """Class-weighted binary cross-entropy on logits; ``weights`` is ``[w_bona_fide, w_morph]``."""
    per_sample = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    per_sample = per_sample * weights[labels.long()]
    return per_sample.mean() if reduction == "mean" else per_sample


@torch.no_grad()
def predict(model: nn.Module, dataset: ImageDataset, batch_size: int, weights: torch.Tensor | None = None,
            desc: str = "scoring", progress: bool = True, *, precision: str = "fp32", net: nn.Module | None = None,
            num_workers: int = 0) -> tuple[np.ndarray, float]:
    """Scores (float64 logits) for every sample in ``dataset`` order, and the mean weighted loss.

    Under ``torchrun`` each rank scores its shard and every rank gets all the scores, in
    dataset order, so metrics and decisions computed from them are the same everywhere.

    Args:
        precision: ``"fp32"`` or ``"bf16"`` (autocast; logits and loss are taken in fp32).
        net: What to call instead of ``model`` (its compiled form); ``model`` is still the
            module switched to eval mode.
        num_workers: Decoding workers for images the dataset does not cache.

    Returns:
        ``(scores, loss)``: scores of shape ``(len(dataset),)``; ``loss`` is 0.0 without ``weights``.
    """
    d = current()
    if d.active:
        return _predict_sharded(model, dataset, batch_size, weights, desc, progress, d, precision)
    model.eval()
    net = model if net is None else net
    scores, total = [], 0.0
    loader = make_loader(dataset, batch_size, num_workers)
    for x, y, _ in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x, y = x.to(d.device), y.to(d.device)
        with autocast(precision, d.device):
            logits = net(x).float()
        scores.append(logits.detach().double().cpu().numpy())
        if weights is not None:
            total += weighted_loss(logits, y, weights).item() * len(y)
    return np.concatenate(scores), total / len(dataset)


def _predict_sharded(model: nn.Module, dataset: ImageDataset, batch_size: int, weights: torch.Tensor | None,
                     desc: str, progress: bool, d: Dist, precision: str = "fp32") -> tuple[np.ndarray, float]:
    model.eval()
    sampler: DistributedSampler = DistributedSampler(dataset, num_replicas=d.world, rank=d.rank, shuffle=False)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    indices, rows = [], []
    for x, y, index in tqdm(loader, desc=desc, disable=not (progress and d.main), leave=False):
        x, y = x.to(d.device), y.to(d.device)
        with autocast(precision, d.device):
            logits = model(x).float()
        per_sample = torch.zeros_like(logits) if weights is None else weighted_loss(
            logits, y, weights.to(d.device), reduction="none")
        rows.append(torch.stack([logits.double(), per_sample.double()], dim=1).cpu().numpy())
        indices.append(index.numpy())
    local = np.concatenate(rows) if rows else np.zeros((0, 2))
    both = gather_by_index(np.concatenate(indices) if indices else np.zeros(0, np.int64), local, len(dataset))
    return both[:, 0], float(both[:, 1].sum() / len(dataset))
