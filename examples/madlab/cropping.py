"""``face_crop=align`` for a run's samples: find each face once, count what has none, crop on use.

When the data are loaded, every image is searched for faces (the result cached by the
image's content, so a second run detects nothing). An image without a face is left out and
counted, with the reason, in the data report; an image with several faces keeps the largest
and is counted too. Each kept sample then carries a :class:`~madlab.faces.FaceRef`, so every
reader of its pixels (training, scoring, the shortcut baselines, MAE pretraining) gets the
same aligned crop at the size it asks for, made once and cached as uint8.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from .data import DataReport, Sample
from .faces import (
    DETECT_MAX_SIDE,
    DETECT_MIN_SIDE,
    SCORE_THRESHOLD,
    YUNET_FILE,
    FaceRef,
    content_key,
    detect_faces,
    save_crop,
)
from .files import write_text_atomically
from .images import sample_pixels

__all__ = ["NO_FACE", "find_faces", "save_crops"]

NO_FACE = "no face found by the detector (face_crop=align)"
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
