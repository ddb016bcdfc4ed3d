"""Synthetic morphing attacks made from one bona fide, and the processing both classes share.

A detector trained on the morphs of a few tools learns those tools. Following the published
descriptions of Self-Blended Images (Shiohara and Yamasaki, CVPR 2022) and SelfMAD (2025),
this module makes morph-like attacks from a single bona fide photo, so that a detector can
be trained on bona fides alone:

* :func:`self_blend`: a copy altered in colour and quality (channel shifts, brightness and
  contrast, then a down-and-up scaling or a sharpening), slightly shifted, scaled and
  elastically warped, blended back into the photo through a blurred face mask. It leaves
  the blending seams and colour mismatch of a spliced morph.
* :func:`self_morph`: the photo blended with a copy of itself zoomed 1.0-1.1x about the
  face centre, with weight ``beta`` in [0.125, 0.5] inside a mask over the inner face, the
  whole head or the whole image: double contours and ghosting, as a landmark morph of two
  people leaves them (most of all on the face outline, the hairline and the ears).
* :func:`self_warp`: two copies of the photo warped apart by perturbed landmarks (each
  landmark moved by 3-10 % of the eye distance, one copy half the way one direction, the
  other half the other) and blended through a face mask: eyes, nostrils, mouth corners and
  the jaw doubled where a landmark morph of two people doubles them, with both copies
  resampled as a morph's contributors are. Without landmarks it is a :func:`self_morph`.
* :func:`self_mirror`: the photo and its mirror image, brought onto one shape by the landmarks
  and then along their optical flow, averaged through a face mask: as in a morph of two
  people, two different faces (the left and right halves) meet on an average shape, their
  noise partly cancels, and the result is more regular than the photo, not less. It also
  makes the face symmetric, which a detector learns instead (examples/README.md, B3), so it
  is not in the default mix.
* :func:`self_texture`: the photo's fine detail (below a Gaussian width of 0.7-1.5 pixels)
  averaged with the same detail moved 3-8 pixels and mirrored half the time, inside a face
  mask; shape and shading are kept. What averaging two people does to skin texture and sensor
  noise: two unrelated patterns mixed, partly cancelling. Self-warps teach "less regular =
  attack", which passes a well-aligned average of two faces as bona fide (examples/README.md,
  B3); self-textures teach the averaging itself.
* :func:`self_splice`: a copy warped by perturbed landmarks (and half the time rescaled) pasted
  back through a mask over one to three face parts (eyes, nose, mouth) or the inner face,
  with a seam from an almost hard cut to a wide fade: the seam, misplaced features and
  resampled region a spliced morph leaves.
* :func:`frequency_artifact`: a periodic pattern mixed into the Fourier magnitude inside the
  mask (the phase is kept), as generative morphs leave spectral traces.

Every raw attack differs from its photo only where its mask is non-zero (``Attack.weight``).

Blending averages pixels, so raw attacks are blurrier and flatter than their photos; training
matches each to its photo and augments both classes alike (:mod:`.processing`) before a
detector sees it.

The mask comes from five face landmarks when they are known (left eye, right eye, nose tip,
left and right mouth corners, ``(x, y)`` in the image's pixel coordinates, the layout of the
face-alignment module) and otherwise from a centred ellipse, the inner face of a centred
face crop. Every random choice comes from
the ``numpy.random.Generator`` passed in, so a seed fixes the result. Images are ``H x W x 3``
arrays in [0, 1], returned as float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .masks import ellipse
from .morphs import flow_align, warp_to
from .processing import blur, check_image, colour_shift, resize, unsharp

__all__ = [
    "BETA_RANGE",
    "DEFAULT_MIX",
    "FREQUENCY_P",
    "MORPH_REGIONS",
    "SEAM_RANGE",
    "SYNTHETIC_METHODS",
    "TEXTURE_SHIFT_RANGE",
    "TEXTURE_SIGMA_RANGE",
    "TWO_SOURCE_SHARE_RANGE",
    "WARP_RANGE",
    "ZOOM_RANGE",
    "Attack",
    "face_mask",
    "frequency_artifact",
    "parse_mix",
    "parts_mask",
    "self_blend",
    "self_mirror",
    "self_morph",
    "self_splice",
    "self_texture",
    "self_warp",
    "synthesise",
]

BETA_RANGE = (0.125, 0.5)  # self-morph weight of the zoomed copy (SelfMAD's set spans the same interval)
ZOOM_RANGE = (1.0, 1.1)
WARP_RANGE = (0.03, 0.10)  # self-warp: how far each landmark moves, as a share of the eye distance
# Self-warp, self-mirror and self-texture: the second source's share of the mix (landmark
# morphs of two people are about half and half).
TWO_SOURCE_SHARE_RANGE = (0.35, 0.5)
# Self-texture: the Gaussian width (pixels) below which detail counts as texture, and how far
# (pixels) the foreign detail is taken from: beyond the few pixels over which a face's fine
# texture is correlated, so the two averaged textures are nearly independent.
TEXTURE_SIGMA_RANGE = (0.7, 1.5)
TEXTURE_SHIFT_RANGE = (3.0, 8.0)
SPLICE_BETA_RANGE = (0.5, 1.0)  # self-splice: the pasted copy's share (a splice pastes a half-and-half face or more)
# The feather of a self-splice's mask, as a share of the image side, drawn log-uniformly: from
# an almost hard cut to a wide fade, as splicing tools' blending masks range.
SEAM_RANGE = (0.005, 0.06)
FREQUENCY_P = 0.1
# Where a self-morph blends its zoomed copy, with even odds: the inner face, the whole head
# (outline, hairline, ears) or the whole image. Landmark morphs of two people leave their
# double contours mostly on the outline and the hair, so the inner face alone would miss them;
# SelfMAD's face-parser masks likewise range from the skin alone to the full image.
MORPH_REGIONS = ("face", "head", "image")
# The centre of the inner face in a centred face crop, as shares of (H - 1, W - 1).
_CENTRED_FACE = (0.55, 0.5)
# The 5 landmarks of a centred face crop, as (x, y) shares of (W - 1, H - 1): where the part
# masks go when no landmarks are known.
_CENTRED_POINTS = np.array([[0.36, 0.42], [0.64, 0.42], [0.5, 0.58], [0.39, 0.72], [0.61, 0.72]])
FACE_PARTS = ("eyes", "nose", "mouth")
BLEND_RATIOS = (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)  # SBI's self-blend ratios: mostly a full paste


@dataclass
class Attack:
    """A synthetic attack and where it differs from the photo it was made from.

    Attributes:
        image: ``H x W x 3`` float32 in [0, 1].
        weight: ``H x W`` in [0, 1]: the share of the altered copy in each pixel; the image
            equals the photo wherever it is 0.
        method: The name in :data:`SYNTHETIC_METHODS`, with ``+frequency`` when a spectral pattern was added.
        beta: The blend weight (self-morph: of the zoomed copy; self-blend: the blend ratio).
        zoom: Self-morph: the magnification of the blended copy (None for self-blend).
        centre: Self-morph: the ``(y, x)`` pixel it was magnified about (None for self-blend).
        region: Where the mask lies: ``face``, ``head`` or ``image`` (see :func:`face_mask`), or ``parts``
            (:func:`parts_mask`).
    """

    image: np.ndarray
    weight: np.ndarray
    method: str
    beta: float
    zoom: float | None = None
    centre: tuple[float, float] | None = None
    region: str = "face"


# --------------------------------------------------------------------------- masks


def _check_landmarks(landmarks: np.ndarray | None) -> np.ndarray | None:
    if landmarks is None:
        return None
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (5, 2) or not np.isfinite(points).all():
        raise ValueError(f"landmarks must be a finite 5 x 2 array (eyes, nose, mouth corners as x, y), got"
                         f" shape {points.shape}")
    return points


@dataclass(frozen=True)
class _Face:
    """Where a face's features are, from its 5 landmarks ``(x, y)``: what masks and warps are placed by."""

    eye_mid: np.ndarray
    mouth_mid: np.ndarray
    nose: np.ndarray
    eye_gap: float  # pixels between the eyes (at least 1)
    span: float  # pixels from the eyes' midpoint to the mouth's (at least 1)
    angle: float  # of the eye line, radians

    @classmethod
    def of(cls, points: np.ndarray) -> _Face:
        eyes, mouth = points[:2], points[3:]
        eye_mid, mouth_mid = eyes.mean(axis=0), mouth.mean(axis=0)
        return cls(eye_mid, mouth_mid, points[2], max(float(np.linalg.norm(eyes[1] - eyes[0])), 1.0),
                   max(float(np.linalg.norm(mouth_mid - eye_mid)), 1.0),
                   float(np.arctan2(eyes[1, 1] - eyes[0, 1], eyes[1, 0] - eyes[0, 0])))


