"""Who is in which image, and splits that keep every person in one split.

A bona fide image shows one identity; a morph shows its contributors. A split leaks when a
person seen in training (as a bona fide or as a morph contributor) is seen again in dev or
test. The functions here work on plain identity tuples, so they know nothing of files:

* :func:`identities_from_name` reads identities from file names (``identity_pattern``, compiled by
  :func:`~..io.config.parse_identity_pattern`), e.g. FRLL's ``001_03.jpg`` (bona fide of 001) and
  ``001_002.jpg`` (morph of 001 and 002);
* :func:`partition_identities` assigns identities to splits so that few morphs straddle two
  splits: whole groups of identities linked by morphs go to one split where their sizes
  allow, and a group too large for any split is cut by greedy graph growing, which keeps
  strongly linked identities together, then improved by swapping pairs of identities
  between splits while that cuts fewer morphs;
* :func:`leaks` finds the samples of a later split whose identities already appear in an
  earlier one.
"""

from __future__ import annotations

import heapq
import re
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

__all__ = [
    "REFINE_LIMIT",
    "SPLIT_ORDER",
    "identities_from_name",
    "leaks",
    "partition_identities",
    "straddling",
]

SPLIT_ORDER = ("train", "dev", "test")
REFINE_LIMIT = 1500  # identities; the swap search holds an n x n matrix of links (1,500: under 1 s, 3,000: 20 s)


def identities_from_name(pattern: re.Pattern[str], name: str, label: int) -> tuple[str, ...] | None:
    """The identities ``pattern`` finds in file ``name``; ``None`` if it finds none or, for a bona
    fide (``label`` 0), more than one."""
    match = pattern.search(name)
    if match is None:
        return None
    found = tuple(v for v in match.groupdict().values() if v)
    if not found or (label == 0 and len(found) != 1):
        return None
    return found


def straddling(groups: Sequence[tuple[str, ...]], where: dict[str, str]) -> list[int]:
    """Indices of the groups (samples) whose identities are not all in one split."""
    return [k for k, ids in enumerate(groups) if len({where[i] for i in ids}) > 1]


def _components(ids: list[str], groups: Sequence[tuple[str, ...]]) -> list[list[str]]:
    parent = {i: i for i in ids}

    def root(i: str) -> str:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for group in groups:
        for other in group[1:]:
            a, b = root(group[0]), root(other)
            if a != b:
                parent[b] = a
    members: dict[str, list[str]] = defaultdict(list)
    for i in ids:
        members[root(i)].append(i)
    return list(members.values())


def _grow(nodes: list[str], size: int, adjacency: dict[str, Counter], rank: dict[str, int],
          free: set[str]) -> list[str]:
    """Greedy graph growing: a region of ``size`` nodes from ``nodes`` (all in ``free``).

    Starting from the first node in random order, repeatedly add the free node with the
    highest gain = morph links into the region - links to other free nodes, so that the
    region closes around tightly linked identities and cuts few links. ``free`` shrinks.
    """
    pool = set(nodes)
    gain = {v: -sum(w for u, w in adjacency[v].items() if u in pool and u != v) for v in nodes}
    heap = [(-gain[v], rank[v], v) for v in nodes]
    heapq.heapify(heap)
    region: list[str] = []
    while heap and len(region) < size:
        neg, _, v = heapq.heappop(heap)
        if v not in free or -neg != gain[v]:
            continue  # taken, or a stale entry: the node's gain has grown since
        free.discard(v)
        pool.discard(v)
        region.append(v)
        for u, w in adjacency[v].items():
            if u in pool and u in free:
                gain[u] += 2 * w  # the link moves from "to a free node" to "into the region"
                heapq.heappush(heap, (-gain[u], rank[u], u))
    return region


