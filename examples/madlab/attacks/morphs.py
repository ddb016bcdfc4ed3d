"""Two-person morphs: the given morph methods, in one registry.

:data:`MORPH_METHODS` maps each method to how it combines two faces already on one shape
(``(a, b, alpha, face) -> morph``, ``face`` a soft inner-face mask). A new method is one
function and one entry there; config, data sources, figures and docs read the names from it.
Two methods give two attack species (PAIS) so that per-method reporting runs:

* ``blend``: the whole images averaged, leaving ghosting everywhere (an OpenCV-style morph
  with border points).
* ``splice``: the averaged inner face pasted into the first contributor through a soft
  elliptical mask, so hair and background stay sharp and only a blended face remains (a
  "combined" morph as in AMSL).

Two ways to bring the faces onto one shape: :func:`morph` takes crops that are already
aligned (the ``lfw_subset`` smoke test: a centred mask), :func:`landmark_morph` warps two
aligned frames onto the average of their 5 landmarks (the ORL default) and, with
``dense=True``, then meets them halfway along the optical flow between them
(:func:`flow_align`), as tools with dense landmark meshes align jaw, brows and glasses that
5 points leave apart.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.spatial import Delaunay

from .masks import ellipse

__all__ = ["METHODS", "MORPH_METHODS", "blend", "flow_align", "inner_face_mask", "landmark_morph", "morph",
           "morph_method", "splice", "warp_to"]

def blend(a: np.ndarray, b: np.ndarray, alpha: float = 0.5, face: np.ndarray | None = None) -> np.ndarray:
    """``(1 - alpha) * a + alpha * b`` of two float images in [0, 1] of the same shape (``face`` unused)."""
    if a.shape != b.shape:
        raise ValueError(f"contributors must have the same shape, got {a.shape} and {b.shape}")
    return (1.0 - alpha) * a + alpha * b


def inner_face_mask(height: int, width: int, softness: float = 1.2) -> np.ndarray:
    """A soft ellipse over the inner face (eyes to chin) of a centred crop, values in [0, 1]."""
    hard = ellipse(height, width, (0.55 * (height - 1), 0.5 * (width - 1)), (0.36 * height, 0.30 * width))
    # Blurring the hard mask feathers the seam, as splicing tools do before pasting.
    return np.clip(gaussian_filter(hard, sigma=softness * height / 25.0), 0.0, 1.0)


def splice(a: np.ndarray, b: np.ndarray, alpha: float = 0.5, face: np.ndarray | None = None) -> np.ndarray:
    """Paste the ``alpha`` blend of ``a`` and ``b`` into ``a`` inside ``face`` (an ``H x W`` mask in
    [0, 1]; default :func:`inner_face_mask`, the inner face of a centred crop)."""
    mask = inner_face_mask(a.shape[0], a.shape[1]) if face is None else face
    if a.ndim == 3:
        mask = mask[..., None]
    return mask * blend(a, b, alpha) + (1.0 - mask) * a


# One entry per given morph method: ``(a, b, alpha, face) -> morph`` of two faces on one shape.
MORPH_METHODS: dict[str, Callable[[np.ndarray, np.ndarray, float, np.ndarray | None], np.ndarray]] = {
    "blend": blend,
    "splice": splice,
}
METHODS = tuple(MORPH_METHODS)


def morph_method(method: str) -> Callable[[np.ndarray, np.ndarray, float, np.ndarray | None], np.ndarray]:
    """The combining function of ``method``.

    Raises:
        ValueError: For an unknown method (the message lists :data:`METHODS`).
    """
    if method not in MORPH_METHODS:
        raise ValueError(f"unknown morph method {method!r}; choose from {tuple(MORPH_METHODS)}")
    return MORPH_METHODS[method]


def morph(method: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The 50/50 ``method`` morph of two crops that are already aligned (the mask is centred).

    Raises:
        ValueError: For an unknown method (the message lists :data:`METHODS`).
    """
    return morph_method(method)(a, b, 0.5, None)


def _with_border(points: np.ndarray, size: int) -> np.ndarray:
    edge, mid = size - 1.0, (size - 1.0) / 2.0
    border = [(0, 0), (mid, 0), (edge, 0), (edge, mid), (edge, edge), (mid, edge), (0, edge), (0, mid)]
    return np.vstack([points, np.array(border, dtype=np.float64)])


