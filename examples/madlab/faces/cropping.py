"""``face_crop=align`` for a run's samples and for ``predict``'s photos: the same aligned crop everywhere.

When the data are loaded, every image is searched for faces. An image without a face is left
out and counted, with the reason, in the data report; an image with several faces keeps the
largest and is counted too. Each kept sample then carries a :class:`~madlab.faces.detection.FaceRef`, so
every reader of its pixels (training, scoring, the shortcut baselines, MAE pretraining) gets
the same aligned crop at the size it asks for, made once and cached as uint8.

What the detector found is cached under the image's content (:mod:`.keyed`: the SHA-256 of a
file's bytes, which are read but not decoded) and the detector's settings, and the crops under
the content, landmarks, size and margin. A second run over the same files therefore decodes
no image and runs no detector; a file whose bytes changed is detected again, and a damaged
entry is made again.

``predict`` scores photos that are no data set: :class:`AlignedReader` turns each photo's path
into its crop the same way and through the same cache (:meth:`CropPolicy.reader`), raises
:class:`~madlab.io.pixels.RejectedImageError` with status ``no face`` for a photo without one, and
can write each crop (``--save_crops``, named by :func:`crop_names`). :class:`CropLandmarks`
hands a sample's 5 landmarks, in its crop's pixel coordinates, to the synthetic attacks
(``attacks=synthetic``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from ..data.images import sample_pixels, sample_rgb8
from ..data.samples import DataError, DataReport, Sample
from ..io.config import Config, ConfigError
from ..io.keyed import content_key, entry_path, file_key, read_entry, write_entry
from ..io.pixels import RejectedImageError
from ..io.shrunk import ShrunkImage, load_rgb8
from .detection import (
    DETECT_MAX_SIDE,
    DETECT_MIN_SIDE,
    SCORE_THRESHOLD,
    YUNET_FILE,
    FaceRef,
    detect_faces,
    require_detector,
    save_crop,
)

__all__ = [
    "NO_FACE",
    "NO_FACE_STATUS",
    "WHOLE_IMAGES",
    "AlignedReader",
    "CropLandmarks",
    "CropPolicy",
    "crop_names",
    "detection",
    "find_faces",
    "save_crops",
]

NO_FACE = "no face found by the detector (face_crop=align)"
NO_FACE_STATUS = "no face"  # predict's status column
_DETECTOR_KEY = f"{YUNET_FILE}-{SCORE_THRESHOLD}-{DETECT_MIN_SIDE}-{DETECT_MAX_SIDE}"


def _sample_key(sample: Sample) -> str:
    """The content key of ``sample``: of its pixels in memory, else of its file's bytes (not decoded).

    Raises:
        DataError: If the file cannot be read any more (it was readable when scanned).
    """
    if sample.image is not None:
        return content_key(sample.image)
    key = file_key(sample.path)
    if key is None:
        raise DataError(f"could not read {sample.path!r} (it was readable when scanned)")
    return key


def _valid_detection(entry: dict) -> bool:
    """An entry :func:`detection` may trust: a face count, and 5 finite landmarks when it is not 0."""
    faces = entry["faces"]
    if not isinstance(faces, int) or isinstance(faces, bool) or faces < 0:
        return False
    marks = np.asarray(entry["landmarks"], dtype=np.float64) if faces else np.zeros((5, 2))
    return marks.shape == (5, 2) and bool(np.isfinite(marks).all())


def detection(key: str, read: Callable[..., ShrunkImage], cache: Path | None) -> dict:
    """What the detector finds in the image of content ``key``: from the cache, or detected now.

    Args:
        key: The image's content key (:func:`~madlab.io.keyed.file_key` or
            :func:`~madlab.io.keyed.content_key`).
        read: ``read(longest=n)`` gives the image shrunk to a longer side of at least ``n``
            (:func:`~madlab.io.shrunk.load_rgb8`); called only when the cache has no valid entry.
            The detector looks at :data:`DETECT_MAX_SIDE` pixels at most: more are not read.
        cache: The cache root (entries under ``<cache>/faces/detections/``), or ``None``.

    Returns:
        ``{"faces": n, "landmarks": 5 x 2 list (x, y) of the largest face or None, "score": ...}``;
        landmarks in the full-resolution image's pixel coordinates, whatever size it was read at.
    """
    entry = None if cache is None else entry_path(Path(cache) / "faces", "detections", key, _DETECTOR_KEY)
    if entry is not None and (found := read_entry(entry, _valid_detection)) is not None:
        return found
    image = read(longest=DETECT_MAX_SIDE)
    faces = detect_faces(image.pixels)
    found = {"faces": len(faces), "landmarks": image.full_coordinates(faces[0].landmarks).tolist() if faces else None,
             "score": faces[0].score if faces else None}
    if entry is not None:
        write_entry(entry, found)
    return found


def find_faces(samples: list[Sample], margin: float, cache: str | Path | None, report: DataReport) -> list[Sample]:
    """Give every sample with a face its :class:`~madlab.faces.detection.FaceRef`; leave out and count the others.

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
        found = detection(key, partial(sample_rgb8, sample), root)
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


