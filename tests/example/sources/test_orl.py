"""The embedded ORL default (madlab.sources.orl): aligned frames, landmark morphs, sharpness matching,
splits by person."""

from __future__ import annotations

import numpy as np
import pytest
from madlab.attacks.morphs import landmark_morph, warp_to
from madlab.data.samples import DataReport
from madlab.data.shortcuts import laplacian_variance, sample_greys, shortcut_scores
from madlab.evaluation.metrics import auc
from madlab.faces.cropping import find_faces
from madlab.faces.detection import template
from madlab.sources.orl import (
    FRAME,
    MATCH_SIZE,
    aligned_orl,
    as_seen,
    embedded_orl_samples,
    match_contributors,
    match_sharpness,
    orl_morph_pairs,
    split_people,
)
from skimage.transform import PiecewiseAffineTransform, warp

pytest.importorskip("cv2")


@pytest.fixture(scope="module")
def orl(tmp_path_factory):
    return aligned_orl(tmp_path_factory.mktemp("orl-cache"))


@pytest.fixture(scope="module")
def orl_sets(tmp_path_factory, orl):
    cache = tmp_path_factory.mktemp("orl-sets")
    aligned_orl(cache)
    return {match: embedded_orl_samples(42, ["blend", "splice"], 2, (0.6, 0.2), match, cache)
            for match in (True, False)}


def _points() -> np.ndarray:
    return np.array([[33.0, 40.0], [62.0, 41.0], [47.0, 56.0], [36.0, 71.0], [60.0, 70.0]])


def test_every_orl_photo_is_aligned_with_its_eyes_on_the_template(orl) -> None:
    frames, landmarks, people = orl
    assert frames.shape == (400, FRAME, FRAME) and frames.dtype == np.uint8
    assert sorted(set(people.tolist())) == list(range(1, 41))
    eyes = np.abs(landmarks[:, :2] - template(FRAME)[:2])
    # The fitted landmarks of all 400 photos: eyes within 4 px of the template at 96 px.
    assert eyes.max() < 4.0 and np.median(eyes) < 1.5


def test_warp_moves_landmarks_onto_the_target_and_matches_skimage() -> None:
    rng = np.random.default_rng(0)
    image = gaussian_blobs(rng)
    source = _points()
    target = source + rng.normal(0, 2.5, source.shape)
    ours = warp_to(image, source, target)
    # skimage's piecewise-affine transform on the same points (landmarks + frame border), as the reference.
    border = np.array([(0, 0), (47.5, 0), (95, 0), (95, 47.5), (95, 95), (47.5, 95), (0, 95), (0, 47.5)])
    reference_map = PiecewiseAffineTransform.from_estimate(np.vstack([target, border]), np.vstack([source, border]))
    assert reference_map
    reference = warp(image, reference_map, order=1, mode="edge")
    # (OpenCV interpolates at 1/32 pixel, so a few thousandths apart on this smooth image.)
    assert np.abs(ours - reference)[4:-4, 4:-4].max() < 5e-3
    np.testing.assert_allclose(warp_to(image, source, source), image, atol=1e-6)


