"""The processing made attacks share with bona fides: matching to a photo's statistics and the
shared augmentation, each against a plain second implementation (scipy's filters, boolean
gathers) where the module uses faster ones."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from madlab.attacks import processing as P
from madlab.attacks.synthesis import self_morph, synthesise
from madlab.data.shortcuts import laplacian, laplacian_variance
from scipy.ndimage import gaussian_filter, map_coordinates

from example.attacks.photos import face_points, make_photo

seeds = st.integers(0, 2**32 - 1)
use_landmarks = st.booleans()


def reference_match(image, reference, weight):
    """match_statistics written plainly: boolean gathers, numpy's mean and std, scipy's Gaussian."""
    def smooth(x):
        return gaussian_filter(x, (1.0, 1.0, 0.0), truncate=3.0)

    x, ref = image.astype(np.float32).copy(), reference.astype(np.float64)
    w = weight / weight.max()
    region = w >= 0.5
    interior = region[1:-1, 1:-1]
    target = laplacian(ref.mean(axis=2))[interior].var()
    ref_mean, ref_std = ref[region].mean(axis=0), ref[region].std(axis=0)
    for _ in range(3):
        inside = x[region].astype(np.float64)
        gain = ref_std / inside.std(axis=0)
        x = (x + w[..., None] * ((x - inside.mean(axis=0)) * gain + ref_mean - x)).astype(np.float32)
        detail = x - smooth(x)
        lx = laplacian(x.mean(axis=2).astype(np.float64))[interior]
        ly = laplacian((w * detail.mean(axis=2)).astype(np.float64))[interior]
        # var(lx + k ly) = target, the root nearest 0 (clipped to [-1, 4])
        a, b, c = ly.var(), 2 * np.cov(lx, ly, bias=True)[0, 1], lx.var() - target
        roots = np.roots([a, b, c])
        real = roots[np.isreal(roots)].real
        k = min(real, key=abs) if len(real) else -b / (2 * a)
        x = np.clip(x + np.float32(np.clip(k, -1, 4)) * w[..., None] * detail, 0, 1)
    return x


@settings(deadline=None, max_examples=30)
@given(seeds, st.floats(0.3, 5.0), st.booleans())
def test_blur_is_scipys_gaussian_truncated_at_three_sigma(seed, sigma, colour):
    image = np.random.default_rng(seed).random((33, 29, 3) if colour else (33, 29)).astype(np.float32)
    expected = gaussian_filter(image, (sigma, sigma, 0) if colour else sigma, truncate=3.0)
    np.testing.assert_allclose(P.blur(image, sigma), expected, atol=2e-6)


@settings(deadline=None, max_examples=30)
@given(seeds, use_landmarks, st.booleans())
def test_matching_equals_a_plain_implementation(seed, with_points, grey):
    photo = make_photo(seed % 1000, 48, 48, grey=grey)
    points = face_points(48, 48) if with_points else None
    attack = synthesise(photo, np.random.default_rng(seed), points, frequency_p=0.0)
    expected = reference_match(attack.image, photo, attack.weight)
    np.testing.assert_allclose(P.match_statistics(attack.image, photo, attack.weight), expected, atol=1e-4)


@settings(deadline=None, max_examples=30)
@given(seeds)
def test_region_moments_are_those_of_the_gathered_pixels(seed):
    rng = np.random.default_rng(seed)
    values, inside = rng.random((20, 24, 3)).astype(np.float32), rng.random((20, 24)) < 0.4
    inside[0, 0] = True
    mean, std = P._Region(inside).moments(values)
    np.testing.assert_allclose(mean, values[inside].astype(np.float64).mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(std, values[inside].astype(np.float64).std(axis=0), rtol=1e-6)
    a, b = values[..., 0], values[..., 1]
    expected = np.cov(a[inside].astype(np.float64), b[inside].astype(np.float64), bias=True)[0, 1]
    assert P._Region(inside).covariance(a, b) == pytest.approx(expected, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("step", ["match", "augment"])
def test_every_step_is_deterministic_under_a_seed(step):
    photo = make_photo(5)

    def run(seed):
        rng = np.random.default_rng(seed)
        if step == "match":
            return P.match_statistics(self_morph(photo, rng).image, photo)
        return P.matched_augment(photo, rng)

    outputs = [run(seed) for seed in (7, 7, 8)]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert not np.array_equal(outputs[0], outputs[2])


@settings(deadline=None, max_examples=25)
@given(seeds, st.booleans())
def test_matching_gives_the_attack_its_photos_sharpness_and_colour_statistics(seed, grey):
    photo = make_photo(seed % 1000, 48, 48, grey=grey)
    attack = synthesise(photo, np.random.default_rng(seed), frequency_p=0.0).image
    matched = P.match_statistics(attack, photo)
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
    photo = make_photo(seed % 1000, 48, 48, grey=grey)
    points = face_points(48, 48) if with_points else None
    attack = synthesise(photo, np.random.default_rng(seed), points, frequency_p=0.0)
    matched = P.match_statistics(attack.image, photo, attack.weight)
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
    photo, other = make_photo(3), make_photo(4)
    weight = np.zeros(photo.shape[:2], dtype=np.float32)
    weight[10:12, 10:12] = 1.0  # 4 interior pixels: too few to measure a sharpness on
    np.testing.assert_array_equal(P.match_statistics(other, photo, weight), other)


@pytest.mark.parametrize("weight", [np.ones((5, 5)), np.full((40, 36), np.nan), -np.ones((40, 36))])
def test_a_bad_weight_is_refused_with_its_shape(weight):
    with pytest.raises(ValueError, match="weight must be a finite non-negative 40 x 36 array"):
        P.match_statistics(make_photo(0), make_photo(1), weight)


def test_grey_sharpness_is_the_shortcut_statistic():
    photo = make_photo(2)
    assert P.grey_sharpness(photo) == pytest.approx(laplacian_variance(photo.mean(axis=2)))


@settings(deadline=None, max_examples=25)
@given(seeds)
def test_matched_augment_keeps_pixels_in_range_and_shape(seed):
    photo = make_photo(seed % 1000)
    out = P.matched_augment(photo, np.random.default_rng(seed))
    assert out.shape == photo.shape and out.min() >= 0 and out.max() <= 1


@settings(deadline=None, max_examples=25)
@given(seeds)
def test_resample_is_the_drawn_similarity_sampled_bilinearly(seed):
    photo = make_photo(seed % 1000, 40, 40)
    out = P.resample(photo, np.random.default_rng(seed))
    # The same draws, applied with scipy: the output pixel p comes from M^-1 (p - t) in the photo.
    rng = np.random.default_rng(seed)
    angle, scale, shift = np.deg2rad(rng.uniform(-3.0, 3.0)), rng.uniform(0.95, 1.05), rng.uniform(-1, 1, size=2)
    c = 19.5
    forward = scale * np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    yy, xx = np.mgrid[0:40, 0:40].astype(np.float64)
    dest = np.stack([xx.ravel() - c - shift[0], yy.ravel() - c - shift[1]])
    src_x, src_y = np.linalg.solve(forward, dest) + c
    expected = np.stack([map_coordinates(photo[..., k], [src_y, src_x], order=1, mode="reflect").reshape(40, 40)
                         for k in range(3)], axis=2)
    inner = (slice(3, -3), slice(3, -3))  # borders: OpenCV and scipy reflect about different edges
    np.testing.assert_allclose(out[inner], expected[inner], atol=0.03)  # OpenCV samples at 1/32 px
    assert out.shape == photo.shape and out.dtype == np.float32


def test_matched_augment_resamples_only_when_asked_and_keeps_the_stream_otherwise():
    photo = make_photo(7)
    plain = [P.matched_augment(photo, np.random.default_rng(k)) for k in range(20)]
    unasked = [P.matched_augment(photo, np.random.default_rng(k), 0.0) for k in range(20)]
    always = [P.matched_augment(photo, np.random.default_rng(k), 1.0) for k in range(20)]
    assert all(np.array_equal(a, b) for a, b in zip(plain, unasked))
    assert sum(not np.allclose(a, b, atol=1e-3) for a, b in zip(plain, always)) >= 18
