"""``test`` scores the split the model file recorded, never one computed again from what is on disk now.

Each test is a case where, before, the example scored images it had trained on without a
refusal or a warning: a photo added to the data folder, a test image changed, the data path
spelt with a trailing slash or through a link, ``identity_pattern`` changed at test time, and
another data set holding training images or people.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from madlab.evaluation.report import read_scores_csv
from madlab.io.config import EVAL_KEYS, FRLL_EXAMPLE, SPLIT_KEYS
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from example.cli import overrides
from example.run.test_bad_inputs import MODEL, TINY, cli, fails, image, tiny_vit


def flat_tree(root: Path, n: int = 12) -> Path:
    """No split folders and no identities: the split is made by image (stratified)."""
    for i in range(n):
        image(root / "bona_fide" / f"bf{i:02d}.png", value=i)
        image(root / "morph" / "blend" / f"m{i:02d}.png", value=100 + i)
    return root


def frll_tree(root: Path) -> Path:
    """Given splits of FRLL-style names (identity_pattern FRLL_EXAMPLE): four people in train (morphs
    001_002 and 003_004), two in dev and two in test (one morph each)."""
    people = {"train": ("001", "002", "003", "004"), "dev": ("005", "006"), "test": ("007", "008")}
    for split, ids in people.items():
        for person in ids:
            image(root / split / "bona_fide" / f"{person}_01.png", value=int(person))
        for a, b in zip(ids[::2], ids[1::2]):
            image(root / split / "morph" / "blend" / f"{a}_{b}.png", value=100 + int(a))
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One model trained on a flat tree, one on an FRLL-style tree with identities, and the first one's test."""
    root = tmp_path_factory.mktemp("recorded")
    backbone = tiny_vit(root / "vit", 0)
    made = {"backbone": backbone, "flat": flat_tree(root / "flat"), "frll": frll_tree(root / "frll")}
    for name, extra in (("flat", []), ("frll", [f"identity_pattern={FRLL_EXAMPLE}"])):
        out = root / f"{name}_out"
        rc, _, err = cli("train", "--data", str(made[name]), "--backbone", str(backbone), "--output_dir", str(out),
                         "--no_progress", *overrides([*TINY, *extra]))
        assert rc == 0, err
        made[f"{name}_model"] = out / MODEL
    made["flat_test"] = root / "flat_test"
    rc, _, err = run_test_cli(made["flat_model"], made["flat_test"])
    assert rc == 0, err
    return made


def run_test_cli(model: Path, out: Path, *args: str) -> tuple[int, str, str]:
    return cli("test", "--model_path", str(model), "--output_dir", str(out), "--no_progress", *args)


