"""The example's training checkpoint: an interrupted run resumed ends exactly as an uninterrupted one."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import morph_detection
import pytest
from madlab.run.resume import STATE_FILE
from madlab.run.training import STOP_AFTER_ENV
from safetensors import safe_open
from safetensors.torch import load_file, save_file

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
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The backbone cache every run of this module shares (the small ViT is pretrained once)."""
    return tmp_path_factory.mktemp("cache")


def interrupted_and_whole(tmp_path_factory: pytest.TempPathFactory, cache: Path,
                          overrides: list[str]) -> tuple[Path, Path]:
    """(uninterrupted run, run interrupted after epoch 2 then resumed), both with ``overrides``."""
    whole, resumed = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("resumed")
    assert train(whole, cache, overrides=overrides) == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(STOP_AFTER_ENV, "2")
        assert train(resumed, cache, overrides=overrides) == 3  # interrupted after epoch 2
    assert not (resumed / "morph_detector.safetensors").exists()
    assert len(log_rows(resumed)) == 2
    assert train(resumed, cache, "--resume", overrides=overrides) == 0
    return whole, resumed


def assert_same_run(whole: Path, resumed: Path, epochs: int) -> None:
    a = load_file(str(whole / "morph_detector.safetensors"))
    b = load_file(str(resumed / "morph_detector.safetensors"))
    assert sorted(a) == sorted(b)
    assert all((a[k] == b[k]).all() for k in a), [k for k in a if not (a[k] == b[k]).all()]
    assert log_rows(whole) == log_rows(resumed)
    assert len(log_rows(whole)) == epochs
    # The last epoch's weights and optimiser moments too, not only the restored best epoch's.
    last = [load_file(str(out / STATE_FILE)) for out in (whole, resumed)]
    kept = [k for k in last[0] if k.startswith(("param.", "optim."))]
    assert kept and all((last[0][k] == last[1][k]).all() for k in kept)
    summary = [json.loads((out / "train_summary.json").read_text()) for out in (whole, resumed)]
    for key in ("best_epoch", "best_dev_loss", "best_dev_eer", "threshold"):
        assert summary[0][key] == summary[1][key], key


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> tuple[Path, Path, Path]:
    """(uninterrupted run, interrupted-then-resumed run, backbone cache)."""
    return (*interrupted_and_whole(tmp_path_factory, cache, TINY), cache)


def test_resumed_run_ends_bit_identical_to_the_uninterrupted_one(runs) -> None:
    whole, resumed, _ = runs
    assert_same_run(whole, resumed, 4)


# No image cache: every image is decoded (and augmented) in worker processes each epoch.
DECODED_IN_WORKERS = [*TINY, "num_epochs=3", "num_workers=2", "image_cache_mb=0"]


@pytest.fixture(scope="module")
def worker_runs(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> tuple[Path, Path]:
    return interrupted_and_whole(tmp_path_factory, cache, DECODED_IN_WORKERS)


def test_resume_is_bit_identical_with_images_decoded_in_worker_processes(worker_runs) -> None:
    # Before: persistent workers drew their random seeds once, at the first epoch of a process, so
    # the resumed run's epoch 3 augmented (and shuffled) differently from the uninterrupted run's.
    assert_same_run(*worker_runs, 3)


@pytest.mark.parametrize("change", ["num_workers=1", "image_cache_mb=4096"])
def test_resume_that_would_draw_the_augmentation_elsewhere_is_refused(worker_runs, change: str, tmp_path: Path,
                                                                      cache: Path, capsys) -> None:
    # Other workers (or none: every image cached) draw other augmentations: before, such a resume
    # went on without a word and ended elsewhere than the run it continued.
    shutil.copytree(worker_runs[1], tmp_path / "run")
    assert train(tmp_path / "run", cache, "--resume", overrides=[*DECODED_IN_WORKERS, change]) == 2
    err = capsys.readouterr().err
    assert "training augmentation 2 worker processes drew (num_workers=2, image_cache_mb=0)" in err, err
    assert "Resume with the run's num_workers and image_cache_mb" in err


def test_resume_with_other_workers_is_allowed_where_the_main_process_draws(runs, tmp_path: Path, cache: Path) -> None:
    # Every training image cached: the main process serves and augments them, whatever num_workers says.
    shutil.copytree(runs[1], tmp_path / "run")
    assert train(tmp_path / "run", cache, "--resume", overrides=[*TINY, "num_workers=0"]) == 0


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


def test_a_checkpoint_from_before_synthetic_match_resumes_with_the_matching_it_had(runs, tmp_path: Path,
                                                                                   capsys) -> None:
    _, resumed, cache = runs
    old = tmp_path / "old"
    shutil.copytree(resumed, old)
    state = old / STATE_FILE
    with safe_open(str(state), framework="pt") as handle:
        meta = json.loads(handle.metadata()["madlab_train_state"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    del meta["run"]["config"]["synthetic_match"]  # as written before the key existed
    save_file(tensors, str(state), metadata={"madlab_train_state": json.dumps(meta)})
    assert train(old, cache, "--resume") == 2
    err = capsys.readouterr().err
    assert "other settings ['synthetic_match']" in err and "--override synthetic_match=face" in err
    assert train(old, cache, "--resume", overrides=[*TINY, "synthetic_match=face"]) == 0
    assert log_rows(old) == log_rows(resumed)