def crop_names(paths: Sequence[str]) -> dict[str, str]:
    """The file name each input's crop gets in a ``--save_crops`` folder: never one for two inputs.

    Each input keeps its stem (``a/x.jpg`` -> ``x.png``). An input whose stem an earlier one (in
    the order given) already has gets the first free ``<stem>-2.png``, ``<stem>-3.png``, ...
    that is no input's own stem, so ``a/x.jpg`` and ``b/x.png`` give ``x.png`` and ``x-2.png``.
    Names are compared ignoring case, as macOS and Windows file systems do. The same path
    given twice is one input and gets one name.

    Returns:
        ``path -> file name`` for every distinct path.
    """
    stems = {Path(p).stem.casefold() for p in paths}
    taken: set[str] = set()
    names: dict[str, str] = {}
    for path in paths:
        if path in names:
            continue
        stem = name = Path(path).stem
        number = 1
        while name.casefold() in taken or (number > 1 and name.casefold() in stems):
            number += 1
            name = f"{stem}-{number}"
        taken.add(name.casefold())
        names[path] = f"{name}.png"
    return names


def save_crops(samples: list[Sample], size: int, folder: str | Path) -> list[Path]:
    """Write the aligned crop of every sample that has one into ``folder``, named by :func:`crop_names`.

    For ``predict --save_crops DIR``: users see what the detector saw. Samples without a face
    (no :class:`~madlab.faces.detection.FaceRef`) are not written.

    Returns:
        The written paths, in sample order.
    """
    with_face = [sample for sample in samples if sample.face is not None]
    names = crop_names([sample.path for sample in with_face])
    return [save_crop(sample_pixels(sample, size), names[sample.path], folder) for sample in with_face]


@dataclass(frozen=True)
class AlignedReader:
    """``predict``'s reader for ``face_crop=align``: a photo's path in, its aligned crop out.

    The crop is made as for a data set's sample (:func:`find_faces`, then
    :meth:`~madlab.faces.detection.FaceRef.crop`: the photo read at the size each step needs, the
    largest face, the same template and margin) and through the same cache, so a photo that
    ``train``, ``test`` or an earlier ``predict`` saw is neither decoded nor detected again, and
    its crop is the same. A photo is decoded only when its detection or crop is not cached.

    Args:
        size: The model's input side.
        margin: ``face_margin`` of the model file.
        cache: The cache root (``--cache_dir``, ``$LORA_VIT_CACHE``), or ``None``: no cache.
        save_to: A folder to write each crop to (``--save_crops``), or ``None``.
        names: ``path -> file name`` in ``save_to`` (:func:`crop_names`); a path not in it is
            named after its own stem.

    Raises:
        RejectedImageError: With status ``no face`` when the detector finds none, or an
            :class:`~madlab.io.pixels.UnreadableImageError` for a file that cannot be decoded
            (that image's row says so; the run goes on).
    """

    size: int
    margin: float
    cache: str | None = None
    save_to: str | None = None
    names: Mapping[str, str] = field(default_factory=dict, repr=False)

    def __call__(self, path: str) -> np.ndarray:
        """``size x size x 3`` float32 crop in [0, 1] of the photo at ``path``."""
        read = partial(load_rgb8, path)
        key = file_key(path)
        if key is None:  # not readable: let the decoder say why (missing, folder, permission, loop)
            key = content_key(read(longest=DETECT_MAX_SIDE).pixels)
        cache = None if self.cache is None else Path(self.cache)
        found = detection(key, read, cache)
        if not found["faces"]:
            raise RejectedImageError(path, NO_FACE_STATUS)
        face = FaceRef(key, np.asarray(found["landmarks"], dtype=np.float64), self.margin,
                       None if cache is None else str(cache / "faces"))
        crop = face.crop(self.size, read)
        if self.save_to is not None:
            save_crop(crop, self.names.get(path, Path(path).name), self.save_to)
        return crop