@functools.lru_cache(maxsize=8)
def _pixel_centres(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel's ``x`` and ``y``, row by row, as float64 (read-only: shared between calls)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    xs, ys = xs.ravel(), ys.ravel()
    xs.flags.writeable = ys.flags.writeable = False
    return xs, ys


def warp_to(image: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Piecewise-affine warp of ``image`` moving its ``source`` landmarks onto ``target``.

    The landmarks plus 8 frame-border points are triangulated (Delaunay, on ``target``);
    each output pixel is mapped back by its triangle's affine map and sampled bilinearly.

    Args:
        image: ``H x W`` (or ``H x W x C``) float image.
        source, target: ``N x 2`` landmarks ``(x, y)`` in ``image`` and in the output.

    Shapes:
        Returns an array of ``image``'s shape.
    """
    import cv2

    h, w = image.shape[:2]
    src = _with_border(np.asarray(source, np.float64), w)
    dst = _with_border(np.asarray(target, np.float64), w)
    tri = Delaunay(dst).simplices
    # Each triangle's affine map from output to source coordinates, (triangles, 2, 3).
    ones = np.ones((len(tri), 3, 1))
    to_src = np.linalg.solve(np.concatenate([dst[tri], ones], axis=2), src[tri]).transpose(0, 2, 1)
    # Which triangle each output pixel lies in: the triangles rasterised into a label map
    # (sub-pixel vertices); a pixel on a shared edge maps the same through either triangle.
    label = np.full((h, w), -1, np.int32)
    for k, corners in enumerate(dst[tri]):
        cv2.fillConvexPoly(label, np.round(corners * 16).astype(np.int32), k, lineType=cv2.LINE_8, shift=4)
    if (label < 0).any():  # pragma: no cover - the frame corners are vertices, so the hull is the frame
        label[label < 0] = 0
    xs, ys = _pixel_centres(h, w)
    # Each pixel's map, term by term (a gather of six numbers per pixel, no (N, 2, 3) product).
    a = to_src.reshape(len(tri), 6)[label.ravel()]
    map_x = (a[:, 0] * xs + a[:, 1] * ys + a[:, 2]).reshape(h, w).astype(np.float32)
    map_y = (a[:, 3] * xs + a[:, 4] * ys + a[:, 5]).reshape(h, w).astype(np.float32)
    return cv2.remap(np.asarray(image, np.float32), map_x, map_y, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE).astype(np.float64)


def _face_mask(landmarks: np.ndarray, size: int) -> np.ndarray:
    """A soft ellipse over the inner face (brows to chin, cheek to cheek) around 5 landmarks."""
    eyes, mouth = landmarks[:2].mean(axis=0), landmarks[3:].mean(axis=0)
    span = float(np.hypot(*(landmarks[1] - landmarks[0])))
    centre = eyes + 0.6 * (mouth - eyes)
    ry, rx = 1.25 * span, 0.95 * span
    hard = ellipse(size, size, (centre[1], centre[0]), (ry, rx))
    return np.clip(gaussian_filter(hard, sigma=0.12 * span), 0.0, 1.0)


def flow_align(a: np.ndarray, b: np.ndarray, alpha: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``a`` and ``b`` moved onto their weighted midpoint along the dense optical flow between them.

    The flow ``f`` (Farneback, on the grey images) says where each pixel of ``a`` lies in ``b``;
    the output pixel ``x`` reads ``a`` at ``x - alpha * f(x)`` and ``b`` at ``x + (1 - alpha) * f(x)``,
    so features both faces share (eye corners, glasses, jaw line) meet where a weighted
    average of their positions puts them.

    Args:
        a, b: ``H x W`` or ``H x W x C`` float images in [0, 1] of one shape, already roughly aligned.
        alpha: Weight of ``b`` (0: the result sits on ``a``'s shape; 1: on ``b``'s).

    Returns:
        The two moved images, float64, of the input shape.
    """
    import cv2

    def grey(x: np.ndarray) -> np.ndarray:
        x = x.mean(axis=2) if x.ndim == 3 else x
        return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)

    h, w = a.shape[:2]
    # A window of about an eighth of the face follows features without locking onto noise.
    flow = cv2.calcOpticalFlowFarneback(grey(a), grey(b), None, pyr_scale=0.5, levels=3,
                                        winsize=max(5, h // 8) | 1, iterations=5, poly_n=5, poly_sigma=1.1, flags=0)
    xs, ys = (c.reshape(h, w).astype(np.float32) for c in _pixel_centres(h, w))

    def moved(image: np.ndarray, share: float) -> np.ndarray:
        return cv2.remap(np.asarray(image, np.float32), xs + share * flow[..., 0], ys + share * flow[..., 1],
                         cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE).astype(np.float64)

    return moved(a, -alpha), moved(b, 1.0 - alpha)


def landmark_morph(method: str, a: np.ndarray, la: np.ndarray, b: np.ndarray, lb: np.ndarray,
                   alpha: float = 0.5, dense: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A landmark morph of two aligned grey frames in [0, 1].

    Both frames are warped onto the weighted average of their landmarks (:func:`warp_to`),
    with ``dense`` also brought together along their optical flow (:func:`flow_align`), then
    combined by ``method`` with a soft inner-face ellipse around those landmarks.

    Args:
        method: A method of :data:`MORPH_METHODS` (``blend``: whole frames averaged; ``splice``:
            the blended face in ``a``'s frame).
        a, b: ``S x S`` (or ``S x S x C``) float images; ``la``, ``lb``: their ``5 x 2`` landmarks.
        alpha: Weight of ``b`` (0.5 for attacks).
        dense: Whether to align what lies between the landmarks too.

    Returns:
        The morph and its landmarks (the weighted average shape).

    Raises:
        ValueError: For an unknown method.
    """
    combine = morph_method(method)
    shape = (1.0 - alpha) * la + alpha * lb
    wa, wb = warp_to(a, la, shape), warp_to(b, lb, shape)
    if dense:
        wa, wb = flow_align(wa, wb, alpha)
    return np.clip(combine(wa, wb, alpha, _face_mask(shape, a.shape[0])), 0.0, 1.0), shape
