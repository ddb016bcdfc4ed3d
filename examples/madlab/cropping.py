"""``face_crop=align`` for a run's samples and for ``predict``'s photos: the same aligned crop everywhere.

When the data are loaded, every image is searched for faces (the result cached by the
image's content, so a second run detects nothing). An image without a face is left out and
counted, with the reason, in the data report; an image with several faces keeps the largest
and is counted too. Each kept sample then carries a :class:`~madlab.faces.FaceRef`, so every
reader of its pixels (training, scoring, the shortcut baselines, MAE pretraining) gets the
same aligned crop at the size it asks for, made once and cached as uint8.

``predict`` scores photos that are no data set: :class:`AlignStep` is its per-image step,
which detects and crops each photo as :func:`find_faces` and :class:`~madlab.faces.FaceRef` do
(full-resolution pixels, the largest face, the same template and margin), raises
:class:`~madlab.pixels.RejectedImageError` with status ``no face`` for a photo without one, and
can write each crop (``--save_crops``). :class:`CropLandmarks` hands a sample's 5 landmarks, in
its crop's pixel coordinates, to the synthetic attacks (``attacks=synthetic``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from .config import Config, ConfigError
from .data import DataReport, Sample
from .faces import (
    DETECT_MAX_SIDE,
    DETECT_MIN_SIDE,
    SCORE_THRESHOLD,
    YUNET_FILE,
    FaceRef,
    align,
    content_key,
    detect_faces,
    save_crop,
)
from .files import write_text_atomically
from .images import sample_pixels
from .pixels import RejectedImageError

__all__ = ["NO_FACE", "NO_FACE_STATUS", "AlignStep", "CropLandmarks", "find_faces", "predict_steps", "save_crops"]

NO_FACE = "no face found by the detector (face_crop=align)"
NO_FACE_STATUS = "no face"  # predict's status column
_DETECTOR_KEY = f"{YUNET_FILE}-{SCORE_THRESHOLD}-{DETECT_MIN_SIDE}-{DETECT_MAX_SIDE}"


def _sample_key(sample: Sample) -> str:
    if sample.image is not None:
        return content_key(sample.image)
    return content_key(Path(sample.path).read_bytes())


def _detection(sample: Sample, key: str, cache: Path | None) -> dict:
    """``{"faces": n, "landmarks": 5 x 2 list or None}`` for ``sample``, from the cache or detected now."""
    path = None if cache is None else cache / "faces" / "detections" / key[:2] / f"{key}-{_DETECTOR_KEY}.json"
    if path is not None and path.is_file():
        try:
            found = json.loads(path.read_text())
            if isinstance(found.get("faces"), int):
                return found
        except (OSError, ValueError):
            pass  # a damaged entry is detected again
    faces = detect_faces(sample_pixels(sample))
    found = {"faces": len(faces), "landmarks": faces[0].landmarks.tolist() if faces else None,
             "score": faces[0].score if faces else None}
    if path is not None:
        write_text_atomically(path, json.dumps(found))
    return found


def find_faces(samples: list[Sample], margin: float, cache: str | Path | None, report: DataReport) -> list[Sample]:
    """Give every sample with a face its :class:`~madlab.faces.FaceRef`; leave out and count the others.

    Args:
        samples: The run's samples (files or in-memory images).
        margin: ``face_margin``: share of the face square added on each side of the crop.
        cache: Folder for detections and crops (``None``: nothing is cached).
        report: Receives one skip per image without a face and a note with the counts.

    Returns:
        The samples that have a face, in their order.
    """
    root = None if cache is None else Path(cache)
    kept, missing, several = [], Counter(), 0
    for sample in samples:
        key = _sample_key(sample)
        found = _detection(sample, key, root)
        if not found["faces"]:
            report.skip(sample.path, NO_FACE)
            missing["bona_fide" if sample.label == 0 else f"morph/{sample.method}"] += 1
            continue
        several += found["faces"] > 1
        sample.face = FaceRef(key, np.asarray(found["landmarks"], dtype=np.float64), margin,
                              None if root is None else str(root / "faces"))
        kept.append(sample)
    without = (f"; {sum(missing.values())} without a face were left out ({dict(sorted(missing.items()))})"
               if missing else "; every image had a face")
    report.notes.append(
        f"face_crop=align: {len(kept)} images aligned by 5 landmarks (YuNet) with margin {margin:g}{without};"
        f" {several} had several faces (the largest was used)")
    return kept


def save_crops(samples: list[Sample], size: int, folder: str | Path) -> list[Path]:
    """Write the aligned crop of every sample that has one as ``<folder>/<input stem>.png``.

    For ``predict --save_crops DIR``: users see what the detector saw. Samples without a face
    (no :class:`~madlab.faces.FaceRef`) are not written.

    Returns:
        The written paths, in sample order.
    """
    written = []
    for sample in samples:
        if sample.face is None:
            continue
        pixels = sample_pixels(sample, size)
        written.append(save_crop(pixels, Path(sample.path).name, folder))
    return written


@dataclass(frozen=True)
class AlignStep:
    """``predict``'s per-image step for ``face_crop=align``: full-resolution pixels in, the aligned crop out.

    Args:
        size: The model's input side.
        margin: ``face_margin`` of the model file.
        save_to: A folder to write each crop to as ``<input stem>.png`` (``--save_crops``), or None.

    Raises:
        RejectedImageError: With status ``no face`` when the detector finds none (that image's
            row says so; the run goes on).
    """

    size: int
    margin: float
    save_to: str | None = None
    # The crop is made from the full-resolution photo, as train and test make it; predict reads this.
    full_resolution: ClassVar[bool] = True

    def __call__(self, pixels: np.ndarray, path: str) -> np.ndarray:
        crop, _ = align(pixels, self.size, self.margin)
        if crop is None:
            raise RejectedImageError(path, NO_FACE_STATUS)
        if self.save_to is not None:
            save_crop(crop, Path(path).name, self.save_to)
        return crop.astype(np.float32) / np.float32(255.0)


def predict_steps(config: Config, size: int, save_crops: str | Path | None = None) -> list[AlignStep]:
    """The per-image steps ``predict`` runs for a model trained with ``config``: the face crop it was
    trained on (``face_crop=align``), or none.

    Raises:
        ConfigError: If crops are to be saved but the model reads whole images (``face_crop=none``).
    """
    if config.face_crop != "align":
        if save_crops is not None:
            raise ConfigError(f"--save_crops {save_crops} writes aligned face crops, but this model was trained with"
                              " face_crop=none (whole images): there are no crops to save")
        return []
    return [AlignStep(size, config.face_margin, None if save_crops is None else str(save_crops))]


@dataclass(frozen=True)
class CropLandmarks:
    """A sample's 5 landmarks (eyes, nose tip, mouth corners) in the pixel coordinates of its
    ``size x size`` aligned crop, or None for a sample without a found face: the ``landmarks``
    callable of :class:`~madlab.attacks.SyntheticTrainSet` and :class:`~madlab.attacks.FixedAttackSet`.

    Shapes:
        returns ``(5, 2)`` as ``(x, y)``.
    """

    size: int

    def __call__(self, sample: Sample) -> np.ndarray | None:
        return None if sample.face is None else sample.face.crop_landmarks(self.size)
