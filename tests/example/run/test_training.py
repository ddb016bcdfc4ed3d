"""madlab.run.training's steps: the best-epoch tracker (NaN never best), the split-out train loop,
CUDA RNG on resume."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from madlab.data.images import ImageDataset
from madlab.io.config import Config, apply_overrides
from madlab.model.network import MorphDetector
from madlab.run import training
from madlab.run.resume import TrainState, read_state, restore_rng, write_state
from madlab.run.training import BestEpoch, TrainingError, train
from madlab.sources.lfw import embedded_samples

losses = st.lists(st.one_of(st.floats(0, 10, allow_nan=False), st.just(math.nan)), min_size=1, max_size=12)


@given(losses)
def test_best_epoch_is_the_first_minimum_of_the_finite_dev_losses(values: list[float]) -> None:
    tracker = BestEpoch("dev_loss", min_delta=0.0)
    weight = torch.nn.Parameter(torch.zeros(()))
    for epoch, loss in enumerate(values, start=1):
        weight.data.fill_(epoch)
        tracker.update(epoch, loss, 0.5, {"w": weight})
    finite = [(v, k) for k, v in enumerate(values, start=1) if not math.isnan(v)]
    if not finite:
        with pytest.raises(TrainingError, match="no epoch had a finite dev loss"):
            tracker.restore(torch.nn.Module())
        return
    best_value, best_epoch = min(finite)  # brute force: smallest value, earliest epoch among equals
    assert tracker.best["epoch"] == best_epoch and tracker.best["dev_loss"] == best_value
    assert float(tracker.state["w"]) == best_epoch, "a copy taken at that epoch, not a reference"
    assert tracker.since == len(values) - best_epoch


def test_nan_first_epoch_is_not_restored() -> None:
    tracker = BestEpoch("dev_loss", min_delta=0.001)
    w = torch.nn.Parameter(torch.zeros(()))
    assert not tracker.update(1, math.nan, math.nan, {"w": w})
    assert tracker.update(2, 0.7, 0.4, {"w": w})
    assert tracker.best["epoch"] == 2 and tracker.since == 0


def test_dev_eer_selection_breaks_ties_by_dev_loss_and_skips_nan_eer() -> None:
    tracker = BestEpoch("dev_eer", min_delta=0.0)
    w = torch.nn.Parameter(torch.zeros(()))
    tracker.update(1, 0.5, math.nan, {"w": w})
    tracker.update(2, 0.6, 0.2, {"w": w})
    tracker.update(3, 0.4, 0.2, {"w": w})
    tracker.update(4, 0.3, 0.25, {"w": w})
    assert tracker.best["epoch"] == 3


def _tiny(tmp_path: Path) -> tuple[MorphDetector, ImageDataset, ImageDataset]:
    from madlab.model.families import load_backbone
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64), add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    model = MorphDetector(*load_backbone(tmp_path / "vit"))
    samples = embedded_samples(0, ["blend"], 1, (0.6, 0.2))
    return (model, ImageDataset([s for s in samples if s.split == "train"][::4], 16),
            ImageDataset([s for s in samples if s.split == "dev"], 16))


def test_train_never_restores_a_diverged_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, train_set, dev_set = _tiny(tmp_path)
    real = training.evaluate_dev
    calls = []

    def nan_first(*args, **kwargs):
        calls.append(1)
        loss, eer = real(*args, **kwargs)
        return (math.nan, math.nan) if len(calls) == 1 else (loss, eer)

    monkeypatch.setattr(training, "evaluate_dev", nan_first)
    config = apply_overrides(Config(), ["num_epochs=3", "use_early_stopping=false", "batch_size=16",
                                        "num_workers=0"])
    result = train(model, train_set, dev_set, config, tmp_path / "log.csv", progress=False, say=lambda _: None)
    assert result.best_epoch in (2, 3) and math.isfinite(result.best_dev_loss)
    assert math.isnan(result.history[0]["dev_loss"]) and result.history[0]["best"] == 0


def test_optimiser_step_holds_weight_decay_and_schedule() -> None:
    params = [torch.nn.Parameter(torch.ones(2))]
    config = apply_overrides(Config(), ["weight_decay=0.2", "learning_rate=0.1", "num_epochs=4", "eta_min=0.01"])
    optimiser, scheduler = training.make_optimiser(params, config)
    assert optimiser.param_groups[0]["weight_decay"] == 0.2
    lrs = []
    for _ in range(4):
        lrs.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        scheduler.step()
    expected = [0.01 + (0.1 - 0.01) * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(4)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)


def test_the_optimiser_takes_the_attack_modes_schedule_when_left_at_none() -> None:
    params = [torch.nn.Parameter(torch.ones(2))]
    for mode in ("given", "synthetic"):
        config = apply_overrides(Config(), [f"attacks={mode}"])
        optimiser, scheduler = training.make_optimiser(params, config)
        assert (scheduler.T_max, optimiser.param_groups[0]["lr"]) == (config.epochs, config.lr)
    assert apply_overrides(Config(), ["attacks=synthetic"]).epochs != Config().epochs


def test_a_checkpoint_keys_on_the_schedule_followed_not_on_how_it_was_asked_for() -> None:
    train_set = ImageDataset(embedded_samples(0, ["blend"], 1, (0.6, 0.2))[:4], 32)
    by_mode = training._resume_key(apply_overrides(Config(), ["attacks=synthetic"]), train_set)
    spelled = apply_overrides(Config(), ["attacks=synthetic", "num_epochs=20", "learning_rate=5e-4"])
    assert training._resume_key(spelled, train_set) == by_mode
    for other in ("num_epochs=19", "learning_rate=1e-3"):
        assert training._resume_key(apply_overrides(spelled, [other]), train_set) != by_mode


def _state(tmp_path: Path, generator: torch.Generator) -> Path:
    w = torch.zeros(2)
    path = tmp_path / "state.safetensors"
    write_state(path, TrainState(epoch=1, history=[], best=None, since_best=0, run={}, params={"w": w},
                                 best_state={}, optimizer={"state": {}, "param_groups": []}, scheduler=None),
                generator)
    return path


def test_resume_saves_and_restores_the_cuda_rng(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plumbing, on any machine: a CUDA generator state is written and set back on resume."""
    saved = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: saved.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: restored.append(state.clone()))
    generator = torch.Generator().manual_seed(0)
    _, rng = read_state(_state(tmp_path, generator))
    assert torch.equal(rng["rng.cuda"], saved)
    state, rng = read_state(tmp_path / "state.safetensors")
    restore_rng(rng, state["numpy_rng"], generator)
    assert len(restored) == 1 and torch.equal(restored[0], saved)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resume_restores_real_cuda_dropout_masks(tmp_path: Path) -> None:
    torch.cuda.manual_seed(3)
    torch.rand(1, device="cuda")
    generator = torch.Generator().manual_seed(0)
    path = _state(tmp_path, generator)
    expected = torch.nn.functional.dropout(torch.ones(1000, device="cuda"), 0.5)
    torch.cuda.manual_seed(99)  # another run's generator
    state, rng = read_state(path)
    restore_rng(rng, state["numpy_rng"], generator)
    assert torch.equal(torch.nn.functional.dropout(torch.ones(1000, device="cuda"), 0.5), expected)
