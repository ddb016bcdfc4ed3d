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
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler
from tqdm.auto import tqdm

from ..attacks.sets import EpochSeeds, SyntheticTrainSet
from ..data.images import ImageDataset, make_loader
from ..data.samples import DataError
from ..evaluation.metrics import MetricsError, d_eer
from ..io.config import Config, ConfigError
from ..io.errors import MadlabError
from ..io.files import write_text_atomically
from ..model.checkpoint import CheckpointError
from ..model.network import apply_strategy, count_trainable, describe
from .distributed import Dist, current
from .inference import predict, weighted_loss
from .resume import TrainState, read_state, restore_rng, write_state
from .speed import autocast, compiled, resolve_compile, resolve_precision

__all__ = [
    "STOP_AFTER_ENV",
    "BestEpoch",
    "TrainResult",
    "TrainingError",
    "TrainingInterrupted",
    "class_weights",
    "evaluate_dev",
    "make_optimiser",
    "make_train_loader",
    "run_epoch",
    "train",
]

# Stop (as if interrupted) once this many epochs are done and checkpointed: how the resume
# test and users rehearse an interruption without killing a process at a random moment.
STOP_AFTER_ENV = "MADLAB_STOP_AFTER_EPOCH"


class TrainingInterrupted(RuntimeError):  # noqa: N818 - it is not an error, it is a pause
    """Training stopped after a checkpointed epoch; ``train --resume`` continues it."""


class TrainingError(MadlabError):
    """Training that produced nothing usable (every epoch diverged)."""

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
    """What must be equal for a checkpoint to continue this run (not where outputs go), and how
    the training items drew their augmentation (:func:`_augmenting_workers`)."""
    ignored = ("output_dir", "num_workers", "num_threads", "image_cache_mb")
    settings = {k: v for k, v in config.to_dict().items() if k not in ignored}
    # The schedule the run follows, not how it was asked for: None and the mode's value are one run.
    settings.update(num_epochs=config.epochs, learning_rate=config.lr)
    decoding = {"augmenting_workers": _augmenting_workers(train_set, config.num_workers),
                "num_workers": config.num_workers, "image_cache_mb": config.image_cache_mb}
    return {"config": settings, "train_paths": [s.path for s in train_set.samples], "decoding": decoding}


def _augmenting_workers(train_set: ImageDataset, num_workers: int) -> int:
    """How many worker processes' random streams the training items' augmentation draws from.

    0 when the main process draws it (a fully cached set is served there, see
    :func:`~..data.images.make_loader`) or the items draw nothing from a worker's stream
    (synthetic attacks are seeded per item, see :class:`~..attacks.sets.EpochSeeds`; no
    augmentation). Otherwise batch ``b`` draws from worker ``b % n``'s stream, so ``n`` decides
    what a run draws, and a run resumed with another ``n`` would not continue as it began.
    """
    if isinstance(train_set, SyntheticTrainSet) or not train_set.augment or train_set.fully_cached:
        return 0
    return num_workers


def _drawn_in(workers: int) -> str:
    return "the main process" if workers == 0 else f"{workers} worker processes"


