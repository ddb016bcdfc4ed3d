"""Synthetic attacks of the morph-detection example: the invariants of every generator."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from madlab.attacks import synthesis as S
from scipy.ndimage import map_coordinates

from example.attacks.photos import face_points, make_photo

seeds = st.integers(0, 2**32 - 1)
use_landmarks = st.booleans()


@settings(deadline=None, max_examples=40)
@given(seeds, use_landmarks, st.sampled_from([S.self_blend, S.self_morph, S.self_warp, S.self_mirror, S.self_splice,
                                          S.self_texture]))
def test_attack_differs_from_its_photo_only_inside_its_mask(seed, with_points, make):
    photo = make_photo(seed % 1000)
    points = face_points(*photo.shape[:2]) if with_points else None
    attack = make(photo, np.random.default_rng(seed), points)
    outside = attack.weight == 0
    assert (~outside).any()
    if attack.region in ("face", "parts"):  # a head mask may fill a small image, an image one always does
        assert outside.any()
    np.testing.assert_array_equal(attack.image[outside], photo[outside])
    assert attack.weight.min() >= 0 and attack.weight.max() <= 1
    # The change per pixel is bounded by its weight: |out - photo| = w |copy - photo| <= w.
    assert np.all(np.abs(attack.image - photo) <= attack.weight[..., None] + 1e-12)
    assert attack.image.min() >= 0 and attack.image.max() <= 1


@settings(deadline=None, max_examples=40)
@given(seeds)
def test_frequency_artifact_stays_inside_the_mask(seed):
    photo = make_photo(seed % 1000)
    rng = np.random.default_rng(seed)
    weight = S.face_mask(*photo.shape[:2], rng)
    out = S.frequency_artifact(photo, weight, rng)
    np.testing.assert_array_equal(out[weight == 0], photo[weight == 0])
    assert not np.array_equal(out, photo)


@settings(deadline=None, max_examples=40)
@given(seeds, use_landmarks)
def test_self_morph_is_the_beta_blend_with_a_zoomed_copy(seed, with_points):
    photo = make_photo(seed % 1000)
    points = face_points(*photo.shape[:2]) if with_points else None
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
    photo = make_photo(seed % 1000, 48, 48)
    points = face_points(48, 48)
    attack = S.self_warp(photo, np.random.default_rng(seed), points)
    assert attack.method == "self_warp" and S.TWO_SOURCE_SHARE_RANGE[0] <= attack.beta <= S.TWO_SOURCE_SHARE_RANGE[1]
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


@settings(deadline=None, max_examples=20)
@given(seeds, use_landmarks)
def test_self_mirror_leaves_a_symmetric_face_as_it_is_and_averages_an_asymmetric_one(seed, with_points):
    photo = make_photo(seed % 1000, 48, 48)
    # Points symmetric about the image's middle column, (W - 1) / 2, the axis of the mirror.
    points = face_points(48, 48) - np.array([0.5, 0.0]) if with_points else None
    symmetric = ((photo + photo[:, ::-1]) / 2).astype(np.float32)
    same = S.self_mirror(symmetric, np.random.default_rng(seed), points)
    assert same.method == "self_mirror" and S.TWO_SOURCE_SHARE_RANGE[0] <= same.beta <= S.TWO_SOURCE_SHARE_RANGE[1]
    # The mirror of a symmetric photo is the photo: no warp, no flow (bar Farneback's
    # border extrapolation, a few hundredths of a pixel), nothing to average.
    inner = np.s_[8:-8, 8:-8]
    np.testing.assert_allclose(same.image[inner], symmetric[inner], atol=1e-4)
    assert np.abs(same.image - symmetric).mean() < 1e-3
    changed = S.self_mirror(photo, np.random.default_rng(seed), points)
    # An asymmetric photo is pulled towards its mirror image inside the mask: closer to it than
    # the photo was, wherever the mask is whole and the two differ.
    mirror = photo[:, ::-1]
    inside = (changed.weight > 0.99) & (np.abs(photo - mirror).mean(axis=2) > 0.1)
    assert inside.any()
    before = np.abs(photo - mirror).mean(axis=2)[inside].mean()
    after = np.abs(changed.image - mirror).mean(axis=2)[inside].mean()
    assert after < 0.8 * before, (before, after)


def test_self_morph_regions_grow_from_the_inner_face_to_the_whole_image():
    height, width = 64, 64
    points = face_points(height, width)
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
    drawn = [S.self_morph(make_photo(1, 24, 24), np.random.default_rng(k)).region for k in range(300)]
    assert all(70 <= drawn.count(region) <= 130 for region in S.MORPH_REGIONS)  # 100 +- 4 sigma each
    with pytest.raises(ValueError, match=r"region must be one of .*got 'neck'"):
        S.face_mask(height, width, np.random.default_rng(0), points, "neck")


@settings(deadline=None, max_examples=30)
@given(seeds)
def test_self_blend_ratio_is_one_of_the_published_set(seed):
    attack = S.self_blend(make_photo(3), np.random.default_rng(seed))
    assert attack.beta in S.BLEND_RATIOS
    np.testing.assert_allclose(attack.weight.max(), attack.beta)


@settings(deadline=None, max_examples=20)
@given(seeds, use_landmarks)
def test_self_texture_averages_the_fine_detail_with_unrelated_detail_and_keeps_the_shading(seed, with_points):
    rng = np.random.default_rng(seed)
    height = width = 64
    yy, xx = np.mgrid[0:height, 0:width] / 63.0
    shading = np.stack([0.3 + 0.4 * yy, 0.3 + 0.3 * xx, 0.5 + 0.2 * yy * xx], axis=2)
    # White noise is the one texture with no correlation between pixels: any detail moved by 3
    # or more pixels is independent of the detail in place.
    photo = np.clip(shading + 0.08 * rng.standard_normal((height, width, 3)), 0, 1).astype(np.float32)
    points = face_points(height, width) if with_points else None
    attack = S.self_texture(photo, np.random.default_rng(seed), points)
    assert attack.method == "self_texture" and S.TWO_SOURCE_SHARE_RANGE[0] <= attack.beta <= S.TWO_SOURCE_SHARE_RANGE[1]
    whole = attack.weight > 0.99
    assert whole.sum() > 100

    def fine(x):  # the detail at the finest scale: the image minus its 3 x 3 mean
        padded = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
        mean = sum(padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)) / 9
        return x - mean

    # Two independent textures mixed (1 - beta) : beta keep (1 - beta)^2 + beta^2 of the energy,
    # 0.5-0.58; what the detail band leaves of the noise above the blur's width is kept as is.
    kept = (fine(attack.image)[whole] ** 2).mean() / (fine(photo)[whole] ** 2).mean()
    assert 0.4 < kept < 0.75, kept  # 0.49-0.60 over 300 seeds; 1 if nothing were exchanged
    # The shading is the photo's: a 9 x 9 mean moves by a fraction of what single pixels move.
    def coarse(x):
        padded = np.pad(x, ((4, 4), (4, 4), (0, 0)), mode="edge")
        return sum(padded[dy:dy + height, dx:dx + width] for dy in range(9) for dx in range(9)) / 81

    inner = np.s_[8:-8, 8:-8]
    pixel_change = np.abs(attack.image - photo)[inner].mean()
    assert pixel_change > 0.01
    assert np.abs(coarse(attack.image) - coarse(photo))[inner].mean() < 0.25 * pixel_change
    # A photo without texture has nothing to exchange: it comes back as it was.
    flat = np.full((height, width, 3), 0.4, np.float32)
    np.testing.assert_allclose(S.self_texture(flat, np.random.default_rng(seed), points).image, flat, atol=1e-6)


def test_synthesis_is_deterministic_under_a_seed():
    photo = make_photo(5)

    def run(seed):
        return S.synthesise(photo, np.random.default_rng(seed), frequency_p=0.5).image

    outputs = [run(seed) for seed in (7, 7, 8)]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert not np.array_equal(outputs[0], outputs[2])


def test_synthesise_draws_both_methods_and_frequency_artifacts_at_their_rates():
    rng = np.random.default_rng(0)
    photo = make_photo(1, 24, 24)
    even = S.parse_mix(["self_blend", "self_morph"])
    methods = [S.synthesise(photo, rng, mix=even).method for _ in range(400)]
    blends = sum(m.startswith("self_blend") for m in methods)
    frequency = sum(m.endswith("+frequency") for m in methods)
    assert 160 <= blends <= 240  # p = 0.5: 200 +- 4 sigma
    assert 16 <= frequency <= 68  # p = 0.1: 40 +- 4 sigma


def test_mask_follows_theface_points():
    height, width = 64, 64
    rng = np.random.default_rng(0)
    points = face_points(height, width) + np.array([10.0, 0.0])  # the face moved 10 px right
    mask = S.face_mask(height, width, rng, points)
    nose_x, nose_y = points[2].round().astype(int)
    assert mask[nose_y, nose_x] > 0.9
    assert mask[:, :8].max() == 0  # the left edge is far from the moved face
    tilted = S.face_mask(height, width, np.random.default_rng(0), face_points(height, width, tilt=0.5))
    upright = S.face_mask(height, width, np.random.default_rng(0), face_points(height, width))
    assert not np.allclose(tilted, upright)
    # Without landmarks: a centred ellipse, symmetric left to right up to the jitter of its blur.
    centred = S.face_mask(height, width, np.random.default_rng(1))
    assert centred[int(0.55 * height), width // 2] > 0.99 and centred[0, 0] == 0


@pytest.mark.parametrize("bad", [np.zeros((4, 2)), np.full((5, 2), np.nan), np.zeros((5, 3))])
def test_bad_landmarks_are_refused_with_their_shape(bad):
    with pytest.raises(ValueError, match="5 x 2"):
        S.self_morph(make_photo(0), np.random.default_rng(0), bad)


def test_bad_images_are_refused_with_their_shape():
    with pytest.raises(ValueError, match=r"H x W x 3.*\(10, 10\)"):
        S.synthesise(np.zeros((10, 10)), np.random.default_rng(0))


def _part_centres(points: np.ndarray) -> dict[str, np.ndarray]:
    """A point, (x, y), inside each face part and outside the others: an eye, the nose tip, a mouth corner."""
    return {"eyes": points[0], "nose": points[2], "mouth": points[3]}


@settings(deadline=None, max_examples=40)
@given(seeds, st.floats(-8.0, 8.0))
def test_parts_mask_covers_the_chosen_parts_where_the_landmarks_put_them(seed, move):
    height = width = 96
    points = face_points(64, 64) + np.array([16.0 + move, 16.0])  # a 64 px face in a 96 px crop
    mask = S.parts_mask(height, width, np.random.default_rng(seed), points)
    assert mask.max() == pytest.approx(1.0) and mask.min() >= 0
    covered = [part for part, (x, y) in _part_centres(points).items() if mask[round(y), round(x)] > 0.5]
    assert 1 <= len(covered) <= 3
    # Far from every part (the crop's corners and edges) nothing is blended.
    assert mask[:4].max() == 0 and mask[-4:].max() == 0 and mask[:, :4].max() == 0 and mask[:, -4:].max() == 0


def test_parts_mask_draws_one_to_three_parts_and_seams_of_several_widths():
    points = face_points(64, 64)
    counts, transitions = [], []
    for seed in range(200):
        mask = S.parts_mask(64, 64, np.random.default_rng(seed), points)
        counts.append(sum(mask[round(y), round(x)] > 0.5 for x, y in _part_centres(points).values()))
        transitions.append(float(((mask > 0.05) & (mask < 0.95)).mean() / max((mask >= 0.5).mean(), 1e-9)))
    # Each count is drawn with p = 1/3: 66.7 +- 4 sigma (sigma 6.7) of 200.
    assert all(40 <= counts.count(k) <= 94 for k in (1, 2, 3)), counts
    # Seams from an almost hard cut to a wide fade: the feathered band's size relative to the
    # mask spans more than a factor of 5 between the narrowest and widest tenth of draws.
    low, high = np.quantile(transitions, [0.1, 0.9])
    assert high > 5 * low, (low, high)


@settings(deadline=None, max_examples=30)
@given(seeds, use_landmarks)
def test_self_splice_pastes_a_moved_copy_with_its_share_through_its_mask(seed, with_points):
    photo = make_photo(seed % 1000, 48, 48)
    points = face_points(48, 48) if with_points else None
    attack = S.self_splice(photo, np.random.default_rng(seed), points)
    assert attack.method == "self_splice" and attack.region in ("parts", "face")
    assert S.SPLICE_BETA_RANGE[0] <= attack.beta <= S.SPLICE_BETA_RANGE[1]
    np.testing.assert_allclose(attack.weight.max(), attack.beta, rtol=1e-6)
    inside = attack.weight > 0.25
    assert np.abs(attack.image - photo)[inside].max() > 1e-3  # the pasted copy differs from the photo


def test_self_splice_draws_both_mask_kinds_at_even_odds():
    photo, points = make_photo(2, 32, 32), face_points(32, 32)
    regions = [S.self_splice(photo, np.random.default_rng(k), points).region for k in range(300)]
    assert 120 <= regions.count("parts") <= 180  # p = 0.5: 150 +- 3.5 sigma
