"""The fine-tuning loop: class-weighted BCE, dev-based checkpoint selection, per-epoch CSV log."""

from __future__ import annotations

import csv
import io
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from .checkpoint import CheckpointError
from .config import Config, ConfigError
from .data import DataError
from .distributed import Dist, current
from .files import write_text_atomically
from .images import ImageDataset, make_loader
from .inference import predict, weighted_loss
from .metrics import MetricsError, d_eer
from .model import apply_strategy, count_trainable
from .resume import TrainState, read_state, restore_rng, write_state
from .speed import autocast, compiled, resolve_compile, resolve_precision

__all__ = ["STOP_AFTER_ENV", "TrainResult", "TrainingInterrupted", "class_weights", "train"]

# Stop (as if interrupted) once this many epochs are done and checkpointed: how the resume
# test and users rehearse an interruption without killing a process at a random moment.
STOP_AFTER_ENV = "MADLAB_STOP_AFTER_EPOCH"


class TrainingInterrupted(RuntimeError):  # noqa: N818 - it is not an error, it is a pause
    """Training stopped after a checkpointed epoch; ``train --resume`` continues it."""

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
        raise DataError(
            f"the training split needs both classes, got {int(counts[0])} bona fide and {int(counts[1])} morphs")
    return torch.tensor(len(labels) / (2.0 * counts), dtype=torch.float32)