def partition_identities(groups: Sequence[tuple[str, ...]], fractions: dict[str, float],
                         seed: int) -> dict[str, str]:
    """Assign every identity in ``groups`` to a split, keeping identities linked by morphs together.

    Args:
        groups: The identities of each sample: one for a bona fide, the contributors of a morph.
        fractions: Split name -> share of the identities, e.g. ``{"train": .6, "dev": .2, "test": .2}``;
            the shares need not sum to 1 (the largest split takes the rest). Every split gets
            at least one identity when there are enough.
        seed: Tie-breaks and the order of equal-sized groups; deterministic under it.

    Returns:
        Identity -> split name.

    Groups of identities connected by morphs (connected components) are placed whole, the
    largest first, each into the split furthest below its target. A component larger than
    every remaining gap is cut with :func:`_grow`, filling the smaller splits first; then
    :func:`_refine` swaps identities between splits while that cuts fewer morph links (up to
    ``REFINE_LIMIT`` identities).
    """
    rng = np.random.default_rng(seed)
    ids = sorted({i for g in groups for i in g})
    names = sorted(fractions, key=lambda k: (fractions[k], k))  # smallest share first; the largest takes the rest
    target = {k: max(1, round(fractions[k] * len(ids))) if len(ids) >= len(names) else 0 for k in names}
    target[names[-1]] = len(ids) - sum(target[k] for k in names[:-1])
    rank = {i: int(r) for i, r in zip(ids, rng.permutation(len(ids)))}
    adjacency: dict[str, Counter] = defaultdict(Counter)
    for g in groups:
        for a in g:
            for b in g:
                if a != b:
                    adjacency[a][b] += 1
    components = _components(ids, groups)
    order = rng.permutation(len(components))
    components = sorted((components[k] for k in order), key=len, reverse=True)
    where: dict[str, str] = {}
    filled = Counter()
    free = set(ids)
    for comp in components:
        gaps = {k: target[k] - filled[k] for k in names}
        fitting = [k for k in names if gaps[k] >= len(comp)] or (names if len(comp) == 1 else [])
        if fitting:  # whole, into the split furthest below its target among those it fits
            best = max(fitting, key=lambda k: (gaps[k] / max(target[k], 1), -names.index(k)))
            for i in comp:
                where[i] = best
                free.discard(i)
            filled[best] += len(comp)
            continue
        rest = sorted(comp, key=rank.__getitem__)
        for k in names:  # the component is too big for one split: cut it, smaller splits first
            take = min(target[k] - filled[k], len(rest)) if k != names[-1] else len(rest)
            if take <= 0:
                continue
            region = _grow(rest, take, adjacency, rank, free)
            for i in region:
                where[i] = k
            filled[k] += len(region)
            chosen = set(region)
            rest = [i for i in rest if i not in chosen]
            if not rest:
                break
    if len(ids) <= REFINE_LIMIT:
        _refine(where, ids, adjacency, names)
    return where



def _refine(where: dict[str, str], ids: list[str], adjacency: dict[str, Counter], names: list[str]) -> None:
    """Swap pairs of identities between two splits while a swap cuts fewer morph links (sizes stay).

    Swapping ``u`` (split A) with ``v`` (split B) changes the number of cut links by
    ``-(w(u, B) - w(u, A) + w(v, A) - w(v, B) - 2 w(u, v))``. Each swap cuts at least one
    link fewer, so this ends; it is a Kernighan-Lin-style local search without its lookahead.
    """
    index = {i: k for k, i in enumerate(ids)}
    w = np.zeros((len(ids), len(ids)))
    for a, row in adjacency.items():
        for b, count in row.items():
            w[index[a], index[b]] = count
    split = np.array([names.index(where[i]) for i in ids])
    while True:
        # links[k, s]: morph links from identity k into split s.
        links = np.stack([w[:, split == s].sum(axis=1) for s in range(len(names))], axis=1)
        best = (0.0, -1, -1)
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                ua, vb = np.flatnonzero(split == a), np.flatnonzero(split == b)
                if not len(ua) or not len(vb):
                    continue
                gu = links[ua, b] - links[ua, a]
                gv = links[vb, a] - links[vb, b]
                gain = gu[:, None] + gv[None, :] - 2 * w[np.ix_(ua, vb)]
                k = int(np.argmax(gain))
                if gain.flat[k] > best[0] + 1e-9:
                    best = (float(gain.flat[k]), int(ua[k // len(vb)]), int(vb[k % len(vb)]))
        if best[1] < 0:
            return
        _, u, v = best
        split[u], split[v] = split[v], split[u]
        where[ids[u]], where[ids[v]] = names[split[u]], names[split[v]]


def leaks(splits: Sequence[str], groups: Sequence[tuple[str, ...]]) -> dict[int, str]:
    """Samples of a later split whose identity (or any morph contributor) appears in an earlier split.

    Splits are taken in the order train, dev, test. A sample that leaks is dropped from its
    split; the identities of the samples kept in a split are "seen" for the later ones.
    Samples without identities are never reported (they cannot be checked).

    Returns:
        Index -> the earlier split its identity was seen in.
    """
    seen: dict[str, str] = {}
    out: dict[int, str] = {}
    for split in SPLIT_ORDER:
        members = [k for k, s in enumerate(splits) if s == split]
        for k in members:
            earlier = [seen[i] for i in groups[k] if i in seen and seen[i] != split]
            if earlier:
                out[k] = min(earlier, key=SPLIT_ORDER.index)
        for k in members:
            if k not in out:
                for i in groups[k]:
                    seen.setdefault(i, split)
    return out
