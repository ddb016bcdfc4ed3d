"""The fine-tuning loop: class-weighted BCE, dev-based checkpoint selection, per-epoch CSV log."""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import Config
from .data import ImageDataset
from .metrics import MetricsError, d_eer
from .model import apply_strategy, count_trainable

__all__ = ["TrainResult", "class_weights", "predict", "train"]

LOG_COLUMNS = ["epoch", "train_loss", "dev_loss", "dev_eer", "learning_rate", "trainable_params", "seconds", "best"]


@dataclass
class TrainResult:
    """What training produced: the best epoch (1-based), its dev figures and the log."""

    best_epoch: int
    best_dev_loss: float
    best_dev_eer: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False


def class_weights(labels: np.ndarray, given: list[float] | None) -> torch.Tensor:
    """``[w_bona_fide, w_morph]``: ``given``, or ``N / (2 N_c)`` so both classes weigh the same in total."""
    if given is not None:
        return torch.tensor(given, dtype=torch.float32)
    counts = np.bincount(labels.astype(np.int64), minlength=2).astype(np.float64)
    if counts.min() == 0:
        raise ValueError(
            f"the training split needs both classes, got {int(counts[0])} bona fide and {int(counts[1])} morphs")
    return torch.tensor(len(labels) / (2.0 * counts), dtype=torch.float32)


def _loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    per_sample = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (per_sample * weights[labels.long()]).mean()


@torch.no_grad()
def predict(model: nn.Module, dataset: ImageDataset, batch_size: int, weights: torch.Tensor | None = None,
            desc: str = "scoring", progress: bool = True) -> tuple[np.ndarray, float]:
    """P(morph) for every sample in ``dataset`` order, and the mean weighted loss if ``weights`` given."""
    model.eval()
    scores, total = [], 0.0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for x, y, _ in tqdm(loader, desc=desc, disable=not progress, leave=False):
        logits = model(x)
        scores.append(torch.sigmoid(logits).double().numpy())
        if weights is not None:
            total += _loss(logits, y, weights).item() * len(y)
    return np.concatenate(scores), total / len(dataset)


def _write_log(path: Path, rows: list[dict]) -> None:
    """Rewrite the whole log each epoch (small), via a temporary file, so it is never half-written."""
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def train(model: nn.Module, train_set: ImageDataset, dev_set: ImageDataset, config: Config, log_path: Path,
          progress: bool = True, say=print) -> TrainResult:
    """Fine-tune ``model`` in place; on return it holds the weights of the best dev epoch.

    The best epoch is chosen by ``config.selection_metric`` on the dev split (never the test
    split); its weights are deep-copied when it happens and copied back at the end, also
    after early stopping.
    """
    params, on_epoch = apply_strategy(model, config)
    say(_describe_training(model, config))
    optimiser = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    # T_max follows num_epochs (the seed fixed it when the config was built).
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.num_epochs, eta_min=config.eta_min)
                 if config.lr_scheduler == "cosine" else None)
    train_labels = np.array([s.label for s in train_set.samples])
    dev_labels = np.array([s.label for s in dev_set.samples])
    weights = class_weights(train_labels, config.class_weights)
    generator = torch.Generator().manual_seed(config.seed)
    # drop_last only when it drops a lone sample: a batch of one still works, but adds noise.
    loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, generator=generator,
                        drop_last=len(train_set) % config.batch_size == 1, num_workers=config.num_workers)
    held = {id(p) for p in params}
    history: list[dict] = []
    best: dict | None = None
    best_state: dict[str, torch.Tensor] = {}
    since_best = 0
    start = time.perf_counter()
    stopped = False
    bar = tqdm(range(config.num_epochs), desc=f"training ({config.strategy})", disable=not progress, leave=False)
    for epoch in bar:
        message = on_epoch(epoch)
        if message:
            say(message)
        model.train()
        total, count = 0.0, 0
        epoch_start = time.perf_counter()
        for x, y, _ in loader:
            loss = _loss(model(x), y, weights)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += loss.item() * len(y)
            count += len(y)
        lr = optimiser.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        dev_scores, dev_loss = predict(model, dev_set, config.batch_size, weights, progress=False)
        try:
            dev_eer = d_eer(dev_scores, dev_labels)["eer"]
        except MetricsError:
            dev_eer = math.nan
        row = {"epoch": epoch + 1, "train_loss": total / max(count, 1), "dev_loss": dev_loss, "dev_eer": dev_eer,
               "learning_rate": lr, "trainable_params": count_trainable(model),
               "seconds": time.perf_counter() - epoch_start, "best": 0}
        key = (dev_loss,) if config.selection_metric == "dev_loss" else (dev_eer, dev_loss)
        improved = best is None or key[0] < best["key"][0] - config.min_delta or (
            len(key) > 1 and key[0] == best["key"][0] and key[1] < best["key"][1])
        if improved:
            best = {"key": key, "epoch": epoch + 1, "dev_loss": dev_loss, "dev_eer": dev_eer}
            # A real copy of every parameter the optimiser may have changed (the seed's
            # shallow state_dict().copy() kept references, so "restore" restored nothing).
            best_state = {name: p.detach().clone() for name, p in model.named_parameters() if id(p) in held}
            since_best = 0
            row["best"] = 1
        else:
            since_best += 1
        history.append(row)
        _write_log(log_path, history)
        bar.set_postfix(train=f"{row['train_loss']:.3f}", dev=f"{dev_loss:.3f}", eer=f"{dev_eer:.3f}")
        if config.use_early_stopping and since_best >= config.patience:
            say(f"early stopping after epoch {epoch + 1}: no dev improvement for {config.patience} epochs")
            stopped = True
            break
    assert best is not None
    with torch.no_grad():
        named = dict(model.named_parameters())
        for name, value in best_state.items():
            named[name].copy_(value)
    for row in history:  # mark only the restored epoch
        row["best"] = int(row["epoch"] == best["epoch"])
    _write_log(log_path, history)
    return TrainResult(best["epoch"], best["dev_loss"], best["dev_eer"], history,
                       time.perf_counter() - start, stopped)


def _describe_training(model: nn.Module, config: Config) -> str:
    from .model import describe

    return describe(model, config)
