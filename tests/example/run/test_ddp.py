"""The example under ``torchrun --nproc_per_node=2`` (gloo, CPU): rank 0 alone writes and prints, the test
split is scored once per image, metrics equal those recomputed from scores.csv, and the adapters equal
those of one process trained on the same global batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import morph_detection
import numpy as np
import pytest
import torch
import torch.distributed as dist
from madlab.evaluation.metrics import apcer_bpcer, auc, d_eer
from madlab.evaluation.report import read_scores_csv
from safetensors.torch import load_file

from example.run.test_bad_inputs import image, overrides, tiny_vit

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "examples" / "morph_detection.py"
# No dropout and no augmentation: the only randomness left is the data order, which the
# DistributedSampler fixes from the seed, so 1 and 2 processes see the same global batches.
SETTINGS = ["num_epochs=2", "batch_size=8", "use_early_stopping=false", "use_cls_aug=false", "lora_dropout=0",
            "dropout_p=0", "learning_rate=1e-2", "num_threads=1", "face_crop=none"]
SIZES = {"train": (8, 8), "dev": (5, 5), "test": (7, 6)}  # 13 test images: the sampler pads one on 2 ranks
OUTPUTS = {"morph_detector.safetensors", "train_state.safetensors", "train_log.csv", "train_summary.json",
           "scores.csv", "metrics.json", "roc.png", "det.png", "score_histogram.png"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(args: list[str], folder: Path, out: Path, name: str) -> dict[int, str]:
    """``torchrun --nproc_per_node=2 morph_detection.py ARGS``; returns each rank's stdout."""
    logs = folder / f"logs-{name}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests" / "ddp_audit"),
           "MADLAB_AUDIT_WATCH": str(out), "MADLAB_AUDIT_DIR": str(folder / f"audit-{name}")}
    (folder / f"audit-{name}").mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "--log-dir", str(logs), "--redirects", "3", str(SCRIPT), *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=folder)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"torchrun {name} did not finish in 120 s") from None
    per_rank = {}
    for rank in (0, 1):
        found = list(logs.rglob(f"attempt_0/{rank}/stdout.log"))
        per_rank[rank] = found[0].read_text() if found else ""
        if done.returncode:
            errors = [p.read_text() for p in logs.rglob(f"attempt_0/{rank}/stderr.log")]
            per_rank[rank] += "\n".join(errors)
    assert done.returncode == 0, f"{done.stderr[-3000:]}\n{per_rank}"
    return per_rank


def _audit(folder: Path, name: str) -> dict[int, list[str]]:
    return {rank: [line for line in (folder / f"audit-{name}" / f"rank{rank}.txt").read_text().splitlines() if line]
            for rank in (0, 1)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("ddp")
    data = folder / "data"
    for split, (n_bf, n_m) in SIZES.items():
        for i in range(n_bf):
            image(data / split / "bona_fide" / f"bf{i}.png", value=i + 10 * len(split))
        for i in range(n_m):
            image(data / split / "morph" / "blend" / f"m{i}.png", value=100 + i + 10 * len(split))
    return folder, data, tiny_vit(folder / "vit", 0)


@pytest.fixture(scope="module")
def two_ranks(setup) -> tuple[Path, dict, dict]:
    """(output folder, stdout by step and rank, files written by step and rank) of train then test."""
    folder, data, vit = setup
    out = folder / "out2"
    printed, written = {}, {}
    printed["train"] = _torchrun(["train", "--data", str(data), "--backbone", str(vit), "--output_dir", str(out),
                                  *overrides(SETTINGS)], folder, out, "train")
    written["train"] = _audit(folder, "train")
    printed["test"] = _torchrun(["test", "--model_path", str(out / "morph_detector.safetensors"), "--output_dir",
                                 str(out)], folder, out, "test")
    written["test"] = _audit(folder, "test")
    return out, printed, written


def test_rank_zero_alone_writes_and_prints(two_ranks) -> None:
    out, printed, written = two_ranks
    assert {p.name for p in out.iterdir()} == OUTPUTS
    for step in ("train", "test"):
        assert written[step][1] == [], f"rank 1 wrote during {step}: {written[step][1]}"
        assert printed[step][1].strip() == "", f"rank 1 printed during {step}: {printed[step][1]}"
    names = {Path(line.split(" ", 1)[1]).name for step in written for line in written[step][0]}
    assert {"train_log.csv", "train_summary.json", "scores.csv", "metrics.json", "roc.png"} <= names
    assert printed["train"][0].count("saved ") == 1 and "train: bona_fide=8, morph/blend=8" in printed["train"][0]
    assert "overall" in printed["test"][0]


def test_scores_csv_has_every_test_image_once_in_order(two_ranks, setup) -> None:
    out, _, _ = two_ranks
    _, data, _ = setup
    paths, labels, _, scores = read_scores_csv(out / "scores.csv")
    expected = sorted(str(p) for p in (data / "test").rglob("*.png"))
    assert sorted(paths) == expected and len(paths) == len(set(paths)) == sum(SIZES["test"])
    assert paths == sorted(paths, key=lambda p: ("morph" in p, p)), "dataset order: bona fides first, then morphs"
    assert labels.tolist() == [0] * SIZES["test"][0] + [1] * SIZES["test"][1]
    assert np.isfinite(scores).all() and len(set(scores.tolist())) > 1


def test_metrics_equal_those_recomputed_from_scores_csv(two_ranks) -> None:
    out, _, _ = two_ranks
    metrics = json.loads((out / "metrics.json").read_text())
    _, labels, _, scores = read_scores_csv(out / "scores.csv")
    overall = metrics["overall"]
    assert (overall["n_bona_fide"], overall["n_morph"]) == SIZES["test"]
    assert overall["d_eer"] == d_eer(scores, labels)["eer"]
    assert overall["auc"] == auc(scores, labels)
    assert overall["at_threshold"] == apcer_bpcer(scores, labels, metrics["threshold"]["value"])


def test_adapters_match_one_process_with_the_same_global_batch(two_ranks, setup) -> None:
    folder, data, vit = setup
    out, _, _ = two_ranks
    one = folder / "out1"
    # One process in a world of one: the same DistributedSampler order, the whole global batch per step.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        rc = morph_detection.main(["train", "--data", str(data), "--backbone", str(vit), "--output_dir", str(one),
                                   "--no_progress", *overrides(SETTINGS)])
    finally:
        dist.destroy_process_group()
    assert rc == 0
    two, single = load_file(str(out / "morph_detector.safetensors")), load_file(str(one / "morph_detector.safetensors"))
    assert sorted(two) == sorted(single) and any("lora_B" in k for k in two)
    for key in single:
        torch.testing.assert_close(two[key], single[key], rtol=1e-5, atol=1e-6, msg=key)
    assert any(float(single[k].abs().max()) > 0 for k in single if "lora_B" in k), "the adapters trained"
    # The log's losses are over all ranks' samples: the same figures as one process.
    import csv

    logs = [list(csv.DictReader((d / "train_log.csv").open())) for d in (out, one)]
    assert [r["epoch"] for r in logs[0]] == [r["epoch"] for r in logs[1]] == ["1", "2"]
    for a, b in zip(*logs):
        for key in ("train_loss", "dev_loss", "dev_eer"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-6), key
        assert a["best"] == b["best"]
