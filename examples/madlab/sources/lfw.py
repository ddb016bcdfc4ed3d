"""The embedded ``lfw_subset`` smoke test: 100 faces of scikit-image, morphed in-process."""

from __future__ import annotations

import itertools

import numpy as np

from ..attacks.morphs import morph
from ..data.samples import Sample

__all__ = ["embedded_samples"]


def embedded_samples(
    seed: int, methods: list[str], morphs_per_face: int, fractions: tuple[float, float]
) -> list[Sample]:
    """Bona fides and morphs from the 100 faces of ``skimage.data.lfw_subset()``, offline.

    The face images are split into disjoint train/dev/test pools first; morphs are made
    only from unordered pairs of different faces inside one pool (never both (a, b) and (b, a)). Each method gets
    ``morphs_per_face * pool_size / len(methods)`` morphs, so a pool has
    ``morphs_per_face`` morphs per bona fide in total. Deterministic under ``seed``.
    """
    from skimage.data import lfw_subset

    faces = lfw_subset()[:100].astype(np.float64)  # the first 100 are faces, the rest are not
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(faces))
    n_train = round(fractions[0] * len(faces))
    n_dev = round(fractions[1] * len(faces))
    pools = {"train": order[:n_train], "dev": order[n_train:n_train + n_dev], "test": order[n_train + n_dev:]}
    samples = []
    for split, pool in pools.items():
        for i in pool:
            rgb = np.repeat(faces[i][..., None], 3, axis=2)
            samples.append(Sample(f"lfw_subset/{split}/bona_fide/{i:03d}", 0, "bona_fide", split, (str(i),), rgb))
        per_method = max(1, round(morphs_per_face * len(pool) / len(methods)))
        # Unordered pairs: blend(a, b) and blend(b, a) are the same image. The pool is in random
        # order, so which face a splice is pasted into is random too.
        all_pairs = list(itertools.combinations(pool, 2))
        for method in methods:
            picks = rng.choice(len(all_pairs), size=min(per_method, len(all_pairs)), replace=False)
            for p in picks:
                a, b = all_pairs[p]
                img = morph(method, faces[a], faces[b])
                rgb = np.repeat(img[..., None], 3, axis=2)
                name = f"lfw_subset/{split}/morph/{method}/{a:03d}_{b:03d}"
                samples.append(Sample(name, 1, method, split, (str(a), str(b)), rgb))
    return samples