def _write_log(path: Path, rows: list[dict]) -> None:
    """Rewrite the whole log each epoch (small), atomically, so it is never half-written."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomically(path, buffer.getvalue())


def _resume_key(config: Config, train_set: ImageDataset) -> dict:
    """What must be equal for a checkpoint to continue this run (not where outputs go)."""
    ignored = ("output_dir", "num_workers", "num_threads", "image_cache_mb")
    settings = {k: v for k, v in config.to_dict().items() if k not in ignored}
    return {"config": settings, "train_paths": [s.path for s in train_set.samples]}


def _stop_after() -> int | None:
    raw = os.environ.get(STOP_AFTER_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{STOP_AFTER_ENV}={raw!r} must be a positive number of epochs")
    return int(raw)


def train(model: nn.Module, train_set: ImageDataset, dev_set: ImageDataset, config: Config, log_path: Path,
          progress: bool = True, say=print, state_path: Path | None = None, resume: bool = False) -> TrainResult:
    """Fine-tune ``model`` in place; on return it holds the weights of the best dev epoch.

    The best epoch is chosen by ``config.selection_metric`` on the dev split (never the test
    split); its weights are deep-copied when it happens and copied back at the end, also
    after early stopping.

    With ``state_path``, everything needed to continue (trainable weights, optimiser,
    scheduler, RNG states, history, best-so-far, early-stopping counter) is written there
    atomically after every epoch; ``resume`` continues from it and ends exactly where an
    uninterrupted run with the same seed would.

    Raises:
        TrainingInterrupted: After the epoch named by ``$MADLAB_STOP_AFTER_EPOCH``.
        CheckpointError: If ``resume`` finds no checkpoint, or one from other settings or data.
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
    d = current()
    sampler: DistributedSampler | None = None
    if d.active:
        # batch_size stays the global batch: each of the world ranks takes its share of it.
        if config.batch_size % d.world:
            raise ConfigError(f"batch_size={config.batch_size} is the global batch and must divide evenly"
                              f" among the {d.world} processes")
        sampler = DistributedSampler(train_set, num_replicas=d.world, rank=d.rank, shuffle=True, seed=config.seed)
        loader = make_loader(train_set, config.batch_size // d.world, config.num_workers, sampler=sampler)
    else:
        # drop_last only when it drops a lone sample: a batch of one still works, but adds noise.
        loader = make_loader(train_set, config.batch_size, config.num_workers, shuffle=True, generator=generator,
                             drop_last=len(train_set) % config.batch_size == 1)
    weights = weights.to(d.device)
    held = {id(p) for p in params}
    history: list[dict] = []
    best: dict | None = None
    best_state: dict[str, torch.Tensor] = {}
    since_best = 0
    start = time.perf_counter()
    stopped = False
    first_epoch = 0
    run_key = _resume_key(config, train_set)
    names = [name for name, p in model.named_parameters() if id(p) in held]
    stop_after = _stop_after()
    if resume:
        assert state_path is not None
        first_epoch, history, best, best_state, since_best = _restore(
            state_path, model, names, optimiser, scheduler, generator, run_key, on_epoch)
        say(f"resuming after epoch {first_epoch} of {config.num_epochs} from {state_path}")
        if d.main:
            _write_log(log_path, history)
    epochs = range(first_epoch, config.num_epochs)
    if first_epoch and config.use_early_stopping and since_best >= config.patience:
        epochs, stopped = range(0), True  # the checkpointed run had already stopped early
    bar = tqdm(epochs, desc=f"training ({config.strategy})", disable=not (progress and d.main), leave=False)
    width = getattr(getattr(model, "spec", None), "hidden_size", None)
    precision = resolve_precision(config, d.device, width)
    compile_on = resolve_compile(config, d.device)
    say(f"precision {precision}, {'compiled' if compile_on else 'eager'}, {torch.get_num_threads()} threads,"
        f" {train_set.cached}/{len(train_set)} training images cached")
    net = compiled(_wrap(model, d), compile_on)
    scorer = compiled(model, compile_on) if d.active else net  # DDP's forward would wait for other ranks
    for epoch in bar:
        message = on_epoch(epoch)
        if message:
            say(message)
            net = compiled(_wrap(model, d), compile_on)  # DDP registers the trainable parameters when built
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        total, count = 0.0, 0
        epoch_start = time.perf_counter()
        for x, y, _ in loader:
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            with autocast(precision, d.device):
                logits = net(x)
            loss = weighted_loss(logits.float(), y, weights)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()  # under DDP: all-reduces the gradients of the trainable parameters only
            optimiser.step()
            total += loss.item() * len(y)
            count += len(y)
        if d.active:  # the logged train loss is over every rank's samples
            sums = torch.tensor([total, count], dtype=torch.float64, device=d.device)
            torch.distributed.all_reduce(sums)
            total, count = float(sums[0]), int(sums[1])
        lr = optimiser.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        dev_scores, dev_loss = predict(model, dev_set, config.batch_size, weights, progress=False,
                                       precision=precision, net=scorer, num_workers=config.num_workers)
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
        if d.main:
            _write_log(log_path, history)
        if state_path is not None and d.main:
            named = dict(model.named_parameters())
            write_state(state_path, TrainState(
                epoch=epoch + 1, history=history, best=best, since_best=since_best, run=run_key,
                params={n: named[n] for n in names}, best_state=best_state,
                optimizer=optimiser.state_dict(), scheduler=scheduler.state_dict() if scheduler else None,
            ), generator)
        bar.set_postfix(train=f"{row['train_loss']:.3f}", dev=f"{dev_loss:.3f}", eer=f"{dev_eer:.3f}")
        if not progress:  # a log file gets one line per epoch instead of carriage-return updates
            say(f"epoch {epoch + 1}/{config.num_epochs}: train loss {row['train_loss']:.4f}, dev loss {dev_loss:.4f},"
                f" dev D-EER {100 * dev_eer:.1f}%, {row['seconds']:.1f} s{' (best)' if row['best'] else ''}")
        if config.use_early_stopping and since_best >= config.patience:
            say(f"early stopping after epoch {epoch + 1}: no dev improvement for {config.patience} epochs")
            stopped = True
            break
        if stop_after is not None and epoch + 1 == stop_after and epoch + 1 < config.num_epochs:
            raise TrainingInterrupted(
                f"stopped after epoch {epoch + 1} as {STOP_AFTER_ENV} asked; the checkpoint {state_path} holds it,"
                " continue with train --resume")
    assert best is not None
    with torch.no_grad():
        named = dict(model.named_parameters())
        for name, value in best_state.items():
            named[name].copy_(value)
    for row in history:  # mark only the restored epoch
        row["best"] = int(row["epoch"] == best["epoch"])
    if d.main:
        _write_log(log_path, history)
    return TrainResult(best["epoch"], best["dev_loss"], best["dev_eer"], history,
                       time.perf_counter() - start, stopped)


def _wrap(model: nn.Module, d: Dist) -> nn.Module:
    """The module the training step calls: ``model`` itself, or a DDP wrapper of it under ``torchrun``.

    The adapters are already injected (``apply_strategy`` ran first), and DDP synchronises
    only parameters that require gradients, so a frozen backbone costs no communication.
    """
    if not d.active:
        return model
    return DistributedDataParallel(model, device_ids=[d.device] if d.device.type == "cuda" else None)


def _restore(state_path: Path, model: nn.Module, names: list[str], optimiser: torch.optim.Optimizer,
             scheduler, generator: torch.Generator, run_key: dict, on_epoch) -> tuple:
    """Load a checkpoint into the live objects; returns (epochs done, history, best, best_state, since_best)."""
    state, rng = read_state(state_path)
    if state["run"] != run_key:
        differ = sorted(k for k in run_key["config"] if state["run"]["config"].get(k) != run_key["config"][k])
        what = f"settings {differ}" if differ else "training images"
        raise CheckpointError(f"the checkpoint {state_path} belongs to a run with other {what}; it cannot be resumed"
                              " with these (use --overwrite to start afresh)")
    if sorted(state["params"]) != sorted(names):
        raise CheckpointError(f"the checkpoint {state_path} holds other parameters than this model trains")
    for epoch in range(state["epoch"]):
        on_epoch(epoch)  # replay gradual unfreezing so the same parameters train
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            named[name].copy_(state["params"][name])
    optimiser.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    restore_rng(rng, state["numpy_rng"], generator)
    best_state = {k: v.clone() for k, v in state["best_state"].items()}
    if state["best"] is not None:
        state["best"]["key"] = tuple(state["best"]["key"])
    return state["epoch"], state["history"], state["best"], best_state, state["since_best"]


def _describe_training(model: nn.Module, config: Config) -> str:
    from .model import describe

    return describe(model, config)