def _landmark_offset(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random move of each landmark: a normal draw scaled to :data:`WARP_RANGE` of the eye distance."""
    return rng.standard_normal((5, 2)) * rng.uniform(*WARP_RANGE) * _Face.of(points).eye_gap


def _face_ellipse(height: int, width: int, landmarks: np.ndarray | None,
                  rng: np.random.Generator, region: str = "face") -> np.ndarray:
    """The hard region: the inner face (``face``) or the whole head with its outline and
    hairline (``head``), from the landmarks or centred in the crop."""
    jitter = rng.uniform(0.9, 1.1, size=2)
    head = region == "head"
    if landmarks is None:  # centre and radii as shares of the image's height and width
        centre, radii = ((0.5, 0.5), (0.58, 0.48)) if head else (_CENTRED_FACE, (0.36, 0.30))
        return ellipse(height, width, (centre[0] * (height - 1), centre[1] * (width - 1)),
                        (radii[0] * height * jitter[0], radii[1] * width * jitter[1]))
    face = _Face.of(landmarks)
    if head:
        # From the chin to above the hairline and past the ears: the outline, hair edge and
        # ears, where a landmark morph of two people leaves its strongest double contours.
        centre_xy = face.eye_mid + 0.2 * (face.mouth_mid - face.eye_mid)
        radii = (2.2 * face.span * jitter[0], 1.6 * face.eye_gap * jitter[1])
    else:
        # From the eyes to below the mouth and just past the outer eye corners: the inner face a
        # morph blends, with cheeks and chin, but not hair or ears.
        middle = 0.5 * (face.eye_mid + face.mouth_mid)
        centre_xy = middle + 0.1 * (face.nose - middle)
        radii = (1.25 * face.span * jitter[0], 0.95 * face.eye_gap * jitter[1])
    return ellipse(height, width, (centre_xy[1], centre_xy[0]), radii, face.angle)


def face_mask(height: int, width: int, rng: np.random.Generator, landmarks: np.ndarray | None = None,
              region: str = "face") -> np.ndarray:
    """A soft mask in [0, 1] over a region of the face, exactly 0 away from it.

    ``face``: an ellipse over the inner face (eyes to chin, the cheeks within the outline);
    ``head``: a larger one over the whole head with its outline, hairline and ears; both from
    the five landmarks or (without them) centred in the crop, with radii jittered by ±10 %,
    blurred twice with random Gaussian widths (1-4 % of the image side, as SBI blurs with
    random kernels) and rescaled so that the maximum is 1. ``image``: 1 everywhere.

    Args:
        landmarks: ``5 x 2`` ``(x, y)`` pixel coordinates (eyes, nose tip, mouth corners), or None.
        region: One of :data:`MORPH_REGIONS`.

    Raises:
        ValueError: If ``landmarks`` is not a finite 5 x 2 array or ``region`` is not a known region.
    """
    if region not in MORPH_REGIONS:
        raise ValueError(f"region must be one of {MORPH_REGIONS}, got {region!r}")
    points = _check_landmarks(landmarks)
    if region == "image":
        return np.ones((height, width), dtype=np.float32)
    hard = _face_ellipse(height, width, points, rng, region)
    # Two Gaussian blurs in a row are one Gaussian blur whose variance is the sum of theirs.
    widths = rng.uniform(0.01, 0.04, size=2) * min(height, width)
    soft = blur(hard.astype(np.float32), float(np.hypot(*widths)))
    peak = soft.max()
    return soft / peak if peak > 0 else soft


def _part_ellipse(height: int, width: int, points: np.ndarray, part: str) -> np.ndarray:
    """The hard region of one face part around the landmarks: both eyes with the brows, the nose, or the mouth."""
    f = _Face.of(points)
    up = (f.eye_mid - f.mouth_mid) / f.span  # unit vector from the mouth towards the eyes
    centre_xy, radii = {
        "eyes": (f.eye_mid + 0.15 * f.span * up, (0.45 * f.span, 0.8 * f.eye_gap)),
        "nose": (0.7 * f.nose + 0.3 * f.eye_mid, (0.5 * f.span, 0.35 * f.eye_gap)),
        "mouth": (f.mouth_mid, (0.3 * f.span, 0.7 * f.eye_gap)),
    }[part]
    return ellipse(height, width, (centre_xy[1], centre_xy[0]), radii, f.angle)


def _feather(hard: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``hard`` blurred by a seam width drawn log-uniformly from :data:`SEAM_RANGE`, scaled to a maximum of 1."""
    seam = float(np.exp(rng.uniform(*np.log(SEAM_RANGE)))) * min(hard.shape)
    soft = blur(hard.astype(np.float32), max(seam, 0.3))
    peak = soft.max()
    return soft / peak if peak > 0 else soft


def parts_mask(height: int, width: int, rng: np.random.Generator, landmarks: np.ndarray | None = None) -> np.ndarray:
    """A soft mask over one to three face parts (of :data:`FACE_PARTS`: eyes with brows, nose,
    mouth), drawn at random, feathered by a seam width from :data:`SEAM_RANGE`.

    The parts are placed by the five landmarks, or (without them) where a centred face crop has them.

    Raises:
        ValueError: If ``landmarks`` is not a finite 5 x 2 array.
    """
    points = _check_landmarks(landmarks)
    if points is None:
        points = _CENTRED_POINTS * np.array([width - 1, height - 1])
    count = int(rng.integers(1, len(FACE_PARTS) + 1))
    chosen = rng.choice(len(FACE_PARTS), size=count, replace=False)
    hard = np.zeros((height, width), dtype=bool)
    for k in sorted(chosen):
        hard |= _part_ellipse(height, width, points, FACE_PARTS[k]) > 0.5
    return _feather(hard, rng)


# --------------------------------------------------------------------------- resampling


def _sample_at(image: np.ndarray, src_y: np.ndarray, src_x: np.ndarray) -> np.ndarray:
    """Bilinear ``image`` at source pixel coordinates (reflected at the border)."""
    height, width = image.shape[:2]
    grid = np.stack([(2 * src_x + 1) / width - 1, (2 * src_y + 1) / height - 1], axis=-1).astype(np.float32)
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))[None]
    out = F.grid_sample(x, torch.from_numpy(grid)[None], mode="bilinear",
                        padding_mode="reflection", align_corners=False)
    return out[0].numpy().transpose(1, 2, 0)


