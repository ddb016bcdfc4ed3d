"""The example's training checkpoint: an interrupted run resumed ends exactly as an uninterrupted one."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import morph_detection
import pytest
from madlab.run.resume import STATE_FILE
from madlab.run.training import STOP_AFTER_ENV
from safetensors.torch import load_file

TINY = ["backbone=mae-vit-tiny",
        "pretrain_epochs=2", "num_epochs=4", "morphs_per_face=1", "batch_size=32", "learning_rate=3e-3",
        "use_early_stopping=false", "min_delta=0", "embedded_data=lfw_subset", "face_crop=none"]


def train(out: Path, cache: Path, *extra: str, overrides: list[str] = TINY) -> int:
    args = ["train", "--output_dir", str(out), "--cache_dir", str(cache), "--no_progress", *extra]
    for item in overrides:
        args += ["--override", item]
    return morph_detection.main(args)


def log_rows(out: Path) -> list[dict[str, str]]:
    with (out / "train_log.csv").open() as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(uninterrupted run, interrupted-then-resumed run, backbone cache)."""
    cache = tmp_path_factory.mktemp("cache")
    whole, resumed = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("resumed")
    assert train(whole, cache) == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(STOP_AFTER_ENV, "2")
        assert train(resumed, cache) == 3  # interrupted after epoch 2
    assert not (resumed / "morph_detector.safetensors").exists()
    assert len(log_rows(resumed)) == 2
    assert train(resumed, cache, "--resume") == 0
    return whole, resumed, cache


def test_resumed_run_ends_bit_identical_to_the_uninterrupted_one(runs) -> None:
    whole, resumed, _ = runs
    a = load_file(str(whole / "morph_detector.safetensors"))
    b = load_file(str(resumed / "morph_detector.safetensors"))
    assert sorted(a) == sorted(b)
    assert all((a[k] == b[k]).all() for k in a), [k for k in a if not (a[k] == b[k]).all()]
    assert log_rows(whole) == log_rows(resumed)
    assert len(log_rows(whole)) == 4
    summary = [json.loads((out / "train_summary.json").read_text()) for out in (whole, resumed)]
    for key in ("best_epoch", "best_dev_loss", "best_dev_eer", "threshold"):
        assert summary[0][key] == summary[1][key], key


def test_checkpoint_is_safetensors_with_json_metadata_only(runs) -> None:
    from safetensors import safe_open

    _, resumed, _ = runs
    with safe_open(str(resumed / STATE_FILE), "pt") as handle:
        meta = json.loads(handle.metadata()["madlab_train_state"])
        keys = list(handle.keys())
    assert meta["epoch"] == 4 and len(meta["history"]) == 4
    assert {"rng.torch", "rng.loader", "rng.numpy_keys"} <= set(keys)
    assert any(k.startswith("optim.") and k.endswith(".exp_avg") for k in keys)
    assert any(k.startswith("param.") and "lora_A" in k for k in keys)


def test_an_existing_run_is_never_overwritten_silently(runs, capsys) -> None:
    whole, _, cache = runs
    before = (whole / "morph_detector.safetensors").read_bytes()
    assert train(whole, cache) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and "--resume" in err
    assert (whole / "morph_detector.safetensors").read_bytes() == before


def test_resume_without_a_checkpoint_or_with_other_settings_is_refused(runs, tmp_path: Path, capsys) -> None:
    _, resumed, cache = runs
    assert train(tmp_path / "empty", cache, "--resume") == 2
    assert f"no training checkpoint {tmp_path / 'empty' / STATE_FILE}" in capsys.readouterr().err
    assert train(resumed, cache, "--resume", overrides=[*TINY, "learning_rate=1e-3"]) == 2
    assert "other settings ['learning_rate']" in capsys.readouterr().err
    assert train(resumed, cache, "--resume", "--overwrite") == 2
    assert "pick one" in capsys.readouterr().err