def _stop_after() -> int | None:
    raw = os.environ.get(STOP_AFTER_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{STOP_AFTER_ENV}={raw!r} must be a positive number of epochs")
    return int(raw)


class BestEpoch:
    """The best dev epoch so far and a deep copy of its trainable weights; NaN epochs never count.

    An epoch improves on the best when its selection key (``(dev_loss,)``, or ``(dev_eer,
    dev_loss)`` for ``selection_metric=dev_eer``) is finite and lower by more than
    ``min_delta`` (ties on D-EER are broken by the dev loss). A NaN dev loss or D-EER (a
    diverged epoch) is never the best, not even as the first epoch, and counts towards early
    stopping like any epoch without improvement.
    """

    def __init__(self, selection_metric: str, min_delta: float) -> None:
        self.by_eer, self.min_delta = selection_metric == "dev_eer", min_delta
        self.best: dict | None = None
        self.state: dict[str, torch.Tensor] = {}
        self.since = 0

    def key(self, dev_loss: float, dev_eer: float) -> tuple[float, ...]:
        return (dev_eer, dev_loss) if self.by_eer else (dev_loss,)

    def update(self, epoch: int, dev_loss: float, dev_eer: float, named: dict[str, nn.Parameter]) -> bool:
        """Record epoch ``epoch`` (1-based); copy ``named`` if it is the new best. Returns whether it is."""
        key = self.key(dev_loss, dev_eer)
        if not all(math.isfinite(k) for k in key):
            self.since += 1
            return False
        old = self.best["key"] if self.best else None
        if old is not None and not (key[0] < old[0] - self.min_delta or (
                len(key) > 1 and key[0] == old[0] and key[1] < old[1])):
            self.since += 1
            return False
        self.best = {"key": key, "epoch": epoch, "dev_loss": dev_loss, "dev_eer": dev_eer}
        # A real copy of every parameter the optimiser may have changed (the seed's
        # shallow state_dict().copy() kept references, so "restore" restored nothing).
        self.state = {name: p.detach().clone() for name, p in named.items()}
        self.since = 0
        return True

    def restore(self, model: nn.Module) -> dict:
        """Copy the best epoch's weights back into ``model``; returns its record.

        Raises:
            TrainingError: If no epoch had a finite dev loss (training diverged from the start).
        """
        if self.best is None:
            raise TrainingError("no epoch had a finite dev loss and D-EER (training diverged: NaN);"
                                " lower learning_rate or check the data")
        with torch.no_grad():
            named = dict(model.named_parameters())
            for name, value in self.state.items():
                named[name].copy_(value)
        return self.best


def make_optimiser(params: list[nn.Parameter], config: Config) -> tuple[torch.optim.Optimizer, object | None]:
    """AdamW over ``params`` and the cosine schedule (``T_max`` = the run's epochs), or no schedule."""
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.epochs, eta_min=config.eta_min)
                 if config.lr_scheduler == "cosine" else None)
    return optimiser, scheduler