def scored(out: Path) -> list[str]:
    return sorted(read_scores_csv(out / "scores.csv")[0])


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def copy_of_data(runs: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the flat data and a model file that names the copy, as if it had been trained there."""
    data = shutil.copytree(runs["flat"], tmp_path / "data")
    with safe_open(str(runs["flat_model"]), "pt") as handle:
        header = {k: v.replace(str(runs["flat"]), str(data)) for k, v in handle.metadata().items()}
    save_file(load_file(str(runs["flat_model"])), str(tmp_path / MODEL), metadata=header)
    return data, tmp_path / MODEL


def test_the_recorded_test_split_is_scored(runs) -> None:
    report = metrics(runs["flat_test"])["data"]
    assert report["split"] == "test" and report["scored"] == 6
    assert any("the test split is the one recorded in the model file: its 6 images found by content" in note
               for note in report["notes"])
    assert report["seen_in_training"]["seen"] == 0 and report["seen_in_training"]["scored"] == 6


def test_a_photo_added_to_the_folder_moves_no_training_image_into_test(runs, tmp_path: Path) -> None:
    # Before: the split was computed again from the files on disk, and one more bona fide reshuffled
    # the bona fides, bringing training images into "test".
    data, model = copy_of_data(runs, tmp_path)
    image(data / "bona_fide" / "added.png", value=77)
    rc, stdout, err = run_test_cli(model, tmp_path / "out")
    assert rc == 0, err
    before = [p.replace(str(runs["flat"]), str(data)) for p in scored(runs["flat_test"])]
    assert scored(tmp_path / "out") == before
    assert "1 images not recorded at training (added since) are not in any split" in stdout


@pytest.mark.parametrize("change", ["delete", "rewrite"])
def test_a_test_image_missing_or_changed_is_refused_with_the_count(runs, tmp_path: Path, change: str) -> None:
    # Before: the split was computed from what remained, and test went on with exit status 0.
    data, model = copy_of_data(runs, tmp_path)
    victim = Path(scored(runs["flat_test"])[0].replace(str(runs["flat"]), str(data)))
    if change == "delete":
        victim.unlink()
    else:
        image(victim, value=999)
    line = fails("test", "--model_path", str(model), "--output_dir", str(tmp_path / "out"), "--no_progress")
    assert line == (f"error: the test split this model was trained with is no longer all in {data}: 1 of its 6 images"
                    " are missing or changed (no file there has their content); restore them, or score every image"
                    " there with --split all")
    assert not (tmp_path / "out" / "scores.csv").exists()


@pytest.mark.parametrize("spelling", ["slash", "link", "dot"])
def test_the_training_data_spelt_otherwise_is_the_training_data(runs, tmp_path: Path, spelling: str) -> None:
    # Before: `--data ROOT/` was "another data set": every image scored, 36 of them trained on, no note.
    root = runs["flat"]
    data = {"slash": f"{root}/", "dot": f"{root.parent}/./{root.name}", "link": str(tmp_path / "link")}[spelling]
    if spelling == "link":
        (tmp_path / "link").symlink_to(root)
    rc, stdout, err = run_test_cli(runs["flat_model"], tmp_path / "out", "--data", data)
    assert rc == 0, err
    assert "(the data set the model was trained on)" in stdout and "another data set" not in stdout
    assert metrics(tmp_path / "out")["data"]["split"] == "test"
    assert len(scored(tmp_path / "out")) == len(scored(runs["flat_test"])) == 6


def test_split_keys_are_training_keys(runs, tmp_path: Path) -> None:
    # Before: identity_pattern was an evaluation key, and changing it at test time re-split the data.
    assert not SPLIT_KEYS & EVAL_KEYS
    line = fails("test", "--model_path", str(runs["frll_model"]), "--output_dir", str(tmp_path),
                 "--override", r"identity_pattern=^(?P<a>\d{3})")
    assert line.startswith("error: --override identity_pattern=^(?P<a>\\d{3}) does not match the model file,"
                           f" which was trained with identity_pattern={FRLL_EXAMPLE!r}. identity_pattern decides"
                           " which images are in which split"), line
    for item in ("seed=7", "train_val_pct=0.5", "dev_pct=0.3"):
        assert "decides which images are in which split" in fails(
            "test", "--model_path", str(runs["flat_model"]), "--output_dir", str(tmp_path), "--override", item)


def other_frll(runs: dict[str, Path], root: Path) -> Path:
    """Another data set: new people 009 and 010, the train person 001 photographed anew, a morph of 001
    and 009, and a byte-for-byte copy of a dev photo under a new name."""
    image(root / "bona_fide" / "009_01.png", value=9)
    image(root / "bona_fide" / "010_01.png", value=10)
    image(root / "bona_fide" / "001_05.png", value=501)  # other bytes, the same person
    shutil.copy(runs["frll"] / "dev" / "bona_fide" / "005_01.png", root / "bona_fide" / "011_01.png")
    image(root / "morph" / "blend" / "009_010.png", value=910)
    image(root / "morph" / "blend" / "001_009.png", value=190)
    return root


def test_another_data_set_reports_the_images_and_people_training_saw(runs, tmp_path: Path) -> None:
    # Before: nothing checked another data set for shared bona fides or people.
    data = other_frll(runs, tmp_path / "other")
    rc, stdout, err = run_test_cli(runs["frll_model"], tmp_path / "out", "--data", str(data))
    assert rc == 0, err
    assert "(another data set)" in stdout
    assert ("WARNING: 3 of the 6 scored images were seen in training or dev (same content as 0 train / 1 dev"
            " images; showing a train person: 2, a dev person: 0)") in stdout
    seen = metrics(tmp_path / "out")["data"]["seen_in_training"]
    assert seen["seen"] == 3 and seen["images"] == {"train": 0, "dev": 1} and seen["people"] == {"train": 2, "dev": 0}
    assert sorted(Path(p).name for p in seen["examples"]) == ["001_009.png", "001_05.png", "011_01.png"]


def test_strict_refuses_another_data_set_that_training_saw(runs, tmp_path: Path) -> None:
    data = other_frll(runs, tmp_path / "other")
    line = fails("test", "--model_path", str(runs["frll_model"]), "--output_dir", str(tmp_path / "out"),
                 "--data", str(data), "--strict")
    assert line.startswith("error: --strict: 3 of the 6 images to score were seen in training or dev"), line
    assert not (tmp_path / "out" / "scores.csv").exists()
    # Only unseen people and images: --strict scores them.
    for name in ("001_05.png", "011_01.png"):
        (data / "bona_fide" / name).unlink()
    (data / "morph" / "blend" / "001_009.png").unlink()
    rc, stdout, err = run_test_cli(runs["frll_model"], tmp_path / "out", "--data", str(data), "--strict")
    assert rc == 0, err
    assert "none of the 3 scored images was seen in training or dev (every scored image checked by content and" \
           " by person)" in stdout


def test_an_older_model_file_without_a_record_is_split_again_with_a_note(runs, tmp_path: Path) -> None:
    with safe_open(str(runs["flat_model"]), "pt") as handle:
        header = dict(handle.metadata())
    meta = json.loads(header["user"])  # what the example gave save_lora
    meta.pop("split")
    old = tmp_path / MODEL
    save_file(load_file(str(runs["flat_model"])), str(old), metadata={**header, "user": json.dumps(meta)})
    rc, stdout, err = run_test_cli(old, tmp_path / "out")
    assert rc == 0, err
    assert "this model file records no split (it was written before splits were recorded)" in stdout
    assert scored(tmp_path / "out") == scored(runs["flat_test"])  # nothing was added: the same split
    assert metrics(tmp_path / "out")["data"]["seen_in_training"] is None
    line = fails("test", "--model_path", str(old), "--output_dir", str(tmp_path / "o2"), "--strict")
    assert "--strict: this model file records no split" in line


def test_an_export_keeps_the_record(runs, tmp_path: Path) -> None:
    # An exported detector is tested like its model file: on the split training recorded.
    export = tmp_path / "export.safetensors"
    rc, _, err = cli("export", "--model_path", str(runs["flat_model"]), "--output", str(export))
    assert rc == 0, err
    rc, stdout, err = run_test_cli(export, tmp_path / "out")
    assert rc == 0, err
    assert "the test split is the one recorded in the model file: its 6 images found by content" in stdout
    assert scored(tmp_path / "out") == scored(runs["flat_test"])
