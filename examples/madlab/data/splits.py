"""Which split each sample goes to, computed as a plan: nothing here changes a sample.

:func:`plan_splits` reads the samples (anything with ``path``, ``label``, ``method``,
``split`` and ``identity`` attributes) and returns a :class:`SplitPlan`: a split for every
sample, the samples to drop with their reasons, and the notes for the data report. The caller
applies it (:meth:`SplitPlan.apply`, which makes new samples). There is one way to split by
image, :func:`stratified` (by class and method, every group its share), used both for data
without splits or identities and for carving dev out of a given train split; and one way to
split by identity, :func:`~.identities.partition_identities`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .identities import leaks, partition_identities, straddling

__all__ = ["CARVE_DEV", "STRADDLES", "SplitPlan", "leak_reason", "plan_splits", "stratified"]

STRADDLES = "morph contributors fall into different splits"
CARVE_DEV = {"train": 0.75, "dev": 0.25}  # no dev split given: a quarter of train becomes dev


def leak_reason(earlier: str) -> str:
    return f"identity already in the {earlier} split (dropped from the later split)"


@dataclass(frozen=True)
class SplitPlan:
    """A split for every sample (``""`` where dropped), the drops with their reasons, and report notes."""

    split: tuple[str, ...]
    dropped: dict[int, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def apply(self, samples: Sequence[Any]) -> list[Any]:
        """New samples (``dataclasses.replace``) with their planned split, the dropped ones left out, in order."""
        return [dataclasses.replace(s, split=self.split[k]) for k, s in enumerate(samples) if k not in self.dropped]


def stratified(groups: Sequence[Hashable], shares: dict[str, float], rng: np.random.Generator) -> list[str]:
    """Split items by image, each group (e.g. class and method) on its own, in ``shares`` order.

    Every group is shuffled; its first ``max(1, round(share * n))`` items go to the first
    split, and so on, the last split taking the rest, so every split gets every group where
    the group is large enough.

    Args:
        groups: One group key per item.
        shares: Split name -> fraction, in order (the last one's fraction is what is left).
        rng: Draws the shuffles (one permutation per group, groups in order of first appearance).

    Returns:
        The split of each item.
    """
    members: dict[Hashable, list[int]] = {}
    for k, key in enumerate(groups):
        members.setdefault(key, []).append(k)
    names = list(shares)
    out = [""] * len(groups)
    for items in members.values():
        order = rng.permutation(len(items))
        bounds, start = [], 0
        for name in names[:-1]:
            start += max(1, round(shares[name] * len(items)))
            bounds.append(start)
        for rank, j in enumerate(order):
            out[items[j]] = names[int(np.searchsorted(bounds, rank, side="right"))]
    return out


def _by_identity(samples: Sequence[Any], shares: dict[str, float], seed: int,
                 what: str) -> tuple[list[str], dict[int, str], str]:
    """Partition the identities; morphs whose contributors land in different splits are dropped."""
    groups = [s.identity for s in samples]
    where = partition_identities(groups, shares, seed)
    cut = set(straddling(groups, where))
    dropped = {k: STRADDLES for k in cut}
    lost = Counter(samples[k].method for k in cut)
    sizes = Counter(where.values())
    n_morph = sum(1 for s in samples if s.label == 1)
    kept = (f"{sum(lost.values())} of {n_morph} morphs had contributors in different splits and were dropped"
            f" (by method: {dict(sorted(lost.items()))})" if lost else f"all {n_morph} morphs kept")
    note = (f"{what}: {len(where)} identities ({', '.join(f'{k} {sizes[k]}' for k in shares)}), none shared"
            f" across splits, identities linked by morphs kept together where possible; {kept}")
    return [where[s.identity[0]] for s in samples], dropped, note


def _given(samples: Sequence[Any]) -> tuple[dict[int, str], list[str]]:
    """Splits given: drop each sample of a later split whose identity is already in an earlier one."""
    n_known = sum(1 for s in samples if s.identity)
    if n_known == 0:
        return {}, ["WARNING: splits are given but no identities, so nothing checks whether a person appears in"
                    " more than one split; results can be optimistic. Give identities (a CSV identity column, or"
                    " identity_pattern for file names) to check"]
    found = leaks([s.split for s in samples], [s.identity for s in samples])
    per_split = Counter(f"{samples[k].split}/{'bona_fide' if samples[k].label == 0 else 'morph'}" for k in found)
    notes = [f"identities checked across the given splits: dropped {len(found)} samples whose identity (bona fide)"
             f" or contributor (morph) is already in an earlier split: {dict(sorted(per_split.items()))}"
             if found else "identities checked across the given splits: no identity is in two splits"]
    if n_known < len(samples):
        notes.append(f"WARNING: {len(samples) - n_known} of {len(samples)} samples have no identity and"
                     " could not be checked for identities shared across splits")
    return {k: leak_reason(earlier) for k, earlier in found.items()}, notes


def _carve_dev(samples: Sequence[Any], split: list[str], dropped: dict[int, str], seed: int) -> list[str]:
    """No dev split given: a quarter of the (kept) train samples becomes dev, by identity when every one
    has one, else by image with :func:`stratified`."""
    train = [k for k, s in enumerate(samples) if split[k] == "train" and k not in dropped]
    picked = [samples[k] for k in train]
    if picked and all(s.identity for s in picked):
        where, cut, note = _by_identity(picked, CARVE_DEV, seed,
                                        "no dev split given: 25% of the train identities became dev")
        dropped.update({train[j]: reason for j, reason in cut.items()})
    else:
        where = stratified([(s.label, s.method) for s in picked], CARVE_DEV, np.random.default_rng(seed))
        note = ("WARNING: no dev split given and the train samples have no identities: 25% of train, by image"
                " (stratified by class and method), became dev, so a person may be in both train and dev (dev"
                " figures and the threshold can be optimistic)")
    for j, k in enumerate(train):
        split[k] = where[j]
    return [note]


def plan_splits(samples: Sequence[Any], fractions: tuple[float, float], seed: int) -> SplitPlan:
    """The split of every sample, never silently letting an identity into two splits.

    * Splits given (every sample has one): a sample of a later split (train < dev < test) whose
      identity or morph contributor is already in an earlier split is dropped; without
      identities a warning says this cannot be checked. Without a dev split, a quarter of
      train becomes dev (by identity when identities are known).
    * No splits, every sample with identities: identities are partitioned and morphs whose
      contributors still land in different splits are dropped.
    * Otherwise by image, :func:`stratified` by class and method, with a warning.

    Args:
        samples: Every sample has a split, or none has (the caller checks).
        fractions: ``(train, dev)`` shares; test gets the rest.
        seed: Makes the plan reproducible.
    """
    if samples and all(s.split for s in samples):
        dropped, notes = _given(samples)
        split = [s.split for s in samples]
        if not any(split[k] == "dev" for k in range(len(samples)) if k not in dropped):
            notes += _carve_dev(samples, split, dropped, seed)
        return SplitPlan(tuple(split), dropped, tuple(notes))
    shares = {"train": fractions[0], "dev": fractions[1], "test": 1.0 - fractions[0] - fractions[1]}
    if samples and all(s.identity for s in samples):
        split, dropped, note = _by_identity(samples, shares, seed, "split by identity")
        return SplitPlan(tuple(split), dropped, (note,))
    split = stratified([(s.label, s.method) for s in samples], shares, np.random.default_rng(seed))
    missing = sum(1 for s in samples if not s.identity)
    return SplitPlan(tuple(split), {}, (
        f"WARNING: {missing} of {len(samples)} samples have no identity: split by image (stratified by class and"
        " method); the same person may appear in several splits, so results can be optimistic. Give a CSV with an"
        " identity column, identity_pattern for file names, or split folders, to avoid this",))
