"""madlab.data.splits: a pure plan (samples never changed), one stratified split by image, the dev carve included."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from madlab.data.folders import apply_identity_pattern, assign_splits
from madlab.data.samples import DataReport, Sample
from madlab.data.splits import CARVE_DEV, plan_splits, stratified


def expected_counts(n: int, shares: dict[str, float]) -> dict[str, int]:
    """The rule written out: each split but the last takes max(1, round(share * n)) of what is left, in order."""
    counts, left = {}, n
    names = list(shares)
    for name in names[:-1]:
        take = min(left, max(1, round(shares[name] * n)))
        counts[name], left = take, left - take
    counts[names[-1]] = left
    return counts


@given(st.lists(st.sampled_from(["bf", "m/blend", "m/splice"]), min_size=1, max_size=60), st.integers(0, 2**31))
def test_stratified_gives_every_group_its_share(groups: list[str], seed: int) -> None:
    shares = {"train": 0.6, "dev": 0.2, "test": 0.2}
    split = stratified(groups, shares, np.random.default_rng(seed))
    assert split == stratified(groups, shares, np.random.default_rng(seed)), "deterministic under the seed"
    for key, n in Counter(groups).items():
        got = Counter(s for g, s in zip(groups, split) if g == key)
        assert {k: got.get(k, 0) for k in shares} == expected_counts(n, shares), key


def samples_without_identity(with_split: bool) -> list[Sample]:
    out = []
    for split in ("train", "test") if with_split else ("",):
        for i in range(12):
            out.append(Sample(f"{split}/bf{i}.png", 0, "bona_fide", split))
            out.append(Sample(f"{split}/m{i}.png", 1, "blend" if i % 3 else "splice", split))
    return out


def test_plan_changes_no_sample_and_apply_makes_new_ones() -> None:
    for with_split in (False, True):
        samples = samples_without_identity(with_split)
        before = copy.deepcopy(samples)
        plan = plan_splits(samples, (0.6, 0.2), seed=3)
        assert samples == before
        placed = plan.apply(samples)
        assert samples == before and all(a is not b for a, b in zip(placed, samples))
        assert [s.path for s in placed] == [s.path for s in samples]


def test_dev_carve_without_identities_is_stratified_like_every_other_split() -> None:
    samples = samples_without_identity(with_split=True)
    report = DataReport("t")
    placed = assign_splits(samples, (0.6, 0.2), 0, report)
    train_groups = Counter((s.label, s.method) for s in samples if s.split == "train")
    for key, n in train_groups.items():
        dev = sum(1 for s in placed if s.split == "dev" and (s.label, s.method) == key)
        assert dev == expected_counts(n, CARVE_DEV)["dev"], key
    assert {s.path for s in placed if s.split == "test"} == {s.path for s in samples if s.split == "test"}
    assert any("stratified by class and method" in n and "became dev" in n for n in report.notes)


def test_identity_pattern_returns_new_samples() -> None:
    samples = [Sample("x/001_03.jpg", 0, "bona_fide"), Sample("x/001_002.jpg", 1, "blend")]
    before = copy.deepcopy(samples)
    named = apply_identity_pattern(samples, r"^(?P<a>\d{3})_(?:\d{2}|(?P<b>\d{3}))\.", DataReport("t"))
    assert samples == before
    assert [s.identity for s in named] == [("001",), ("001", "002")]
