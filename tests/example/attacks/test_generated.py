"""Morphs generated from two bona fides of a split (attacks=generated): who is paired with whom, and
what a generated morph is, checked against the blend formula and the statistics matching."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from madlab.attacks import generated
from madlab.attacks.generated import SAME_PERSON_P, Pairing, generate_morph
from madlab.attacks.morphs import flow_align
from madlab.attacks.processing import match_statistics
from madlab.data.samples import DataError, Sample


def _rows(people: dict[str, int], morphs: int = 2) -> list[Sample]:
    rows = [Sample(f"bf/{person}_{shot}", 0, "bona_fide", "train", (person,))
            for person, shots in people.items() for shot in range(shots)]
    rows += [Sample(f"morph/{k}", 1, "blend", "train", ("a", "b")) for k in range(morphs)]
    return rows


def _photos(seed: int, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    a = 0.5 + 0.3 * np.sin(6 * xx)[..., None] * np.ones(3) + 0.05 * rng.standard_normal((size, size, 3))
    b = 0.5 + 0.3 * np.cos(5 * yy)[..., None] * np.ones(3) + 0.05 * rng.standard_normal((size, size, 3))
    return np.clip(a, 0, 1).astype(np.float32), np.clip(b, 0, 1).astype(np.float32)


def test_partners_are_other_bona_fides_of_another_person_or_another_shot_of_the_same():
    rows = _rows({"p1": 3, "p2": 1, "p3": 2})
    pairing = Pairing(rows)
    rng = np.random.default_rng(0)
    same_person = 0
    draws = 4000
    for _ in range(draws):
        partner, same = pairing.partner(0, rng)
        assert partner != 0 and rows[partner].label == 0
        assert (rows[partner].identity == ("p1",)) == same
        same_person += same
    # Binomial(4000, 0.25): sd 27; 5 sd either way.
    assert abs(same_person - SAME_PERSON_P * draws) < 5 * np.sqrt(draws * SAME_PERSON_P * (1 - SAME_PERSON_P))
    only_shot = rows.index(next(r for r in rows if r.identity == ("p2",)))
    assert not any(pairing.partner(only_shot, rng)[1] for _ in range(200)), "p2 has one photo: always another person"


@settings(deadline=None, max_examples=60)
@given(st.lists(st.sampled_from(["p1", "p2", "p3", "p4"]), min_size=2, max_size=30), st.integers(0, 2**32 - 1))
def test_a_partner_is_drawn_as_from_the_full_list_of_other_people(people, seed):
    """Drawing by group positions gives exactly what indexing the list of every other person's
    bona fide gives (the reference), for any order of identities and any morphs among them."""
    rows = [Sample(f"bf/{k}", 0, "bona_fide", "train", (person,)) for k, person in enumerate(people)]
    rows.insert(len(rows) // 2, Sample("morph/x", 1, "blend", "train", ("p1", "p2")))
    pairing = Pairing(rows)
    for own in set(people):
        others = [j for j, r in enumerate(rows) if r.label == 0 and r.identity != (own,)]
        assert [pairing._other(own, k) for k in range(len(others))] == others
    index = pairing.bona_fides[seed % len(pairing.bona_fides)]
    rng, reference = np.random.default_rng(seed), np.random.default_rng(seed)
    partner, same = pairing.partner(index, rng)
    own = rows[index].identity
    same_rows = [j for j, r in enumerate(rows) if r.label == 0 and r.identity == own and j != index]
    other_rows = [j for j, r in enumerate(rows) if r.label == 0 and r.identity != own]
    if same_rows and (not other_rows or reference.random() < SAME_PERSON_P):
        assert (partner, same) == (same_rows[int(reference.integers(len(same_rows)))], True)
    else:
        assert (partner, same) == (other_rows[int(reference.integers(len(other_rows)))], False)


def test_a_split_of_one_person_pairs_shots_and_one_without_identities_pairs_files():
    one_person = Pairing(_rows({"p1": 3}, morphs=0))
    assert all(one_person.partner(1, np.random.default_rng(k))[1] for k in range(50))
    anonymous = Pairing([Sample(f"x/{k}.png", 0, "bona_fide", "train", ()) for k in range(3)])
    assert not anonymous.identities_known
    assert {anonymous.partner(0, np.random.default_rng(k))[0] for k in range(50)} == {1, 2}


@pytest.mark.parametrize("people", [{"p1": 1}, {}])
def test_a_split_with_fewer_than_two_bona_fides_is_refused(people):
    with pytest.raises(DataError, match="morph two bona fides of a split, but it has"):
        Pairing(_rows(people))


def test_a_generated_blend_is_the_average_of_its_contributors_matched_to_the_first(monkeypatch):
    monkeypatch.setattr(generated, "ALPHA_RANGE", (0.5, 0.5))
    a, b = _photos(0)
    image, method = generate_morph(a, b, np.random.default_rng(1), methods=("blend",))
    expected = match_statistics(np.clip(0.5 * a + 0.5 * b, 0, 1), a)
    assert method == "blend" and image.dtype == np.float32
    np.testing.assert_allclose(image, expected, atol=1e-6)
    # What the matching promises: the first contributor's per-channel mean and spread.
    np.testing.assert_allclose(image.mean(axis=(0, 1)), a.mean(axis=(0, 1)), atol=0.01)
    np.testing.assert_allclose(image.std(axis=(0, 1)), a.std(axis=(0, 1)), atol=0.01)


def test_landmarks_shared_by_both_contributors_warp_nothing(monkeypatch):
    monkeypatch.setattr(generated, "ALPHA_RANGE", (0.5, 0.5))
    a, b = _photos(2)
    points = np.array([[16.0, 18.0], [32.0, 18.0], [24.0, 27.0], [18.0, 35.0], [30.0, 35.0]])
    for method in ("blend", "splice"):
        warped, _ = generate_morph(a, b, np.random.default_rng(3), points, points, methods=(method,))
        plain, _ = generate_morph(a, b, np.random.default_rng(3), methods=(method,))
        if method == "blend":  # the splice mask follows the landmarks, the plain one is centred
            np.testing.assert_allclose(warped, plain, atol=1e-5)
        assert np.abs(warped - a).mean() > 0.02, "a morph differs from its first contributor"


def test_generated_morphs_of_different_shapes_are_refused():
    a, b = _photos(0)
    with pytest.raises(ValueError, match="one shape"):
        generate_morph(a, b[:40], np.random.default_rng(0))


def _pattern(size: int, shift: float) -> np.ndarray:
    """A smooth grey texture of blobs, moved ``shift`` pixels to the right."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    xx = xx - shift
    return 0.5 + 0.2 * np.sin(xx / 3.1) * np.cos(yy / 4.3) + 0.15 * np.sin((xx + yy) / 5.7)


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_flow_align_meets_a_shifted_copy_at_the_weighted_midpoint(alpha: float) -> None:
    size, shift = 64, 3.0
    a, b = _pattern(size, 0.0), _pattern(size, shift)
    first, second = flow_align(a, b, alpha)
    inner = np.s_[12:-12, 12:-12]  # the flow is least certain near the border
    midpoint = _pattern(size, alpha * shift)  # the analytic image at the weighted position
    # Either contributor left in place is 0.028 (alpha 0.3) or 0.046 (0.5) from the midpoint on
    # average; aligned, both come within 0.002 of it. The bound is a third of the smaller gap.
    assert np.abs(a - midpoint)[inner].mean() > 0.02
    for moved in (first, second):
        assert np.abs(moved - midpoint)[inner].mean() < 0.01
    assert first.shape == a.shape and first.dtype == np.float64


