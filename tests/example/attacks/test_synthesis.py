"""Synthetic attacks of the morph-detection example: the invariants of every generator and of the matching."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from madlab.attacks import synthesis as S
from madlab.data.shortcuts import laplacian_variance
from scipy.ndimage import map_coordinates


def _photo(seed: int, height: int = 40, width: int = 36, grey: bool = False) -> np.ndarray:
    """A smooth random image with edges (a blurred random field plus a bright disc)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((height // 4 + 1, width // 4 + 1, 1 if grey else 3))
    img = np.kron(coarse, np.ones((4, 4, 1)))[:height, :width]
    yy, xx = np.mgrid[0:height, 0:width]
    disc = ((yy - height / 2) ** 2 + (xx - width / 2) ** 2 < (min(height, width) / 4) ** 2)[..., None]
    img = (0.7 * img + 0.3 * disc).astype(np.float32)  # the module computes in float32
    return np.repeat(img, 3, axis=2) if grey else img


def _landmarks(height: int, width: int, tilt: float = 0.0) -> np.ndarray:
    """Five plausible points (eyes, nose, mouth corners) of a face centred in the image, rotated by ``tilt``."""
    base = np.array([[-0.18, -0.12], [0.18, -0.12], [0.0, 0.05], [-0.13, 0.2], [0.13, 0.2]])
    c, s = np.cos(tilt), np.sin(tilt)
    rotated = base @ np.array([[c, s], [-s, c]])
    return np.array([width / 2, height / 2]) + rotated * np.array([width, height])


seeds = st.integers(0, 2**32 - 1)
use_landmarks = st.booleans()


@settings(deadline=None, max_examples=40)
@given(seeds, use_landmarks, st.sampled_from([S.self_blend, S.self_morph, S.self_warp]))
def test_attack_differs_from_its_photo_only_inside_its_mask(seed, with_points, make):
    photo = _photo(seed % 1000)
    points = _landmarks(*photo.shape[:2]) if with_points else None
    attack = make(photo, np.random.default_rng(seed), points)
    outside = attack.weight == 0
    assert (~outside).any()
    if attack.region == "face":  # a head mask may fill a small image, an image one always does
        assert outside.any()
    np.testing.assert_array_equal(attack.image[outside], photo[outside])
    assert attack.weight.min() >= 0 and attack.weight.max() <= 1
    # The change per pixel is bounded by its weight: |out - photo| = w |copy - photo| <= w.
    assert np.all(np.abs(attack.image - photo) <= attack.weight[..., None] + 1e-12)
    assert attack.image.min() >= 0 and attack.image.max() <= 1


@settings(deadline=None, max_examples=40)
@given(seeds)
def test_frequency_artifact_stays_inside_the_mask(seed):
    photo = _photo(seed % 1000)
    rng = np.random.default_rng(seed)
    weight = S.face_mask(*photo.shape[:2], rng)
    out = S.frequency_artifact(photo, weight, rng)
    np.testing.assert_array_equal(out[weight == 0], photo[weight == 0])
    assert not np.array_equal(out, photo)


@settings(deadline=None, max_examples=40)
@given(seeds, use_landmarks)
def test_self_morph_is_the_beta_blend_with_a_zoomed_copy(seed, with_points):
    photo = _photo(seed % 1000)
    points = _landmarks(*photo.shape[:2]) if with_points else None
    attack = S.self_morph(photo, np.random.default_rng(seed), points)
    assert S.BETA_RANGE[0] <= attack.beta <= S.BETA_RANGE[1]
    assert S.ZOOM_RANGE[0] <= attack.zoom <= S.ZOOM_RANGE[1]
    np.testing.assert_allclose(attack.weight.max(), attack.beta)  # the mask peaks at 1
    # An independent zoom (scipy, bilinear): zooming in about a point inside the image samples
    # only inside it, so no border rule matters.
    yy, xx = np.mgrid[0:photo.shape[0], 0:photo.shape[1]].astype(np.float64)
    cy, cx = attack.centre
    src = [cy + (yy - cy) / attack.zoom, cx + (xx - cx) / attack.zoom]
    zoomed = np.stack([map_coordinates(photo[..., c], src, order=1) for c in range(3)], axis=2)
    expected = photo + attack.weight[..., None] * (zoomed - photo)
    np.testing.assert_allclose(attack.image, expected, atol=1e-5)
    if points is not None:  # zoomed about the nose tip
        np.testing.assert_allclose(attack.centre, points[2, ::-1])


@settings(deadline=None, max_examples=25)
@given(seeds)
def test_self_warp_blends_two_copies_warped_apart_and_is_the_photo_when_nothing_moves(seed):
    photo = _photo(seed % 1000, 48, 48)
    points = _landmarks(48, 48)
    attack = S.self_warp(photo, np.random.default_rng(seed), points)
    assert attack.method == "self_warp" and S.WARP_BETA_RANGE[0] <= attack.beta <= S.WARP_BETA_RANGE[1]
    assert np.abs(attack.image - photo).max() > 0.01, "moved landmarks change the face"
    still = S.WARP_RANGE
    try:
        S.WARP_RANGE = (0.0, 0.0)  # no landmark moves: both warps are the identity
        unmoved = S.self_warp(photo, np.random.default_rng(seed), points)
    finally:
        S.WARP_RANGE = still
    np.testing.assert_allclose(unmoved.image, photo, atol=1e-5)
    # Without landmarks there is nothing to warp by: a self-morph (a zoomed copy) instead.
    assert S.self_warp(photo, np.random.default_rng(seed)).method == "self_morph"


def test_self_morph_regions_grow_from_the_inner_face_to_the_whole_image():
    height, width = 64, 64
    points = _landmarks(height, width)
    masks = {region: S.face_mask(height, width, np.random.default_rng(3), points, region)
             for region in S.MORPH_REGIONS}
    face, head = masks["face"] > 0.5, masks["head"] > 0.5
    assert (face & ~head).sum() == 0 and head.sum() > 1.8 * face.sum()
    np.testing.assert_array_equal(masks["image"], 1.0)
    # The head region reaches the outline beside the eyes (1.3 eye gaps out from the eye
    # middle), which the inner face does not.
    eye_mid = points[:2].mean(axis=0)
    beside = np.round(eye_mid + np.array([-1.3 * (points[1, 0] - points[0, 0]), 0.0])).astype(int)
    assert masks["head"][beside[1], beside[0]] > 0.9 and masks["face"][beside[1], beside[0]] == 0
    assert masks["head"].min() < 0.01  # not the whole image
    drawn = [S.self_morph(_photo(1, 24, 24), np.random.default_rng(k)).region for k in range(300)]
    assert all(70 <= drawn.count(region) <= 130 for region in S.MORPH_REGIONS)  # 100 +- 4 sigma each
    with pytest.raises(ValueError, match=r"region must be one of .*got 'neck'"):
        S.face_mask(height, width, np.random.default_rng(0), points, "neck")


@settings(deadline=None, max_examples=30)
@given(seeds)
def test_self_blend_ratio_is_one_of_the_published_set(seed):
    attack = S.self_blend(_photo(3), np.random.default_rng(seed))
    assert attack.beta in S.BLEND_RATIOS
    np.testing.assert_allclose(attack.weight.max(), attack.beta)


@pytest.mark.parametrize("step", ["synthesise", "match", "augment"])
def test_every_step_is_deterministic_under_a_seed(step):
    photo = _photo(5)

    def run(seed):
        rng = np.random.default_rng(seed)
        if step == "synthesise":
            return S.synthesise(photo, rng, frequency_p=0.5).image
        if step == "match":
            return S.match_statistics(S.self_morph(photo, rng).image, photo)
        return S.matched_augment(photo, rng)

    outputs = [run(seed) for seed in (7, 7, 8)]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert not np.array_equal(outputs[0], outputs[2])


def test_synthesise_draws_both_methods_and_frequency_artifacts_at_their_rates():
    rng = np.random.default_rng(0)
    photo = _photo(1, 24, 24)
    methods = [S.synthesise(photo, rng).method for _ in range(400)]
    blends = sum(m.startswith("self_blend") for m in methods)
    frequency = sum(m.endswith("+frequency") for m in methods)
    assert 160 <= blends <= 240  # p = 0.5: 200 +- 4 sigma
    assert 16 <= frequency <= 68  # p = 0.1: 40 +- 4 sigma


def test_mask_follows_the_landmarks():
    height, width = 64, 64
    rng = np.random.default_rng(0)
    points = _landmarks(height, width) + np.array([10.0, 0.0])  # the face moved 10 px right
    mask = S.face_mask(height, width, rng, points)
    nose_x, nose_y = points[2].round().astype(int)
    assert mask[nose_y, nose_x] > 0.9
    assert mask[:, :8].max() == 0  # the left edge is far from the moved face
    tilted = S.face_mask(height, width, np.random.default_rng(0), _landmarks(height, width, tilt=0.5))
    upright = S.face_mask(height, width, np.random.default_rng(0), _landmarks(height, width))
    assert not np.allclose(tilted, upright)
    # Without landmarks: a centred ellipse, symmetric left to right up to the jitter of its blur.
    centred = S.face_mask(height, width, np.random.default_rng(1))
    assert centred[int(0.55 * height), width // 2] > 0.99 and centred[0, 0] == 0


@pytest.mark.parametrize("bad", [np.zeros((4, 2)), np.full((5, 2), np.nan), np.zeros((5, 3))])
def test_bad_landmarks_are_refused_with_their_shape(bad):
    with pytest.raises(ValueError, match="5 x 2"):
        S.self_morph(_photo(0), np.random.default_rng(0), bad)


def test_bad_images_are_refused_with_their_shape():
    with pytest.raises(ValueError, match=r"H x W x 3.*\(10, 10\)"):
        S.synthesise(np.zeros((10, 10)), np.random.default_rng(0))


@settings(deadline=None, max_examples=25)
@given(seeds, st.booleans())
def test_matching_gives_the_attack_its_photos_sharpness_and_colour_statistics(seed, grey):
    photo = _photo(seed % 1000, 48, 48, grey=grey)
    attack = S.synthesise(photo, np.random.default_rng(seed), frequency_p=0.0).image
    matched = S.match_statistics(attack, photo)
    target = laplacian_variance(photo.mean(axis=2))
    assert laplacian_variance(matched.mean(axis=2)) == pytest.approx(target, rel=0.1)
    np.testing.assert_allclose(matched.mean(axis=(0, 1)), photo.mean(axis=(0, 1)), atol=0.01)
    np.testing.assert_allclose(matched.std(axis=(0, 1)), photo.std(axis=(0, 1)), rtol=0.1, atol=0.005)
    if grey:  # a grey face stays grey: colour would be a cue no real morph of it has
        assert np.ptp(matched, axis=2).max() < 1e-6


@settings(deadline=None, max_examples=25)
@given(seeds, use_landmarks, st.booleans())
def test_matching_inside_the_mask_gives_the_face_its_photos_statistics_and_leaves_the_rest(seed, with_points,
                                                                                           grey):
    photo = _photo(seed % 1000, 48, 48, grey=grey)
    points = _landmarks(48, 48) if with_points else None
    attack = S.synthesise(photo, np.random.default_rng(seed), points, frequency_p=0.0)
    matched = S.match_statistics(attack.image, photo, attack.weight)
    outside = attack.weight == 0
    np.testing.assert_array_equal(matched[outside], photo[outside])
    assert matched.dtype == np.float32 and matched.min() >= 0 and matched.max() <= 1
    region = attack.weight >= 0.5 * attack.weight.max()
    interior = region[1:-1, 1:-1]

    def face_sharpness(image: np.ndarray) -> float:
        g = image.mean(axis=2).astype(np.float64)
        lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * g[1:-1, 1:-1]
        return float(lap[interior].var())

    assert face_sharpness(matched) == pytest.approx(face_sharpness(photo), rel=0.1)
    np.testing.assert_allclose(matched[region].mean(axis=0), photo[region].mean(axis=0), atol=0.01)
    np.testing.assert_allclose(matched[region].std(axis=0), photo[region].std(axis=0), rtol=0.1, atol=0.005)
    if grey:
        assert np.ptp(matched, axis=2).max() < 1e-6


def test_matching_leaves_an_image_whose_mask_region_is_too_small_unchanged():
    photo, other = _photo(3), _photo(4)
    weight = np.zeros(photo.shape[:2], dtype=np.float32)
    weight[10:12, 10:12] = 1.0  # 4 interior pixels: too few to measure a sharpness on
    np.testing.assert_array_equal(S.match_statistics(other, photo, weight), other)


@pytest.mark.parametrize("weight", [np.ones((5, 5)), np.full((40, 36), np.nan), -np.ones((40, 36))])
def test_a_bad_weight_is_refused_with_its_shape(weight):
    with pytest.raises(ValueError, match="weight must be a finite non-negative 40 x 36 array"):
        S.match_statistics(_photo(0), _photo(1), weight)


def test_grey_sharpness_is_the_shortcut_statistic():
    photo = _photo(2)
    assert S.grey_sharpness(photo) == pytest.approx(laplacian_variance(photo.mean(axis=2)))


@settings(deadline=None, max_examples=25)
@given(seeds)
def test_matched_augment_keeps_pixels_in_range_and_shape(seed):
    photo = _photo(seed % 1000)
    out = S.matched_augment(photo, np.random.default_rng(seed))
    assert out.shape == photo.shape and out.min() >= 0 and out.max() <= 1
