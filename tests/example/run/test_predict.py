"""predict, export and test on another data set, through the example's command line, on files made here.

One tiny run (a random 2-block ViT folder, a folder data set of random images) is trained once;
every test scores it and checks the outcome against an independent reading: ``test``'s own
scores.csv, the thresholds recomputed from dev scores, the unmerged model's logits.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
from pathlib import Path

import morph_detection
import numpy as np
import pytest
import torch
from madlab.evaluation.metrics import apcer_bpcer
from madlab.evaluation.report import read_scores_csv
from madlab.model.checkpoint import read_metadata
from madlab.run.detector import Detector
from madlab.run.predict import EXIT_SOME_FAILED, PREDICT_COLUMNS
from PIL import Image
from safetensors import safe_open

from example.cli import cli, overrides
from lora_vit import disable_lora

MODEL = "morph_detector.safetensors"
# Generated noise images have no faces: they are read whole (face_crop=none).
TRAIN = ["num_epochs=3", "batch_size=8", "use_early_stopping=false", "num_threads=1", "learning_rate=2e-2",
         "num_workers=0", "face_crop=none"]






def image(path: Path, seed: int, smooth: bool = False, size: tuple[int, int] = (20, 24)) -> Path:
    """A random RGB image; ``smooth`` ones are blurred (a cue the detector can learn)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3)).astype(np.float64)
    if smooth:
        x = (x + np.roll(x, 1, 0) + np.roll(x, 1, 1) + np.roll(x, 2, 0)) / 4
    Image.fromarray(x.astype(np.uint8)).save(path)
    return path


def data_tree(root: Path, n: int, splits: tuple[str, ...] = ("train", "dev", "test"), seed: int = 0) -> Path:
    for k, split in enumerate(splits):
        for i in range(n):
            image(root / split / "bona_fide" / f"bf{i}.png", seed + 1000 * k + i)
            image(root / split / "morph" / "blend" / f"m{i}.png", seed + 1000 * k + 500 + i, smooth=True)
    return root


def tiny_vit(folder: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64), add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict")
    data = data_tree(root / "data", 8)
    backbone = tiny_vit(root / "vit")
    out = root / "out"
    rc, _, err = cli("train", "--data", str(data), "--backbone", str(backbone), "--output_dir", str(out),
                     "--no_progress", *overrides(TRAIN))
    assert rc == 0, err
    return {"root": root, "data": data, "backbone": backbone, "out": out, "model": out / MODEL}


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def scores_of_test(run, tmp_path: Path, split: str = "all") -> dict[str, float]:
    """``test --split`` on the training data: path -> logit, from scores.csv."""
    rc, _, err = cli("test", "--model_path", str(run["model"]), "--split", split, "--output_dir", str(tmp_path),
                     "--no_progress")
    assert rc == 0, err
    paths, _, _, scores = read_scores_csv(tmp_path / "scores.csv")
    return dict(zip(paths, scores))


def test_predict_logits_equal_tests_and_rows_follow_the_input_order(run, tmp_path: Path) -> None:
    expected = scores_of_test(run, tmp_path / "test")
    listing = tmp_path / "list.txt"
    picks = [p for p in sorted(expected) if "/test/" in p][:3]
    listing.write_text("# three files, then the folder\n" + "\n".join(picks) + "\n")
    output = tmp_path / "pred.csv"
    rc, stdout, err = cli("predict", "--model_path", str(run["model"]), "--input", str(listing), "--input",
                          str(run["data"]), "--output", str(output), "--batch_size", "5", "--no_progress")
    assert rc == 0, err
    columns, rows = read_rows(output)
    assert columns == PREDICT_COLUMNS
    folder = sorted(str(p) for p in run["data"].rglob("*.png"))
    assert [r["path"] for r in rows] == picks + folder  # list first, then the folder's files sorted
    assert all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert abs(float(r["logit"]) - expected[r["path"]]) <= 1e-5
        assert float(r["p_morph"]) == pytest.approx(1 / (1 + np.exp(-float(r["logit"]))), rel=1e-12)
    tau = read_metadata(run["model"])["threshold"]["value"]
    assert [r["decision"] for r in rows] == ["morph" if float(r["logit"]) >= tau else "bona_fide" for r in rows]
    summary = [line for line in stdout.splitlines() if line.startswith(f"result: predict: {len(rows)} files:")]
    assert len(summary) == 1 and f"{len(rows)} scored" in summary[0] and "0 failed" in summary[0]
    assert "images/s" in summary[0]


