"""Protocols of the morph-detection example: leave-one-method-out and cross-dataset, end to end on tiny runs."""

from __future__ import annotations

import json
from pathlib import Path

import morph_detection
import numpy as np
import pytest
from madlab.io.config import ATTACK_MODES
from madlab.run.protocols import format_protocol, format_unseen
from PIL import Image

from example.run.test_closing import check_paths, closing, next_argv

# The fast embedded fixture (lfw_subset, whole images): these tests check the protocols, not the faces.
TINY = ["backbone=mae-vit-tiny",
        "pretrain_epochs=2", "num_epochs=2", "morphs_per_face=1", "batch_size=32", "use_early_stopping=false",
        "embedded_data=lfw_subset", "face_crop=none"]


def _overrides(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--override", item)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_leave_one_method_out_holds_each_method_out_and_says_so(tmp_path, cache, capsys):
    rc = morph_detection.main(["protocol", "leave-one-method-out", "--attacks", "given,synthetic", "--output_dir",
                               str(tmp_path), "--cache_dir", str(cache), "--no_progress", *_overrides(TINY)])
    assert rc == 0
    out = tmp_path / "protocol" / "leave-one-method-out"
    rows = json.loads((out / "protocol.json").read_text())
    runs = {(r["attacks"], r["never_seen"]) for r in rows}
    assert runs == {("given", "blend"), ("given", "splice"), ("synthetic", "blend, splice")}
    assert all(r["trained_on"].startswith("embedded lfw_subset (") for r in rows)  # the embedded set it ran on
    # TINY sets num_epochs=2; each mode keeps its own default learning rate (Config.lr).
    assert {(r["attacks"], r["schedule"]) for r in rows} == {("given", "at most 2 epochs at learning rate 0.001"),
                                                              ("synthetic", "at most 2 epochs at learning rate 0.0005")}
    for r in rows:
        if r["subset"] in ("blend", "splice"):
            assert (r["seen_in_training"] == "NO") == (r["subset"] in r["never_seen"]), r
            assert r["n_bona_fide"] == 20 and r["n_morph"] == 10  # the whole test split, held-out method included
    assert {r["subset"] for r in rows} >= {"shortcut:sharpness", "shortcut:contrast", "overall"}
    # The held-out method's morphs were really kept out of train and dev.
    summary = json.loads((out / "given-without-blend" / "train_summary.json").read_text())
    assert summary["dev_attacks"].startswith("dev attacks: the 10 given dev morphs (splice)")
    synthetic = json.loads((out / "synthetic-without-blend-splice" / "train_summary.json").read_text())
    assert "synthetic attacks, one from each dev bona fide" in synthetic["dev_attacks"]
    printed = capsys.readouterr().out
    assert "never seen in training: blend" in printed and "detector on methods never seen in training" in printed
    assert "trained on embedded lfw_subset (bona fides + synthetic attacks only), at most 2 epochs at learning rate" \
           " 0.0005; never seen in training: blend, splice" in printed
    paths, result, follow = closing(printed)  # it ends with its files, its worst unseen AUC and the next protocol
    check_paths(paths)
    assert (out / "protocol.json").resolve() in paths and out.resolve() in paths
    assert result.startswith("worst AUC on a method never seen in training: ")
    assert next_argv(follow)[:2] == ["protocol", "cross-dataset"]
    header = (out / "protocol.csv").read_text().splitlines()[0]
    assert header.startswith("protocol,attacks,trained_on,schedule,never_seen")


def _data_b(root: Path, n: int = 12) -> Path:
    """A second data set with its own method name: lfw faces 40.. as bona fides and their pairwise averages."""
    from skimage.data import lfw_subset

    faces = lfw_subset()[40:40 + n]
    for sub in ("bona_fide", "morph/average"):
        (root / sub).mkdir(parents=True)
    for i, face in enumerate(faces):
        Image.fromarray((face * 255).round().astype(np.uint8)).save(root / "bona_fide" / f"{i}.png")
    for i in range(0, n - 1, 2):
        morph = 0.5 * (faces[i] + faces[i + 1])
        Image.fromarray((morph * 255).round().astype(np.uint8)).save(root / "morph" / "average" / f"{i}.png")
    return root


def test_cross_dataset_scores_all_of_the_other_data_set(tmp_path, cache, capsys):
    data_b = _data_b(tmp_path / "b")
    rc = morph_detection.main(["protocol", "cross-dataset", "--test_data", str(data_b), "--output_dir",
                               str(tmp_path / "run"), "--cache_dir", str(cache), "--no_progress", *_overrides(TINY)])
    assert rc == 0
    out = tmp_path / "run" / "protocol" / "cross-dataset"
    rows = json.loads((out / "protocol.json").read_text())
    method = next(r for r in rows if r["subset"] == "average")
    assert method["n_bona_fide"] == 12 and method["n_morph"] == 6 and method["seen_in_training"] == "NO"
    assert "every image of" in method["never_seen"] and "methods: average" in method["never_seen"]
    # Scored by `test --data B --split all`: its report, with A's dev-fixed shortcut thresholds.
    metrics = json.loads((out / "given" / "metrics.json").read_text())
    assert metrics["overall"]["auc"] == method["auc"] and set(metrics["shortcuts"]) == {"sharpness", "contrast"}
    assert metrics["data"]["split"] == "all" and metrics["data"]["scored"] == 18


def test_cross_dataset_needs_test_data(tmp_path, capsys):
    rc = morph_detection.main(["protocol", "cross-dataset", "--output_dir", str(tmp_path), "--no_progress"])
    assert rc == 2 and "needs --test_data" in capsys.readouterr().err


def test_bad_attack_modes_are_refused(tmp_path, capsys):
    rc = morph_detection.main(["protocol", "leave-one-method-out", "--attacks", "given,fancy", "--output_dir",
                               str(tmp_path), "--no_progress"])
    assert rc == 2 and f"must list modes from {ATTACK_MODES}" in capsys.readouterr().err


def test_a_key_one_mode_refuses_stops_the_protocol_before_any_run_trains(tmp_path, cache, capsys):
    # generated first: without the check up front it would train before `given` refused the key.
    rc = morph_detection.main(["protocol", "cross-dataset", "--attacks", "generated,given", "--test_data",
                               str(tmp_path / "B"), "--output_dir", str(tmp_path), "--cache_dir", str(cache),
                               "--no_progress", *_overrides([*TINY, "generated_flow_p=0.5"])])
    assert rc == 2
    assert "generated_flow_p=0.5 aligns generated morphs, but attacks=given generates none" in capsys.readouterr().err
    assert not (tmp_path / "protocol" / "cross-dataset" / "generated").exists()


def test_tables_group_runs_and_list_only_unseen_methods():
    base = {"protocol": "leave-one-method-out", "attacks": "given", "trained_on": "A (splice)", "never_seen": "blend",
            "n_bona_fide": 4, "n_morph": 2, "d_eer": 0.25, "auc": 0.75, "bpcer@apcer=1%": 1.0,
            "bpcer@apcer=5%": 0.5, "bpcer@apcer=10%": 0.5}
    rows = [{**base, "subset": "blend", "seen_in_training": "NO"},
            {**base, "subset": "splice", "seen_in_training": "yes", "auc": 0.9},
            {**base, "subset": "shortcut:sharpness:blend", "seen_in_training": "NO"}]
    table = format_protocol(rows)
    assert table.count("never seen in training: blend") == 1
    unseen = format_unseen(rows).splitlines()
    assert len(unseen) == 4 and "blend" in unseen[3] and "0.750" in unseen[3]
    flagged = {**rows[0], "auc_low": 0.61, "auc_high": 0.88, "too_small": "bpcer@apcer=1%;bpcer@apcer=5%"}
    line = format_protocol([flagged]).splitlines()[3].split()
    assert line[-5:] == ["0.750", "0.610-0.880", "--", "--", "50.0%"]
