"""Two-photo morphs generated in-process from the bona fides of one split (``attacks=generated``).

A self-made attack (:mod:`.synthesis`) alters one photo, so it keeps that photo's sensor
noise and adds artifacts; a real morph averages *two* photos, whose independent noise and
fine texture partly cancel, and leaves ghosting wherever their faces disagree. This module
makes the real kind from any split whose bona fides have identities and aligned faces:

* **two people**: a bona fide and one of a different identity of the same split, both warped
  onto the average of their 5 landmarks (:func:`~.morphs.landmark_morph`) and combined by a
  method of :data:`~.morphs.MORPH_METHODS` (whole images averaged, or the averaged inner
  face pasted into the first);
* **same person**: two different shots of one identity combined the same way, where an
  identity has several photos: real blending and real noise averaging, no identity mixing,
  so the detector cannot lean on "two faces" alone.

With ``flow_p`` a share of the morphs also has its two faces aligned along their optical flow
after the warp (:func:`~.morphs.flow_align`), as dense landmark meshes align them.

The morph then gets its first contributor's colour, contrast and sharpness over the whole
image (:func:`~.processing.match_statistics`), as morphing tools sharpen their output, so
blur is no cue. Without identities every photo counts as its own identity (two
shots of one person may then be paired as "two people"); without landmarks the faces are
taken as already aligned and combined through a centred mask (:func:`~.morphs.morph`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..data.samples import DataError, Sample
from .morphs import MORPH_METHODS, flow_align, landmark_morph
from .processing import match_statistics

__all__ = ["ALPHA_RANGE", "SAME_PERSON_P", "Pairing", "generate_morph"]

ALPHA_RANGE = (0.4, 0.6)  # the second contributor's share: morphing tools aim at half and half
# How often a bona fide whose identity has other shots is morphed with one of them instead of
# another person: often enough that "two identities" is never the whole story.
SAME_PERSON_P = 0.25


class Pairing:
    """Who may be morphed with whom within one split.

    Drawing a partner costs the size of one identity's group, not of the split, so a split of
    tens of thousands of photos pairs as fast as a small one.

    Args:
        samples: The split's rows; only bona fides (label 0) are paired.

    Raises:
        DataError: If the split has fewer than two bona fides.
    """

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = samples
        self.bona_fides = [i for i, s in enumerate(samples) if s.label == 0]
        if len(self.bona_fides) < 2:
            raise DataError(f"generated attacks morph two bona fides of a split, but it has {len(self.bona_fides)}")
        # Each identity's bona fides as rows and as positions in ``bona_fides`` (both ascending).
        self.groups: dict[str, list[int]] = {}
        self._positions: dict[str, list[int]] = {}
        for position, i in enumerate(self.bona_fides):
            self.groups.setdefault(self.identity(i), []).append(i)
            self._positions.setdefault(self.identity(i), []).append(position)

    def identity(self, index: int) -> str:
        """The first identity of row ``index``, or its path when the data names none."""
        sample = self.samples[index]
        return sample.identity[0] if sample.identity else sample.path

    @property
    def identities_known(self) -> bool:
        return any(self.samples[i].identity for i in self.bona_fides)

    def _other(self, own: str, k: int) -> int:
        """The ``k``-th bona fide (in split order) whose identity is not ``own``."""
        position = k
        for taken in self._positions[own]:  # ascending: skip each of own's rows at or before it
            if taken > position:
                break
            position += 1
        return self.bona_fides[position]

    def partner(self, index: int, rng: np.random.Generator) -> tuple[int, bool]:
        """A bona fide to morph row ``index`` with, and whether it shows the same person.

        Another shot of the same identity with :data:`SAME_PERSON_P` where there is one (always
        when the split holds no other identity), otherwise a bona fide of another identity,
        each of them equally likely.
        """
        own = self.identity(index)
        same = [j for j in self.groups[own] if j != index]
        n_others = len(self.bona_fides) - len(self.groups[own])
        if same and (not n_others or rng.random() < SAME_PERSON_P):
            return int(same[int(rng.integers(len(same)))]), True
        return int(self._other(own, int(rng.integers(n_others)))), False


def generate_morph(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, landmarks_a: np.ndarray | None = None,
                   landmarks_b: np.ndarray | None = None, methods: Sequence[str] = tuple(MORPH_METHODS),
                   flow_p: float = 0.0) -> tuple[np.ndarray, str]:
    """A morph of two photos, given ``a``'s colour, contrast and sharpness over the whole image.

    Args:
        a, b: ``S x S x 3`` images in [0, 1] (``a`` is the frame a splice is pasted into).
        landmarks_a, landmarks_b: Their ``5 x 2`` ``(x, y)`` landmarks, or None (both needed to warp).
        methods: The given methods to draw from (even odds).
        flow_p: How often the two warped faces are also aligned along their optical flow
            (:func:`~.morphs.flow_align`); the method then reads ``flow_<method>``.

    Returns:
        The ``S x S x 3`` float32 morph and the method used.

    Raises:
        ValueError: For photos of different shapes or an unknown method.
    """
    if a.shape != b.shape or a.ndim != 3 or a.shape[0] != a.shape[1]:
        raise ValueError(f"contributors must be square H x W x 3 images of one shape, got {a.shape} and {b.shape}")
    method = str(methods[int(rng.integers(len(methods)))])
    alpha = float(rng.uniform(*ALPHA_RANGE))
    # Drawn only when asked for, so flow_p=0 leaves every other draw, and every run before it, as it was.
    dense = flow_p > 0.0 and bool(rng.random() < flow_p)
    if landmarks_a is not None and landmarks_b is not None:
        image, _ = landmark_morph(method, a, np.asarray(landmarks_a), b, np.asarray(landmarks_b), alpha, dense)
    else:  # faces already aligned: combined in place, through a centred mask
        first, second = flow_align(a, b, alpha) if dense else (a, b)
        image = np.clip(MORPH_METHODS[method](first, second, alpha, None), 0.0, 1.0)
    method = f"flow_{method}" if dense else method
    # Matched over the whole image, as the default data's morphs are matched to their
    # contributors and as tools sharpen their whole output.
    return match_statistics(image.astype(np.float32), a), method