@dataclass(frozen=True)
class CropPolicy:
    """What every command feeds the detector: each photo's largest face aligned by 5 landmarks
    (``face_crop=align``, with ``margin``), or the whole image (``margin`` None).

    Built once per command from its config (:meth:`from_config`), the one place that reads
    ``face_crop`` and ``face_margin``; data loading, synthetic attacks and ``predict`` ask it.
    """

    margin: float | None = None

    @classmethod
    def from_config(cls, config: Config) -> CropPolicy:
        return cls(config.face_margin if config.face_crop == "align" else None)

    @property
    def aligns(self) -> bool:
        return self.margin is not None

    def crop_samples(self, samples: list[Sample], cache: str | Path | None, report: DataReport) -> list[Sample]:
        """The samples read as their aligned crops (:func:`find_faces`), or unchanged for whole images.

        Raises:
            FaceCropError: If the face detector cannot run here (checked before any image).
        """
        if self.margin is None:
            return samples
        require_detector()
        return find_faces(samples, self.margin, cache, report)

    def landmarks(self, size: int) -> CropLandmarks | None:
        """Each sample's 5 landmarks at ``size`` px for synthetic attacks' masks; None for whole images."""
        return CropLandmarks(size) if self.aligns else None

    def reader(self, size: int, cache: str | Path | None = None, save_crops: str | Path | None = None,
               paths: Sequence[str] = ()) -> AlignedReader | None:
        """How ``predict`` reads each photo: its aligned face crop, or ``None`` for the whole image.

        Args:
            cache: The cache root for detections and crops, or ``None``.
            save_crops: A folder to write each crop to, or ``None``.
            paths: The inputs, in order, for the crops' names (:func:`crop_names`).

        Raises:
            ConfigError: If crops are to be saved but the model reads whole images (``face_crop=none``).
            FaceCropError: If the face detector cannot run here: one error, not a failed row per photo.
        """
        if self.margin is None:
            if save_crops is not None:
                raise ConfigError(f"--save_crops {save_crops} writes aligned face crops, but this model was trained"
                                  " with face_crop=none (whole images): there are no crops to save")
            return None
        require_detector()
        return AlignedReader(size, self.margin, None if cache is None else str(cache),
                             None if save_crops is None else str(save_crops), crop_names(list(paths)))

    def describe(self) -> str:
        """One line for a command's log: what the detector sees."""
        if self.margin is None:
            return "whole images (face_crop=none)"
        return f"each photo's largest face aligned by 5 landmarks (face_margin {self.margin:g})"


WHOLE_IMAGES = CropPolicy()


@dataclass(frozen=True)
class CropLandmarks:
    """A sample's 5 landmarks (eyes, nose tip, mouth corners) in the pixel coordinates of its
    ``size x size`` aligned crop, or None for a sample without a found face: the ``landmarks``
    callable of :class:`~madlab.attacks.sets.SyntheticTrainSet` and :class:`~madlab.attacks.sets.FixedAttackSet`.

    Shapes:
        returns ``(5, 2)`` as ``(x, y)``.
    """

    size: int

    def __call__(self, sample: Sample) -> np.ndarray | None:
        return None if sample.face is None else sample.face.crop_landmarks(self.size)