def gaussian_blobs(rng: np.random.Generator) -> np.ndarray:
    """A smooth random 96 x 96 image (interpolation differences stay small on it)."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(rng.random((96, 96)), 3.0)


@pytest.mark.parametrize("method", ["blend", "splice"])
def test_morph_of_a_face_with_itself_is_that_face(orl, method: str) -> None:
    frames, landmarks, _ = orl
    a = frames[10] / 255.0
    same, shape = landmark_morph(method, a, landmarks[10], a, landmarks[10])
    np.testing.assert_allclose(same, a, atol=1e-5)
    np.testing.assert_allclose(shape, landmarks[10])


def test_morph_lands_on_the_average_shape_and_mixes_both_faces(orl) -> None:
    frames, landmarks, _ = orl
    a, b = frames[0] / 255.0, frames[55] / 255.0
    morph, shape = landmark_morph("blend", a, landmarks[0], b, landmarks[55])
    np.testing.assert_allclose(shape, (landmarks[0] + landmarks[55]) / 2)
    wa, wb = warp_to(a, landmarks[0], shape), warp_to(b, landmarks[55], shape)
    np.testing.assert_allclose(morph, (wa + wb) / 2, atol=1e-6)
    spliced, _ = landmark_morph("splice", a, landmarks[0], b, landmarks[55])
    # Outside the face the splice is the first contributor; at the face centre it is the blend.
    assert np.abs(spliced[2:8, 2:8] - wa[2:8, 2:8]).max() < 1e-3
    cy, cx = np.round(shape[2, ::-1]).astype(int)
    assert abs(spliced[cy, cx] - morph[cy, cx]) < 0.02
    with pytest.raises(ValueError, match="unknown morph method"):
        landmark_morph("warp", a, landmarks[0], b, landmarks[55])


def test_match_sharpness_reaches_the_target(orl) -> None:
    frames, landmarks, _ = orl
    a, b = frames[3] / 255.0, frames[200] / 255.0
    morph, _ = landmark_morph("blend", a, landmarks[3], b, landmarks[200])
    target = (laplacian_variance(as_seen(a)) + laplacian_variance(as_seen(b))) / 2
    before = laplacian_variance(as_seen(morph))
    assert before < 0.8 * target, "a blend is blurrier than its contributors"
    after = laplacian_variance(as_seen(match_sharpness(morph, target)))
    assert after == pytest.approx(target, rel=0.03)


def test_people_split_and_pairs_stay_inside_one_split() -> None:
    parts = split_people(5, (0.6, 0.2))
    assert [len(parts[k]) for k in ("train", "dev", "test")] == [24, 8, 8]
    assert sorted(p for members in parts.values() for p in members) == list(range(1, 41))
    pairs = orl_morph_pairs(parts["test"], 200, np.random.default_rng(0))
    assert len(pairs) == 200 and len({frozenset([(a, sa), (b, sb)]) for a, sa, b, sb in pairs}) == 200
    assert all(a != b and {a, b} <= set(parts["test"]) for a, _, b, _ in pairs)
    # 200 draws cycle through all 28 pairs of the 8 people, so every pair is used.
    assert len({frozenset([a, b]) for a, _, b, _ in pairs}) == 28


def test_embedded_orl_is_identity_disjoint_and_counted(orl_sets) -> None:
    samples = orl_sets[True]
    people = {split: {s.identity[0] for s in samples if s.split == split and s.label == 0}
              for split in ("train", "dev", "test")}
    assert [len(people[k]) for k in ("train", "dev", "test")] == [24, 8, 8]
    assert not (people["train"] & people["dev"]) and not (people["train"] & people["test"])
    for s in samples:
        if s.label == 1:
            assert len(s.identity) == 2 and s.identity[0] != s.identity[1]
            assert set(s.identity) <= people[s.split], "morph contributors come from the morph's own split"
    counts = {(s.split, s.method): 0 for s in samples}
    for s in samples:
        counts[(s.split, s.method)] += 1
    assert counts[("test", "bona_fide")] == 80 and counts[("test", "blend")] == 80 and counts[("test", "splice")] == 80
    assert samples[0].image.shape == (FRAME, FRAME, 3) and samples[0].image.dtype == np.float32


def test_matching_takes_blur_and_contrast_away_as_cues(orl_sets, tmp_path) -> None:
    """The point of matching: without it sharpness and contrast separate morphs; with it, about chance.

    Measured as the report measures them: on the 32 px crops face_crop=align cuts (faces detected
    again in every frame and morph), for the dev split (the test split is left alone).
    """

    def shortcut_auc(samples, name):
        dev = find_faces([s for s in samples if s.split == "dev"], 0.125, tmp_path, DataReport("dev"))
        scores = shortcut_scores(sample_greys(dev, MATCH_SIZE))[name]
        return auc(scores, np.array([s.label for s in dev]))

    assert shortcut_auc(orl_sets[False], "sharpness") > 0.8
    assert shortcut_auc(orl_sets[False], "contrast") > 0.6
    assert abs(shortcut_auc(orl_sets[True], "sharpness") - 0.5) < 0.1
    assert abs(shortcut_auc(orl_sets[True], "contrast") - 0.5) < 0.1


def test_match_contributors_reaches_both_targets(orl) -> None:
    frames, landmarks, _ = orl
    a, b = frames[40] / 255.0, frames[300] / 255.0
    morph, _ = landmark_morph("blend", a, landmarks[40], b, landmarks[300])
    matched = as_seen(match_contributors(morph, a, b))
    ga, gb = as_seen(a), as_seen(b)
    assert matched.std() == pytest.approx((ga.std() + gb.std()) / 2, rel=0.02)
    assert laplacian_variance(matched) == pytest.approx((laplacian_variance(ga) + laplacian_variance(gb)) / 2,
                                                        rel=0.05)


def test_embedded_orl_is_deterministic_under_seed(orl_sets, tmp_path_factory) -> None:
    cache = tmp_path_factory.mktemp("again")
    again = embedded_orl_samples(42, ["blend", "splice"], 2, (0.6, 0.2), True, cache)
    first = orl_sets[True]
    assert [s.path for s in again] == [s.path for s in first]
    np.testing.assert_array_equal(again[-1].image, first[-1].image)
    other = embedded_orl_samples(43, ["blend"], 1, (0.6, 0.2), True, cache)
    assert {s.path for s in other if s.label == 0} != {s.path for s in first if s.label == 0}


def test_the_default_run_on_orl_aligns_counts_people_and_caches(tmp_path, monkeypatch) -> None:
    """The no-data run end to end on ORL (tiny settings): aligned crops, people per split in the report,
    face_crop recorded in the model file and enforced by test, and a second test run that detects and crops nothing."""
    import json

    import morph_detection

    from lora_vit import read_lora_metadata

    tiny = ["backbone=mae-vit-tiny",
            "pretrain_epochs=1", "num_epochs=1", "morphs_per_face=1", "batch_size=64", "use_early_stopping=false",
            "num_threads=1"]
    args = [a for item in tiny for a in ("--override", item)]
    cache, out = tmp_path / "cache", tmp_path / "out"
    assert morph_detection.main(["train", "--output_dir", str(out), "--cache_dir", str(cache), "--no_progress",
                                 *args]) == 0
    model = out / "morph_detector.safetensors"
    config = read_lora_metadata(model)["config"]
    assert config["face_crop"] == "align" and config["face_margin"] == 0.125 and config["embedded_data"] == "orl"
    assert list((cache / "faces" / "crops").rglob("*.npy")), "crops are cached as uint8 arrays"

    test = ["test", "--model_path", str(model), "--output_dir", str(out), "--no_progress", "--cache_dir", str(cache)]
    assert morph_detection.main(test) == 0  # crops the test split, which training never read

    def refuse(*_args, **_kwargs):
        raise AssertionError("a second run must find every face and crop in the cache")

    monkeypatch.setattr("madlab.faces.cropping.detect_faces", refuse)
    monkeypatch.setattr("madlab.faces.detection.crop_with", refuse)
    monkeypatch.setattr("madlab.sources.orl.align", refuse)
    assert morph_detection.main(test) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    notes = " ".join(metrics["data"]["notes"])
    assert "train 24 people, dev 8 people, test 8 people" in notes
    assert "1200" not in notes and "800 images aligned" in notes and "every image had a face" in notes
    assert metrics["data"]["counts"]["test"] == {"bona_fide": 80, "morph/blend": 40, "morph/splice": 40}
    # The file says align; test may not crop another way.
    assert morph_detection.main(["test", "--model_path", str(model), "--output_dir", str(tmp_path / "t2"),
                                 "--override", "face_crop=none"]) == 2