def make_train_loader(train_set: ImageDataset, config: Config, generator: torch.Generator,
                      d: Dist) -> tuple[DataLoader, DistributedSampler | None]:
    """The shuffled training loader; under ``torchrun`` a seeded sampler gives each rank its share
    of the global ``batch_size``."""
    if d.active:
        if config.batch_size % d.world:
            raise ConfigError(f"batch_size={config.batch_size} is the global batch and must divide evenly"
                              f" among the {d.world} processes")
        sampler = DistributedSampler(train_set, num_replicas=d.world, rank=d.rank, shuffle=True, seed=config.seed)
        if isinstance(train_set, SyntheticTrainSet):
            return _seeded_loader(train_set, sampler, config.batch_size // d.world, config, generator), sampler
        return make_loader(train_set, config.batch_size // d.world, config.num_workers, sampler=sampler), sampler
    # drop_last only when it drops a lone sample: a batch of one still works, but adds noise.
    drop_last = len(train_set) % config.batch_size == 1
    if isinstance(train_set, SyntheticTrainSet):
        shuffled = RandomSampler(train_set, generator=generator)
        return _seeded_loader(train_set, shuffled, config.batch_size, config, generator, drop_last), None
    return make_loader(train_set, config.batch_size, config.num_workers, shuffle=True, generator=generator,
                       drop_last=drop_last), None


def _seeded_loader(train_set: SyntheticTrainSet, sampler: Sampler, batch_size: int, config: Config,
                   generator: torch.Generator, drop_last: bool = False) -> DataLoader:
    """A loader whose items are seeded from ``generator`` (:class:`~.attacks.EpochSeeds`), whatever
    ``num_workers`` is. The DataLoader's own generator only seeds its worker processes, which
    draw nothing: a private one, so that starting workers takes no number from ``generator``
    or torch's global generator."""
    return make_loader(train_set, batch_size, config.num_workers, sampler=EpochSeeds(sampler, generator),
                       generator=torch.Generator().manual_seed(config.seed), drop_last=drop_last)


def run_epoch(model: nn.Module, net: nn.Module, loader: DataLoader, optimiser: torch.optim.Optimizer,
              weights: torch.Tensor, precision: str, d: Dist) -> float:
    """One pass over ``loader``; returns the mean class-weighted training loss (over every rank)."""
    model.train()
    total, count = 0.0, 0
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
    return total / max(count, 1)


def evaluate_dev(model: nn.Module, scorer: nn.Module, dev_set: ImageDataset, dev_labels: np.ndarray,
                 weights: torch.Tensor, config: Config, precision: str) -> tuple[float, float]:
    """``(dev_loss, dev_eer)``; the D-EER is NaN when no EER can be computed (e.g. NaN scores)."""
    dev_scores, dev_loss = predict(model, dev_set, config.batch_size, weights, progress=False,
                                   precision=precision, net=scorer, num_workers=config.num_workers)
    try:
        return dev_loss, d_eer(dev_scores, dev_labels)["eer"]
    except MetricsError:
        return dev_loss, math.nan


def train(model: nn.Module, train_set: ImageDataset, dev_set: ImageDataset, config: Config, log_path: Path,
          progress: bool = True, say=print, state_path: Path | None = None, resume: bool = False) -> TrainResult:
    """Fine-tune ``model`` in place; on return it holds the weights of the best dev epoch.

    The steps: :func:`make_optimiser`, then per epoch :func:`run_epoch`, :func:`evaluate_dev`,
    :class:`BestEpoch` (chosen by ``config.selection_metric`` on the dev split, never the test
    split; NaN epochs never chosen), the checkpoint (:func:`_checkpoint`) and early stopping;
    finally the best epoch's weights are copied back.

    With ``state_path``, everything needed to continue (trainable weights, optimiser,
    scheduler, RNG states, history, best-so-far, early-stopping counter) is written there
    atomically after every epoch; ``resume`` continues from it and ends exactly where an
    uninterrupted run with the same seed would.

    Raises:
        TrainingInterrupted: After the epoch named by ``$MADLAB_STOP_AFTER_EPOCH``.
        TrainingError: If every epoch's dev loss was NaN.
        CheckpointError: If ``resume`` finds no checkpoint, or one from other settings or data.
    """
    params, on_epoch = apply_strategy(model, config)
    say(describe(model, config))
    optimiser, scheduler = make_optimiser(params, config)
    dev_labels = np.array([s.label for s in dev_set.samples])
    d = current()
    weights = class_weights(np.array([s.label for s in train_set.samples]), config.class_weights).to(d.device)
    generator = torch.Generator().manual_seed(config.seed)
    loader, sampler = make_train_loader(train_set, config, generator, d)
    held = {id(p) for p in params}
    names = [name for name, p in model.named_parameters() if id(p) in held]
    tracker = BestEpoch(config.selection_metric, config.min_delta)
    history: list[dict] = []
    start = time.perf_counter()
    stopped = False
    first_epoch = 0
    run_key = _resume_key(config, train_set)
    stop_after = _stop_after()
    if resume:
        assert state_path is not None
        first_epoch, history = _restore(state_path, model, names, optimiser, scheduler, generator, run_key,
                                        on_epoch, tracker)
        say(f"resuming after epoch {first_epoch} of {config.epochs} from {state_path}")
        if d.main:
            _write_log(log_path, history)
    epochs = range(first_epoch, config.epochs)
    if first_epoch and config.use_early_stopping and tracker.since >= config.patience:
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
        epoch_start = time.perf_counter()
        train_loss = run_epoch(model, net, loader, optimiser, weights, precision, d)
        lr = optimiser.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        dev_loss, dev_eer = evaluate_dev(model, scorer, dev_set, dev_labels, weights, config, precision)
        named = dict(model.named_parameters())
        improved = tracker.update(epoch + 1, dev_loss, dev_eer, {n: named[n] for n in names})
        row = {"epoch": epoch + 1, "train_loss": train_loss, "dev_loss": dev_loss, "dev_eer": dev_eer,
               "learning_rate": lr, "trainable_params": count_trainable(model),
               "seconds": time.perf_counter() - epoch_start, "best": int(improved)}
        history.append(row)
        if d.main:
            _write_log(log_path, history)
            if state_path is not None:
                _checkpoint(state_path, model, names, tracker, history, run_key, optimiser, scheduler, generator)
        bar.set_postfix(train=f"{train_loss:.3f}", dev=f"{dev_loss:.3f}", eer=f"{dev_eer:.3f}")
        if not progress:  # a log file gets one line per epoch instead of carriage-return updates
            say(f"epoch {epoch + 1}/{config.epochs}: train loss {train_loss:.4f}, dev loss {dev_loss:.4f},"
                f" dev D-EER {100 * dev_eer:.1f}%, {row['seconds']:.1f} s{' (best)' if improved else ''}")
        if config.use_early_stopping and tracker.since >= config.patience:
            say(f"early stopping after epoch {epoch + 1}: no dev improvement for {config.patience} epochs")
            stopped = True
            break
        if stop_after is not None and epoch + 1 == stop_after and epoch + 1 < config.epochs:
            raise TrainingInterrupted(
                f"stopped after epoch {epoch + 1} as {STOP_AFTER_ENV} asked; the checkpoint {state_path} holds it,"
                " continue with train --resume")
    best = tracker.restore(model)
    for row in history:  # mark only the restored epoch
        row["best"] = int(row["epoch"] == best["epoch"])
    if d.main:
        _write_log(log_path, history)
    return TrainResult(best["epoch"], best["dev_loss"], best["dev_eer"], history,
                       time.perf_counter() - start, stopped)


def _checkpoint(state_path: Path, model: nn.Module, names: list[str], tracker: BestEpoch, history: list[dict],
                run_key: dict, optimiser: torch.optim.Optimizer, scheduler, generator: torch.Generator) -> None:
    """Everything :func:`_restore` needs to continue after this epoch, written atomically."""
    named = dict(model.named_parameters())
    write_state(state_path, TrainState(
        epoch=history[-1]["epoch"], history=history, best=tracker.best, since_best=tracker.since, run=run_key,
        params={n: named[n] for n in names}, best_state=tracker.state,
        optimizer=optimiser.state_dict(), scheduler=scheduler.state_dict() if scheduler else None,
    ), generator)


def _wrap(model: nn.Module, d: Dist) -> nn.Module:
    """The module the training step calls: ``model`` itself, or a DDP wrapper of it under ``torchrun``.

    The adapters are already injected (``apply_strategy`` ran first), and DDP synchronises
    only parameters that require gradients, so a frozen backbone costs no communication.
    """
    if not d.active:
        return model
    return DistributedDataParallel(model, device_ids=[d.device] if d.device.type == "cuda" else None)


# Config keys added since checkpoints were first written, and the value every run had before:
# a checkpoint from then continues when the key is set back to it.
_BEFORE_KEYS = {"synthetic_match": "face"}


def _check_run(state_path: Path, stored: dict, run_key: dict) -> None:
    """Refuse a checkpoint that this run cannot continue as the checkpointed run would have.

    Raises:
        CheckpointError: Naming the settings that differ (and, for a key the checkpoint predates,
            the override that resumes it), or where the augmentation was drawn.
    """
    # A checkpoint from before the decoding was recorded drew the augmentation where it is drawn now.
    before, now = stored.get("decoding", run_key["decoding"]), run_key["decoding"]
    if before["augmenting_workers"] != now["augmenting_workers"]:
        raise CheckpointError(
            f"the checkpoint {state_path} was written by a run whose training augmentation"
            f" {_drawn_in(before['augmenting_workers'])} drew (num_workers={before['num_workers']},"
            f" image_cache_mb={before['image_cache_mb']}); with these settings {_drawn_in(now['augmenting_workers'])}"
            " would draw it, so the resumed run would not continue as it began. Resume with the run's num_workers"
            " and image_cache_mb (or --overwrite to start afresh)")
    predates = {k: v for k, v in _BEFORE_KEYS.items() if k not in stored["config"]}
    stored = {k: v for k, v in stored.items() if k != "decoding"} | {"config": predates | stored["config"]}
    run_key = {k: v for k, v in run_key.items() if k != "decoding"}
    if stored != run_key:
        differ = sorted(k for k in run_key["config"] if stored["config"].get(k) != run_key["config"][k])
        what = f"settings {differ}" if differ else "training images"
        older = [k for k in differ if k in predates]
        hint = (f"; it was written before {', '.join(older)} existed, so resume it with "
                + " ".join(f"--override {k}={predates[k]}" for k in older)) if older else ""
        raise CheckpointError(f"the checkpoint {state_path} belongs to a run with other {what}; it cannot be resumed"
                              f" with these (use --overwrite to start afresh{hint})")


def _restore(state_path: Path, model: nn.Module, names: list[str], optimiser: torch.optim.Optimizer,
             scheduler, generator: torch.Generator, run_key: dict, on_epoch, tracker: BestEpoch) -> tuple:
    """Load a checkpoint into the live objects and ``tracker``; returns (epochs done, history)."""
    state, rng = read_state(state_path)
    _check_run(state_path, state["run"], run_key)
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
    tracker.state = {k: v.clone() for k, v in state["best_state"].items()}
    tracker.best = state["best"]
    if tracker.best is not None:
        tracker.best["key"] = tuple(tracker.best["key"])
    tracker.since = state["since_best"]
    return state["epoch"], state["history"]