def bad_folder(root: Path) -> dict[str, str]:
    """Files that cannot be scored, each with the status its row must carry, and odd ones that can."""
    root.mkdir(parents=True)
    image(root / "a_good.png", 1)
    (root / "b_empty.jpg").write_bytes(b"")
    (root / "c_text.png").write_text("not an image at all")
    good = image(root / "d_truncated.png", 2, size=(64, 64)).read_bytes()
    (root / "d_truncated.png").write_bytes(good[: len(good) // 2])
    (root / "e_loop.jpg").symlink_to(root / "e_loop.jpg")
    (root / "f_sub").mkdir()
    (root / "f_sub" / "back").symlink_to(root)  # a folder loop
    image(root / "f_sub" / "g_good.png", 3)
    return {"b_empty.jpg": "empty file (0 bytes)", "c_text.png": "not an image",
            "d_truncated.png": "truncated or corrupt image", "e_loop.jpg": "symlink loop", "back": "symlink loop"}


def test_bad_files_get_their_own_rows_and_exit_status_4(run, tmp_path: Path) -> None:
    statuses = bad_folder(tmp_path / "in")
    output = tmp_path / "pred.csv"
    rc, stdout, err = cli("predict", "--model_path", str(run["model"]), "--input", str(tmp_path / "in"),
                          "--input", str(tmp_path / "missing.png"), "--output", str(output), "--no_progress")
    assert rc == EXIT_SOME_FAILED, err
    _, rows = read_rows(output)
    by_name = {Path(r["path"]).name: r for r in rows}
    assert [Path(r["path"]).name for r in rows] == ["a_good.png", "b_empty.jpg", "c_text.png", "d_truncated.png",
                                                    "e_loop.jpg", "back", "g_good.png", "missing.png"]
    for name, status in {**statuses, "missing.png": "file not found"}.items():
        assert by_name[name]["status"] == status and by_name[name]["logit"] == "" == by_name[name]["decision"]
    for name in ("a_good.png", "g_good.png"):
        assert by_name[name]["status"] == "ok" and by_name[name]["decision"] in ("morph", "bona_fide")
    assert "8 files: 2 scored" in stdout and "6 failed" in stdout


def test_operating_points_are_the_dev_thresholds_recorded_in_the_model_file(run, tmp_path: Path) -> None:
    dev = scores_of_test(run, tmp_path / "dev", split="dev")
    labels = np.array([0 if "/bona_fide/" in p else 1 for p in dev])
    scores = np.array(list(dev.values()))
    points = read_metadata(run["model"])["thresholds"]
    assert set(points) == {"eer", "apcer=0.01", "apcer=0.05", "apcer=0.10"}
    candidates = np.concatenate([np.sort(scores), [np.inf]])
    for name, x in (("apcer=0.01", 0.01), ("apcer=0.05", 0.05), ("apcer=0.10", 0.10)):
        tau = points[name]["value"]
        assert apcer_bpcer(scores, labels, tau)["apcer"] <= x
        # the largest such tau: APCER grows with the threshold, so the next higher candidate exceeds
        # the bound (the check looked at the next lower one, which never can, and passed only while
        # tau was the lowest score)
        higher = candidates[candidates > tau]
        if len(higher):
            assert apcer_bpcer(scores, labels, higher[0])["apcer"] > x
    worst = {t: max(apcer_bpcer(scores, labels, t)["apcer"], apcer_bpcer(scores, labels, t)["bpcer"])
             for t in candidates[:-1]}
    eer = points["eer"]["value"]
    assert max(apcer_bpcer(scores, labels, eer)["apcer"], apcer_bpcer(scores, labels, eer)["bpcer"]) == min(
        worst.values())
    image_path = next(p for p in dev if "/test/" not in p)
    output = tmp_path / "pred.csv"
    for point in ("eer", "apcer=0.01", "apcer=0.10"):
        rc, _, err = cli("predict", "--model_path", str(run["model"]), "--input", image_path, "--output", str(output),
                         "--operating_point", point, "--no_progress")
        assert rc == 0, err
        row = read_rows(output)[1][0]
        assert row["decision"] == ("morph" if float(row["logit"]) >= points[point]["value"] else "bona_fide")


def test_unknown_operating_point_is_an_argparse_error(run, tmp_path: Path) -> None:
    rc, _, err = cli("predict", "--model_path", str(run["model"]), "--input", str(tmp_path), "--operating_point",
                     "apcer=0.2")
    assert rc == 2 and "invalid choice: 'apcer=0.2'" in err


def test_export_is_one_merged_file_whose_logits_equal_the_unmerged_model(run, tmp_path: Path) -> None:
    exported = tmp_path / "merged.safetensors"
    rc, _, err = cli("export", "--model_path", str(run["model"]), "--output", str(exported))
    assert rc == 0, err
    with safe_open(str(exported), framework="pt") as handle:
        keys = set(handle.keys())
    assert not any("lora" in k for k in keys), "adapters are merged, not stored"
    from madlab.model.families import load_backbone

    base, _ = load_backbone(str(run["backbone"]))
    assert {k for k in keys if k.startswith("backbone.")} == {f"backbone.{k}" for k in base.state_dict()}
    assert {k for k in keys if not k.startswith("backbone.")} == {"head.weight", "head.bias"}
    meta = read_metadata(exported)
    assert meta["thresholds"] == read_metadata(run["model"])["thresholds"]
    # Scored images: the merged file against the unmerged model, and the adapters really matter.
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    unmerged, merged = Detector.load(run["model"]), Detector.load(exported)
    assert merged.exported and not unmerged.exported
    with torch.no_grad():
        a, b = unmerged.score(x), merged.score(x)
        with disable_lora(unmerged.model):
            base_logits = unmerged.model(x).double().numpy()
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(a - base_logits).max() > 1e-3, "the trained adapters change the logits"
    # test and predict accept the export, without the backbone folder.
    moved = run["backbone"].rename(run["backbone"].with_name("vit_moved"))
    try:
        scores = scores_of_test({**run, "model": exported}, tmp_path / "t")
        output = tmp_path / "pred.csv"
        rc, _, err = cli("predict", "--model_path", str(exported), "--input", str(run["data"]), "--output",
                         str(output), "--no_progress")
    finally:
        moved.rename(run["backbone"])
    assert rc == 0, err
    expected = scores_of_test(run, tmp_path / "u")
    assert max(abs(scores[p] - expected[p]) for p in expected) <= 1e-4
    assert all(abs(float(r["logit"]) - expected[r["path"]]) <= 1e-4 for r in read_rows(output)[1])


def test_export_refuses_to_overwrite_its_input(run) -> None:
    rc, _, err = cli("export", "--model_path", str(run["model"]), "--output", str(run["model"]))
    assert rc == 2 and "is the model file itself" in err


def test_test_on_another_data_set_scores_all_of_it(run, tmp_path: Path) -> None:
    other = data_tree(tmp_path / "other", 5, splits=("train", "test"), seed=77)
    for path in (other / "train" / "morph").rglob("*.png"):  # its train share lacks a class
        path.unlink()
    (other / "test" / "bona_fide" / "broken.png").write_bytes(b"\x89PNG garbage")
    out = tmp_path / "report"
    rc, stdout, err = cli("test", "--model_path", str(run["model"]), "--data", str(other), "--output_dir",
                          str(out), "--no_progress")
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["split"] == "all"
    assert metrics["data"]["scored"] == 15 and metrics["data"]["found"] == 16  # 10 + 5 images, 1 broken
    assert "15 of the 16 files found" in stdout
    paths, labels, _, _ = read_scores_csv(out / "scores.csv")
    assert sorted(paths) == sorted(str(p) for p in other.rglob("*.png") if p.name != "broken.png")
    assert int(labels.sum()) == 5
    assert set(metrics["shortcuts"]) == {"sharpness", "contrast"}, "the model file's own shortcut thresholds"
    stored = read_metadata(run["model"])["shortcut_thresholds"]
    assert metrics["shortcuts"]["sharpness"]["threshold"]["value"] == stored["sharpness"]["value"]
    # --split names a share explicitly; a share with one class is refused with its counts.
    rc, _, err = cli("test", "--model_path", str(run["model"]), "--data", str(other), "--split", "train",
                     "--output_dir", str(out), "--no_progress")
    # (without a dev folder a quarter of train became dev, so the train share holds 3 or 4 of the 5)
    assert rc == 2 and re.search(r"the train images of .* are [34] bona fide and 0 morphs; scoring needs both", err)


def test_predict_progress_bar_only_on_a_terminal(run, tmp_path: Path) -> None:
    output = tmp_path / "pred.csv"
    rc, _, err = cli("predict", "--model_path", str(run["model"]), "--input", str(run["data"]), "--output",
                     str(output))
    assert rc == 0 and "it/s" not in err and "img/s" not in err and "\r" not in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_gets_its_row(run, tmp_path: Path) -> None:
    locked = image(tmp_path / "locked.png", 5)
    locked.chmod(0)
    output = tmp_path / "pred.csv"
    rc, _, _ = cli("predict", "--model_path", str(run["model"]), "--input", str(locked), "--output", str(output))
    assert rc == EXIT_SOME_FAILED
    assert read_rows(output)[1][0]["status"] == "unreadable (permission denied)"


def test_a_failing_per_image_step_costs_only_that_images_row(run, tmp_path: Path) -> None:
    """The slot for a face crop: a step that rejects an image (no face) or crashes marks that row only."""
    from madlab.io.pixels import RejectedImageError
    from madlab.run.predict import expand_inputs, run_predictions

    for i in range(3):
        image(tmp_path / f"{i}.png", 40 + i)

    def step(pixels: np.ndarray, path: str) -> np.ndarray:
        if path.endswith("0.png"):
            raise RejectedImageError(path, "no face")
        if path.endswith("1.png"):
            raise ZeroDivisionError("a bug in the step")
        return pixels

    detector = Detector.load(run["model"], ["num_workers=0"])
    rows = expand_inputs([str(tmp_path)])
    run_predictions(detector, rows, batch_size=2, num_workers=0, progress=False, steps=[step])
    assert [(Path(r.path).name, r.status, r.logit is None) for r in rows] == [
        ("0.png", "no face", True), ("1.png", "could not read (ZeroDivisionError)", True), ("2.png", "ok", False)]


def test_predict_shows_a_progress_bar_on_a_terminal(run, tmp_path: Path) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Terminal()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = morph_detection.main(["predict", "--model_path", str(run["model"]), "--input", str(run["data"]),
                                   "--output", str(tmp_path / "p.csv")])
    assert rc == 0 and "predict" in err.getvalue() and "img" in err.getvalue()
    err = Terminal()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = morph_detection.main(["predict", "--model_path", str(run["model"]), "--input", str(run["data"]),
                                   "--output", str(tmp_path / "p.csv"), "--no_progress"])
    assert rc == 0 and err.getvalue() == ""


def test_an_older_model_file_offers_only_its_own_threshold(tmp_path: Path) -> None:
    from madlab.io.config import Config, ConfigError

    old = Detector(None, Config(), {"threshold": {"rule": "dev_eer", "value": 0.3, "score": "logit"}},
                   tmp_path / "old.safetensors", "fp32", None)
    assert old.threshold()["value"] == 0.3
    assert old.decide(np.array([0.29, 0.3, 0.31])).tolist() == [False, True, True]
    with pytest.raises(ConfigError, match="records no 'eer' threshold"):
        old.threshold("eer")
    with pytest.raises(ConfigError, match="is not one of"):
        old.threshold("apcer=0.2")