def test_flow_align_of_two_equal_images_moves_nothing() -> None:
    a = _pattern(48, 0.0)
    first, second = flow_align(a, a.copy(), 0.5)
    inner = np.s_[8:-8, 8:-8]  # Farneback's border extrapolation leaves flows of a few hundredths of a pixel
    np.testing.assert_allclose(first[inner], a[inner], atol=1e-5)
    np.testing.assert_allclose(second[inner], a[inner], atol=1e-5)
    assert np.abs(first - a).mean() < 1e-3  # against 0.09 between copies 3 px apart


def test_flow_p_zero_leaves_every_morph_as_it_was_and_one_aligns_every_morph(monkeypatch) -> None:
    monkeypatch.setattr(generated, "ALPHA_RANGE", (0.5, 0.5))
    a = np.repeat(_pattern(48, 0.0)[..., None], 3, axis=2).astype(np.float32)
    b = np.repeat(_pattern(48, 2.5)[..., None], 3, axis=2).astype(np.float32)
    before, method = generate_morph(a, b, np.random.default_rng(5), methods=("blend",))
    same, same_method = generate_morph(a, b, np.random.default_rng(5), methods=("blend",), flow_p=0.0)
    np.testing.assert_array_equal(same, before)
    assert method == same_method == "blend"
    aligned, aligned_method = generate_morph(a, b, np.random.default_rng(5), methods=("blend",), flow_p=1.0)
    assert aligned_method == "flow_blend"
    # The average of the two contributors moved onto their midpoint, then matched to the first.
    first, second = flow_align(a, b, 0.5)
    expected = match_statistics(np.clip(0.5 * first + 0.5 * second, 0, 1).astype(np.float32), a)
    np.testing.assert_allclose(aligned, expected, atol=1e-5)
    assert np.abs(first - a).mean() > 0.02, "the flow moved the first contributor (1.25 px)"
