"""Identity-safe splits of the morph-detection example: file-name identities, partitioning, leak checks.

Every path that decides a split (folders, CSV with and without a split column, a dev split
carved from train, the embedded set) must either keep each person in one split or say
that it cannot, with counts.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from madlab.data.folders import assign_splits, read_csv_manifest
from madlab.data.identities import identities_from_name, leaks, partition_identities, straddling
from madlab.data.samples import DataError, DataReport
from madlab.io.config import FRLL_EXAMPLE, Config, ConfigError, apply_overrides, parse_identity_pattern
from madlab.io.errors import MadlabError
from madlab.sources.lfw import embedded_samples
from madlab.sources.reading import load_samples
from PIL import Image

SPLITS = ("train", "dev", "test")


def _image(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(value).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)


def _homes(samples) -> dict[str, set[str]]:
    where: dict[str, set[str]] = {}
    for s in samples:
        for i in s.identity:
            where.setdefault(i, set()).add(s.split)
    return where


# ---------------------------------------------------------------- identity_pattern


def test_frll_pattern_reads_bona_fides_and_morphs() -> None:
    p = parse_identity_pattern(FRLL_EXAMPLE)
    assert identities_from_name(p, "001_03.jpg", 0) == ("001",)
    assert identities_from_name(p, "001_002.jpg", 1) == ("001", "002")
    assert identities_from_name(p, "001_002.jpg", 0) is None, "a bona fide has exactly one identity"
    assert identities_from_name(p, "portrait.jpg", 0) is None


@pytest.mark.parametrize(("pattern", "message"), [
    ("(", "not a valid regular expression"),
    (r"\d+_\d+", "has no named group"),
])
def test_bad_identity_pattern_is_a_config_error(pattern: str, message: str) -> None:
    with pytest.raises(MadlabError, match=message):
        parse_identity_pattern(pattern)
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), [f"identity_pattern={pattern}"])


def _frll_folder(root: Path, n: int, pairs: list[tuple[int, int]], split_of=None) -> None:
    """FRLL-like names: bona fides NNN_03.png, morphs NNN_MMM.png, optionally inside split folders."""
    for i in range(n):
        base = root / split_of(i) if split_of else root
        _image(base / "raw" / f"{i:03d}_03.png", i)
    for k, (a, b) in enumerate(pairs):
        base = root / split_of(a) if split_of else root
        _image(base / "morph" / "opencv" / f"{a:03d}_{b:03d}.png", 1000 + k)


def test_folder_without_splits_splits_by_identity_with_the_pattern(tmp_path: Path) -> None:
    pairs = [(a, b) for a, b in itertools.combinations(range(20), 2) if (a // 4) == (b // 4)]  # 5 groups of 4
    _frll_folder(tmp_path, 20, pairs)
    samples, report = load_samples(str(tmp_path), 0, [], 1, (0.6, 0.2), identity_pattern=FRLL_EXAMPLE)
    assert all(len(v) == 1 for v in _homes(samples).values()), "no identity in two splits"
    assert not report.skipped, "the groups of 4 fit whole into splits: no morph had to be dropped"
    assert sum(s.label for s in samples) == len(pairs)
    assert any("split by identity" in n and f"all {len(pairs)} morphs kept" in n for n in report.notes)
    # Without the pattern the same folder splits by image, with a warning.
    _, report = load_samples(str(tmp_path), 0, [], 1, (0.6, 0.2))
    assert any(n.startswith("WARNING") and "split by image" in n for n in report.notes)


def test_pattern_that_misses_files_is_refused_with_counts(tmp_path: Path) -> None:
    _frll_folder(tmp_path, 6, [(0, 1), (2, 3), (4, 5)])
    _image(tmp_path / "raw" / "portrait.png")
    with pytest.raises(DataError, match=r"finds no identity in 1 of 10 file names .*\['portrait.png'\]"):
        load_samples(str(tmp_path), 0, [], 1, (0.6, 0.2), identity_pattern=FRLL_EXAMPLE)


# ---------------------------------------------------------------- given splits: leaks are dropped and counted


def test_split_folders_drop_a_test_morph_of_a_training_identity(tmp_path: Path) -> None:
    split_of = {0: "train", 1: "train", 2: "dev", 3: "dev", 4: "test", 5: "test", 6: "test", 7: "test"}.__getitem__
    # Morph 004_000 sits in test (its first contributor's split) but 000 is a training bona fide.
    _frll_folder(tmp_path, 8, [(0, 1), (2, 3), (4, 5), (6, 7), (4, 0)], split_of)
    samples, report = load_samples(str(tmp_path), 0, [], 1, (0.6, 0.2), identity_pattern=FRLL_EXAMPLE)
    assert not any(s.path.endswith("004_000.png") for s in samples)
    assert report.skipped["identity already in the train split (dropped from the later split)"] == 1
    assert any("dropped 1 samples" in n and "'test/morph': 1" in n for n in report.notes)
    assert all(len(v) == 1 for v in _homes(samples).values())


def test_split_folders_without_identities_warn(tmp_path: Path) -> None:
    for split in SPLITS:
        _image(tmp_path / split / "bona_fide" / "a.png")
        _image(tmp_path / split / "morph" / "b.png", 1)
    _, report = load_samples(str(tmp_path), 0, [], 1, (0.6, 0.2))
    assert any(n.startswith("WARNING: splits are given but no identities") for n in report.notes)


def _csv(tmp_path: Path, rows: list[str], header: str = "path,label,method,identity,split") -> Path:
    for row in rows:
        _image(tmp_path / row.split(",")[0], hash(row) % 1000)
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join([header, *rows]) + "\n")
    return manifest


def test_csv_split_column_leak_is_dropped_and_counted(tmp_path: Path) -> None:
    rows = ["a.png,0,,A,train", "b.png,0,,B,train", "ab.png,1,cv,A+B,train",
            "c.png,0,,C,dev", "d.png,0,,D,dev", "cd.png,1,cv,C+D,dev",
            "e.png,0,,E,test", "f.png,0,,F,test", "ef.png,1,cv,E+F,test",
            "ea.png,1,cv,E+A,test",  # contributor A is a training bona fide
            "c2.png,0,,C,test"]  # C is a dev bona fide
    samples, report = load_samples(str(_csv(tmp_path, rows)), 0, [], 1, (0.6, 0.2))
    names = {Path(s.path).name for s in samples}
    assert "ea.png" not in names and "c2.png" not in names and len(names) == 9
    assert report.skipped["identity already in the train split (dropped from the later split)"] == 1
    assert report.skipped["identity already in the dev split (dropped from the later split)"] == 1


def test_csv_without_dev_carves_dev_by_identity(tmp_path: Path) -> None:
    rows = [f"t{i}.png,0,,P{i},train" for i in range(16)]
    rows += [f"m{i}.png,1,cv,P{i}+P{i + 1},train" for i in range(0, 16, 2)]  # pairs (0,1), (2,3), ...
    rows += ["x.png,0,,X,test", "y.png,0,,Y,test", "xy.png,1,cv,X+Y,test"]
    samples, report = load_samples(str(_csv(tmp_path, rows)), 0, [], 1, (0.6, 0.2))
    assert {s.split for s in samples} == set(SPLITS)
    assert all(len(v) == 1 for v in _homes(samples).values()), "dev is carved by identity"
    assert not report.skipped, "pairs stay together, so nothing is dropped"
    assert any("25% of the train identities became dev" in n for n in report.notes)


def test_csv_without_dev_or_identities_warns_that_dev_is_by_image(tmp_path: Path) -> None:
    rows = [f"t{i}.png,{i % 2},,,train" for i in range(12)] + ["x.png,0,,,test", "y.png,1,,,test"]
    _, report = load_samples(str(_csv(tmp_path, rows)), 0, [], 1, (0.6, 0.2))
    assert any("no dev split given and the train samples have no identities" in n for n in report.notes)


def test_csv_without_splits_reports_dropped_morphs(tmp_path: Path) -> None:
    lines = [f"b{i}.png,0,,p{i}" for i in range(12)] + [f"m{i}.png,1,fm,p{i}+p{(i + 1) % 12}" for i in range(12)]
    manifest = _csv(tmp_path, lines, header="path,label,method,identity")
    report = DataReport("t")
    samples = read_csv_manifest(manifest, report)
    kept = assign_splits(samples, (0.5, 0.25), 0, report)
    dropped = report.skipped["morph contributors fall into different splits"]
    assert dropped == 24 - len(kept)
    assert any(f"{dropped} of 12 morphs had contributors in different splits" in n for n in report.notes)


def test_partial_splits_are_refused(tmp_path: Path) -> None:
    rows = ["a.png,0,,A,train", "b.png,1,,A+B,"]
    with pytest.raises(DataError, match="1 samples have a split and 1 do not"):
        load_samples(str(_csv(tmp_path, rows)), 0, [], 1, (0.6, 0.2))


# ---------------------------------------------------------------- partitioning


def _random_graph(n: int, n_morphs: int, seed: int) -> list[tuple[str, ...]]:
    rng = np.random.default_rng(seed)
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < n_morphs:
        a, b = sorted(rng.choice(n, 2, replace=False).tolist())
        pairs.add((a, b))
    return [(f"p{i}",) for i in range(n)] + [(f"p{a}", f"p{b}") for a, b in sorted(pairs)]


def _random_assignment(groups, seed: int) -> dict[str, str]:
    ids = sorted({i for g in groups for i in g})
    order = np.random.default_rng(seed).permutation(len(ids))
    n_train, n_dev = round(0.6 * len(ids)), round(0.2 * len(ids))
    return {ids[k]: "train" if r < n_train else "dev" if r < n_train + n_dev else "test" for r, k in enumerate(order)}


def test_fifty_identities_two_hundred_morphs_drop_far_fewer_than_random() -> None:
    # The case: identities assigned at random dropped 121 of 200 morphs.
    groups = _random_graph(50, 200, 0)
    fractions = {"train": 0.6, "dev": 0.2, "test": 0.2}
    ours = [len(straddling(groups, partition_identities(groups, fractions, seed))) for seed in range(5)]
    rand = [len(straddling(groups, _random_assignment(groups, seed))) for seed in range(20)]
    assert max(ours) < 0.75 * np.median(rand), (ours, np.median(rand))
    where = partition_identities(groups, fractions, 0)
    assert sorted(where) == sorted({i for g in groups for i in g})
    assert [sum(v == k for v in where.values()) for k in SPLITS] == [30, 10, 10], "sizes follow the fractions"


def test_clustered_morphs_stay_whole() -> None:
    # Morphs only inside clusters of 5 (as when pairs are chosen among similar-looking people).
    groups = [(f"p{i}",) for i in range(50)]
    groups += [(f"p{a}", f"p{b}") for a, b in itertools.combinations(range(50), 2) if a // 5 == b // 5]
    where = partition_identities(groups, {"train": 0.6, "dev": 0.2, "test": 0.2}, 1)
    assert straddling(groups, where) == []
    assert len(straddling(groups, _random_assignment(groups, 1))) > 20


@settings(deadline=None, max_examples=60)
@given(st.integers(3, 25), st.integers(0, 40), st.integers(0, 10**6))
def test_partition_is_total_deterministic_and_sized(n: int, m: int, seed: int) -> None:
    groups = _random_graph(n, min(m, n * (n - 1) // 2), seed)
    fractions = {"train": 0.6, "dev": 0.2, "test": 0.2}
    where = partition_identities(groups, fractions, seed)
    assert where == partition_identities(groups, fractions, seed)
    assert set(where) == {f"p{i}" for i in range(n)} and set(where.values()) <= set(SPLITS)
    sizes = [sum(v == k for v in where.values()) for k in SPLITS]
    assert min(sizes) >= 1
    # Components are placed whole when they fit, so the sizes may miss the targets by at most
    # the largest component; with no morphs at all they are exact.
    if m == 0:
        assert sizes[1] == max(1, round(0.2 * n)) and sizes[2] == max(1, round(0.2 * n))


# ---------------------------------------------------------------- leak finding against brute force


@settings(deadline=None, max_examples=200)
@given(st.lists(st.tuples(st.sampled_from(SPLITS), st.lists(st.sampled_from("ABCDEF"), max_size=3, unique=True)),
                min_size=1, max_size=20))
def test_leaks_match_the_brute_force_definition(rows) -> None:
    splits = [s for s, _ in rows]
    groups = [tuple(g) for _, g in rows]
    found = leaks(splits, groups)
    # Brute force: walk the splits in order; a sample leaks iff it shares an identity with a kept
    # sample of a strictly earlier split.
    kept: list[int] = []
    expected = {}
    for split in SPLITS:
        for k in (k for k in range(len(rows)) if splits[k] == split):
            earlier = [splits[j] for j in kept if splits[j] != split and set(groups[j]) & set(groups[k])]
            if earlier:
                expected[k] = min(earlier, key=SPLITS.index)
        kept += [k for k in range(len(rows)) if splits[k] == split and k not in expected]
    assert found == expected
    remaining = [k for k in range(len(rows)) if k not in found]
    for a in remaining:
        for b in remaining:
            if splits[a] != splits[b]:
                assert not set(groups[a]) & set(groups[b]), "what is kept shares no identity across splits"


# ---------------------------------------------------------------- embedded set


def test_embedded_morphs_use_unordered_pairs() -> None:
    samples = embedded_samples(0, ["blend", "splice"], 2, (0.6, 0.2))
    for method in ("blend", "splice"):
        pairs = [frozenset(s.identity) for s in samples if s.method == method]
        assert len(pairs) == len(set(pairs)), f"{method}: blend(a, b) and blend(b, a) are the same morph"


@settings(deadline=None, max_examples=25)
@given(st.integers(6, 18), st.integers(1, 40), st.integers(0, 10**6))
def test_no_single_swap_of_two_identities_drops_fewer_morphs(n: int, m: int, seed: int) -> None:
    # Brute force over every swap of two identities in different splits (sizes unchanged).
    groups = _random_graph(n, min(m, n * (n - 1) // 2), seed)
    where = partition_identities(groups, {"train": 0.6, "dev": 0.2, "test": 0.2}, seed)
    cut = len(straddling(groups, where))
    for u, v in itertools.combinations(sorted(where), 2):
        if where[u] != where[v]:
            swapped = {**where, u: where[v], v: where[u]}
            assert len(straddling(groups, swapped)) >= cut, (u, v)


def test_a_split_emptied_by_leak_drops_says_why(tmp_path: Path) -> None:
    rows = ["a.png,0,,A,train", "ab.png,1,cv,A+B,train", "c.png,0,,C,dev", "cd.png,1,cv,C+D,dev",
            "e.png,0,,E,test", "ea.png,1,cv,E+A,test"]  # the only test morph has a training contributor
    with pytest.raises(DataError, match=r"the test split has 1 bona fide and 0 morph images \(after dropping 1"
                                        r" samples to keep identities out of two splits\)"):
        load_samples(str(_csv(tmp_path, rows)), 0, [], 1, (0.6, 0.2))