def _zoom_about(image: np.ndarray, zoom: float, centre: tuple[float, float]) -> np.ndarray:
    """``image`` magnified ``zoom`` times about ``centre`` ``(y, x)``, same size."""
    yy, xx = np.mgrid[0:image.shape[0], 0:image.shape[1]].astype(np.float32)
    return _sample_at(image, centre[0] + (yy - centre[0]) / zoom, centre[1] + (xx - centre[1]) / zoom)


def _shift_and_warp(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A small affine move (shift ±3 % x, ±1.5 % y, scale 0.95-1.05) plus a smooth elastic warp."""
    height, width = image.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cy, cx = (height - 1) / 2, (width - 1) / 2
    scale = rng.uniform(0.95, 1.05)
    ty, tx = rng.uniform(-0.015, 0.015) * height, rng.uniform(-0.03, 0.03) * width
    src_y = cy + (yy - cy - ty) / scale
    src_x = cx + (xx - cx - tx) / scale
    amplitude = rng.uniform(0.0, 0.015) * min(height, width)
    # Smooth random displacements: noise on a coarse 6 x 6 grid, interpolated up (bicubic),
    # costs nothing next to blurring full-size noise and gives the same low-frequency warp.
    coarse = torch.from_numpy(rng.uniform(-1.0, 1.0, size=(1, 2, 6, 6)).astype(np.float32))
    fields = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)[0].numpy()
    for grid, field in zip((src_y, src_x), fields):
        grid += amplitude * field / (np.abs(field).max() + 1e-12)
    return _sample_at(image, src_y, src_x)


# --------------------------------------------------------------------------- pixel processing


def _alter_quality(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """SBI's source change: colour shift, then a 2-4x down-and-up scaling or a mild sharpening."""
    out = colour_shift(image, rng, 1.0)
    if rng.random() < 0.5:
        height, width = out.shape[:2]
        factor = rng.uniform(2.0, 4.0)
        small = resize(out, max(2, round(height / factor)), max(2, round(width / factor)))
        return resize(small, height, width)
    return unsharp(out, rng.uniform(0.3, 1.0))


# --------------------------------------------------------------------------- attacks


def _paste_in_region(x: np.ndarray, morph: np.ndarray, rng: np.random.Generator, points: np.ndarray | None,
                     regions: tuple[str, ...], method: str, beta: float) -> Attack:
    """``morph`` pasted into ``x`` through a full-strength mask over one of ``regions`` (even odds;
    see :func:`face_mask`): the last step of the attacks that mix two sources of one photo."""
    region = str(rng.choice(regions))
    mask = face_mask(x.shape[0], x.shape[1], rng, points, region)
    out = x + mask[..., None] * (morph - x)
    return Attack(np.clip(out, 0.0, 1.0), mask, method, beta, region=region)


def self_blend(image: np.ndarray, rng: np.random.Generator, landmarks: np.ndarray | None = None) -> Attack:
    """An altered, slightly moved copy of ``image`` blended back through a blurred face mask.

    Raises:
        ValueError: For an image that is not ``H x W x 3`` or bad landmarks.
    """
    x = check_image(image)
    source = _shift_and_warp(np.clip(_alter_quality(x, rng), 0.0, 1.0), rng)
    ratio = float(rng.choice(BLEND_RATIOS))
    weight = ratio * face_mask(x.shape[0], x.shape[1], rng, landmarks)
    out = x + weight[..., None] * (source - x)
    return Attack(np.clip(out, 0.0, 1.0), weight, "self_blend", ratio)


def self_morph(image: np.ndarray, rng: np.random.Generator, landmarks: np.ndarray | None = None,
               regions: tuple[str, ...] = MORPH_REGIONS) -> Attack:
    """``image`` blended with itself zoomed 1.0-1.1x about the face centre, weight ``beta`` in [0.125, 0.5].

    The blend covers one of ``regions`` (even odds; see :func:`face_mask`): the inner face, the
    whole head, or the whole image. The centre is the nose tip when landmarks are given, else
    the centre of the inner-face ellipse.

    Raises:
        ValueError: For an image that is not ``H x W x 3``, bad landmarks or an unknown region.
    """
    x = check_image(image)
    points = _check_landmarks(landmarks)
    region = str(rng.choice(regions))
    mask = face_mask(x.shape[0], x.shape[1], rng, points, region)
    if points is not None:
        centre = (float(points[2, 1]), float(points[2, 0]))
    else:
        centre = (_CENTRED_FACE[0] * (x.shape[0] - 1), _CENTRED_FACE[1] * (x.shape[1] - 1))
    zoom = float(rng.uniform(*ZOOM_RANGE))
    zoomed = _zoom_about(x, zoom, centre)
    beta = float(rng.uniform(*BETA_RANGE))
    weight = beta * mask
    out = x + weight[..., None] * (zoomed - x)
    return Attack(np.clip(out, 0.0, 1.0), weight, "self_morph", beta, zoom, centre, region)


def self_warp(image: np.ndarray, rng: np.random.Generator, landmarks: np.ndarray | None = None,
              regions: tuple[str, ...] = MORPH_REGIONS) -> Attack:
    """Two copies of ``image`` warped apart by perturbed landmarks, blended (second copy's
    share ``beta`` in [0.35, 0.5]) inside a mask over one of ``regions``.

    Every landmark moves by a random offset (a normal draw scaled to 3-10 % of the eye
    distance); one copy is warped half of that offset one way, the other half the other way
    (:func:`~.morphs.warp_to`), so features are doubled about where they were and both copies
    are resampled. Without landmarks there is nothing to warp by and :func:`self_morph` is used.

    Raises:
        ValueError: For an image that is not ``H x W x 3``, bad landmarks or an unknown region.
    """
    x = check_image(image)
    points = _check_landmarks(landmarks)
    if points is None:
        return self_morph(image, rng, None, regions)
    offset = _landmark_offset(points, rng) / 2.0
    first, second = warp_to(x, points, points + offset), warp_to(x, points, points - offset)
    beta = float(rng.uniform(*TWO_SOURCE_SHARE_RANGE))
    morph = ((1.0 - beta) * first + beta * second).astype(np.float32)
    return _paste_in_region(x, morph, rng, points, regions, "self_warp", beta)


def _mirrored_landmarks(points: np.ndarray, width: int) -> np.ndarray:
    """Where the landmarks of the mirror image lie: x reflected, left and right eye and mouth corner swapped."""
    flipped = points[[1, 0, 2, 4, 3]].copy()
    flipped[:, 0] = (width - 1) - flipped[:, 0]
    return flipped


def self_mirror(image: np.ndarray, rng: np.random.Generator, landmarks: np.ndarray | None = None,
                regions: tuple[str, ...] = MORPH_REGIONS) -> Attack:
    """``image`` averaged with its mirror image (the mirror's share ``beta`` in [0.35, 0.5]) inside
    a mask over one of ``regions``.

    The mirror is warped so its landmarks land on the photo's (:func:`~.morphs.warp_to`; a
    centred crop without landmarks is mirrored about its middle), then both meet at their
    ``beta`` midpoint along the optical flow between them (:func:`~.morphs.flow_align`). What
    a well-aligned morph of two people leaves: a face more symmetric and regular than either
    contributor, fine texture and noise partly averaged away, and ghosting only where the two
    halves disagree. A symmetric photo with symmetric landmarks is returned as it is.

    Raises:
        ValueError: For an image that is not ``H x W x 3``, bad landmarks or an unknown region.
    """
    x = check_image(image)
    points = _check_landmarks(landmarks)
    mirror = np.ascontiguousarray(x[:, ::-1])
    if points is not None:
        mirror = warp_to(mirror, _mirrored_landmarks(points, x.shape[1]), points).astype(np.float32)
    beta = float(rng.uniform(*TWO_SOURCE_SHARE_RANGE))
    first, second = flow_align(x, mirror, beta)
    morph = ((1.0 - beta) * first + beta * second).astype(np.float32)
    return _paste_in_region(x, morph, rng, points, regions, "self_mirror", beta)


def self_splice(image: np.ndarray, rng: np.random.Generator, landmarks: np.ndarray | None = None) -> Attack:
    """A copy of ``image`` warped by perturbed landmarks, pasted back (share ``beta`` in [0.5, 1])
    through a mask over some face parts or the inner face, with a seam of random width.

    What a spliced morph leaves that a whole-image blend does not: a seam (from an almost hard
    cut to a wide fade, :data:`SEAM_RANGE`), features that sit a little off where the rest of the
    face expects them, and a resampled region in a photo that is not, half the time resampled
    once more (a 1.2-2x down-and-up scaling, as a morph made at another size). The mask covers
    one to three of the eyes, nose and mouth (:func:`parts_mask`) or the inner face, with even
    odds. Without landmarks the copy gets the small affine and elastic move of :func:`self_blend`.

    Raises:
        ValueError: For an image that is not ``H x W x 3`` or bad landmarks.
    """
    x = check_image(image)
    points = _check_landmarks(landmarks)
    if points is None:
        source = _shift_and_warp(x, rng)
    else:
        source = warp_to(x, points, points + _landmark_offset(points, rng)).astype(np.float32)
    if rng.random() < 0.5:
        height, width = x.shape[:2]
        factor = rng.uniform(1.2, 2.0)
        source = resize(resize(source, max(2, round(height / factor)), max(2, round(width / factor))), height, width)
    if rng.random() < 0.5:
        mask, region = parts_mask(x.shape[0], x.shape[1], rng, points), "parts"
    else:
        mask, region = _feather(_face_ellipse(x.shape[0], x.shape[1], points, rng) > 0.5, rng), "face"
    beta = float(rng.uniform(*SPLICE_BETA_RANGE))
    weight = beta * mask
    out = x + weight[..., None] * (source - x)
    return Attack(np.clip(out, 0.0, 1.0), weight, "self_splice", beta, region=region)


def self_texture(image: np.ndarray, rng: np.random.Generator, landmarks: np.ndarray | None = None,
                 regions: tuple[str, ...] = MORPH_REGIONS) -> Attack:
    """``image`` whose fine detail is averaged, inside a mask over one of ``regions``, with
    detail taken from elsewhere in the same photo.

    The detail is ``image`` minus its Gaussian blur (width drawn from :data:`TEXTURE_SIGMA_RANGE`
    pixels); the foreign detail is that detail moved 3-8 pixels (:data:`TEXTURE_SHIFT_RANGE`) in a
    random direction (wrapping at the border) and mirrored left to right half the time, so at
    each pixel it belongs to another place of the face. The two are mixed with the foreign
    share ``beta`` in [0.35, 0.5]; shape and shading (the blurred image) are kept. What a morph
    of two people leaves and a photo does not: two unrelated skin textures and noise patterns
    averaged, which cancel in part, with faint strokes where one texture's edges fall on the
    other's skin. It is the attack that ended the inversion on landmark morphs of another tool
    (examples/README.md, B3): a detector trained on :func:`self_warp` alone learns "irregular =
    attack" and passes such averages as bona fide.

    Raises:
        ValueError: For an image that is not ``H x W x 3``, bad landmarks or an unknown region.
    """
    x = check_image(image)
    points = _check_landmarks(landmarks)
    base = blur(x, float(rng.uniform(*TEXTURE_SIGMA_RANGE)))
    detail = x - base
    angle, distance = rng.uniform(0.0, 2.0 * np.pi), rng.uniform(*TEXTURE_SHIFT_RANGE)
    shift = (round(distance * np.sin(angle)), round(distance * np.cos(angle)))
    foreign = np.roll(detail, shift, axis=(0, 1))
    if rng.random() < 0.5:
        foreign = foreign[:, ::-1]
    beta = float(rng.uniform(*TWO_SOURCE_SHARE_RANGE))
    morph = (base + (1.0 - beta) * detail + beta * foreign).astype(np.float32)
    return _paste_in_region(x, morph, rng, points, regions, "self_texture", beta)


def _pattern(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A periodic grey pattern in [0, 1]: a grid, a checkerboard or stripes, with a random period."""
    yy, xx = np.mgrid[0:height, 0:width]
    period = int(rng.integers(2, 9))
    kind = int(rng.integers(3))
    if kind == 0:
        p = ((yy % period == 0) | (xx % period == 0)).astype(np.float64)
    elif kind == 1:
        p = (((yy // period) + (xx // period)) % 2).astype(np.float64)
    else:
        p = ((xx if rng.random() < 0.5 else yy) % period < period / 2).astype(np.float64)
    return p


def frequency_artifact(image: np.ndarray, weight: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mix a periodic pattern's Fourier magnitude into ``image`` (weight 0.025-0.1, phase kept), inside ``weight``.

    The result equals ``image`` wherever ``weight`` is 0.
    """
    x = check_image(image)
    w = rng.uniform(0.025, 0.1)
    pattern = _pattern(x.shape[0], x.shape[1], rng)
    pattern_magnitude = np.abs(np.fft.fft2(pattern))
    spectrum = np.fft.fft2(x, axes=(0, 1))
    magnitude = (1 - w) * np.abs(spectrum) + w * pattern_magnitude[..., None]
    altered = np.real(np.fft.ifft2(magnitude * np.exp(1j * np.angle(spectrum)), axes=(0, 1))).astype(np.float32)
    mask = np.clip(weight / max(float(weight.max()), 1e-12), 0, 1).astype(np.float32)
    return np.clip(x + mask[..., None] * (altered - x), 0.0, 1.0)


# One entry per synthetic method: ``(image, rng, landmarks, morph_regions) -> Attack``. A new
# method is one function and one entry here; ``synthetic_methods`` (a config key) picks from it.
SYNTHETIC_METHODS: dict[str, Callable[..., Attack]] = {
    "self_blend": lambda image, rng, landmarks, regions: self_blend(image, rng, landmarks),
    "self_morph": self_morph,
    "self_warp": self_warp,
    "self_mirror": self_mirror,
    "self_splice": lambda image, rng, landmarks, regions: self_splice(image, rng, landmarks),
    "self_texture": self_texture,
}
# Self-textures alone: chosen on the dev people's given morphs on the default backbone over three
# seeds (mean AUC 0.876 against 0.775 for self-warps alone; a half-and-half mix of the two was
# level with it on dev and lower on B3; see examples/README.md, "Bona fides alone on the real backbone").
DEFAULT_MIX = (("self_texture", 1.0),)


def parse_mix(entries: Sequence[str]) -> tuple[tuple[str, float], ...]:
    """``synthetic_methods`` as ``(name, share)`` pairs whose shares sum to 1.

    Each entry is a method of :data:`SYNTHETIC_METHODS`, alone (weight 1) or as ``name:weight``:
    ``["self_blend", "self_morph"]`` is an even mix, ``["self_morph:3", "self_blend"]`` three
    self-morphs to one self-blend, ``["self_morph"]`` self-morphs alone.

    Raises:
        ValueError: For an empty list, an unknown or repeated name, or a weight that is not a
            positive number; the message names the entry and the methods there are.
    """
    if not entries:
        raise ValueError(f"synthetic_methods must name at least one of {sorted(SYNTHETIC_METHODS)}")
    weights: dict[str, float] = {}
    for entry in entries:
        name, _, raw = str(entry).partition(":")
        try:
            weight = float(raw) if raw else 1.0
        except ValueError:
            weight = float("nan")
        if name not in SYNTHETIC_METHODS or name in weights or not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"synthetic_methods entry {entry!r} should be a method of {sorted(SYNTHETIC_METHODS)},"
                             " named once, alone or as name:weight with a positive weight")
        weights[name] = weight
    total = sum(weights.values())
    return tuple((name, weight / total) for name, weight in weights.items())


def synthesise(image: np.ndarray, rng: np.random.Generator, landmarks: np.ndarray | None = None,
               frequency_p: float = FREQUENCY_P, morph_regions: tuple[str, ...] = MORPH_REGIONS,
               mix: tuple[tuple[str, float], ...] = DEFAULT_MIX) -> Attack:
    """One raw synthetic attack: a method drawn from ``mix`` (:func:`parse_mix`), plus spectral
    artifacts with ``frequency_p``.

    Raw: not yet matched to the photo's statistics (:func:`match_statistics`) nor augmented.
    ``morph_regions`` are the regions a self-morph may blend (see :func:`self_morph`).
    """
    draw, reached = rng.random(), 0.0
    name = mix[-1][0]  # a sum of shares rounded just below the draw still picks the last method
    for candidate, share in mix:
        reached += share
        if draw < reached:
            name = candidate
            break
    attack = SYNTHETIC_METHODS[name](image, rng, landmarks, morph_regions)
    if rng.random() < frequency_p:
        attack.image = frequency_artifact(attack.image, attack.weight, rng)
        attack.method += "+frequency"
    return attack
