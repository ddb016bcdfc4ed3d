"""Where a run's samples come from: the embedded sets, a folder tree or a CSV manifest, read alike.

Every source yields :class:`~..data.samples.Sample` rows; :func:`load_samples` adds the
identities, faces and splits a run needs, and :func:`evaluation_samples` what ``test`` scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..data.folders import apply_identity_pattern, assign_splits, check_splits, read_csv_manifest, scan_folder
from ..data.recorded import SplitRecord
from ..data.samples import SPLITS, DataError, DataReport, Sample
from ..faces.cropping import WHOLE_IMAGES, CropPolicy
from .lfw import embedded_samples
from .orl import CREDIT, embedded_orl_samples

__all__ = [
    "EVAL_SPLITS",
    "EmbeddedSource",
    "FolderSource",
    "ManifestSource",
    "OrlSource",
    "Source",
    "evaluation_samples",
    "load_samples",
    "open_source",
    "read_source",
]


class Source(Protocol):
    """Where samples come from: the embedded set, a folder tree or a CSV manifest, read alike."""

    description: str

    def read(self, report: DataReport) -> list[Sample]:
        """Every sample the source holds (splits only where the source names them); skips go in ``report``."""
        ...


@dataclass(frozen=True)
class EmbeddedSource:
    """The offline smoke-test faces, with morphs made inside each pool (:func:`embedded_samples`)."""

    seed: int
    methods: tuple[str, ...]
    morphs_per_face: int
    fractions: tuple[float, float]
    description: str = "embedded skimage lfw_subset (100 faces, morphs generated in-process)"

    def read(self, report: DataReport) -> list[Sample]:
        report.notes.append(
            "image pools split 60/20/20 before pairing, but lfw_subset has no identity labels and"
            " repeats some people, so residual identity leakage is possible"
        )
        return embedded_samples(self.seed, list(self.methods), self.morphs_per_face, self.fractions)


@dataclass(frozen=True)
class FolderSource:
    """``ROOT[/<split>]/{bona_fide|bonafide|raw, morph|attack}/[<method>/]...`` (:func:`scan_folder`)."""

    root: Path
    cache: Path | None = None  # keeps each file's check under its content (see check_image)

    @property
    def description(self) -> str:
        return str(self.root)

    def read(self, report: DataReport) -> list[Sample]:
        return scan_folder(self.root, report, self.cache)


@dataclass(frozen=True)
class ManifestSource:
    """A CSV manifest ``path,label[,method,identity,split]`` (:func:`read_csv_manifest`)."""

    path: Path
    cache: Path | None = None  # keeps each file's check under its content (see check_image)

    @property
    def description(self) -> str:
        return str(self.path)

    def read(self, report: DataReport) -> list[Sample]:
        return read_csv_manifest(self.path, report, self.cache)


@dataclass(frozen=True)
class OrlSource:
    """The embedded ORL faces (40 people), split by person, with landmark morphs made inside each
    split (:func:`~.orl.embedded_orl_samples`)."""

    seed: int
    methods: tuple[str, ...]
    morphs_per_face: int
    fractions: tuple[float, float]
    match_contributors: bool = True
    cache: Path | None = None

    @property
    def description(self) -> str:
        return f"embedded {CREDIT}; landmark morphs generated in-process"

    def read(self, report: DataReport) -> list[Sample]:
        samples = embedded_orl_samples(self.seed, list(self.methods), self.morphs_per_face, self.fractions,
                                       self.match_contributors, self.cache)
        people = {split: len({s.identity[0] for s in samples if s.split == split and s.label == 0})
                  for split in SPLITS}
        report.notes.append(
            "split by person: " + ", ".join(f"{k} {v} people" for k, v in people.items())
            + "; morphs pair two people of the same split, so no person is in two splits; morphs "
            + ("given their contributors' mean contrast and sharpness" if self.match_contributors
               else "NOT matched to their contributors (blur and contrast are cues)"))
        return samples


def open_source(data: str | None, seed: int, methods: list[str], morphs_per_face: int,
                fractions: tuple[float, float], *, embedded: str = "lfw_subset", match_contributors: bool = True,
                cache: Path | None = None) -> Source:
    """The source ``data`` names: ``None`` the embedded set (``embedded``: ``orl`` or ``lfw_subset``),
    a ``.csv`` a manifest, else a folder.

    Args:
        match_contributors: ORL morphs get their contributors' contrast and sharpness.
        cache: Folder for the ORL frames and for the checks of data files (:func:`check_image`).
    """
    if data is None and embedded == "orl":
        return OrlSource(seed, tuple(methods), morphs_per_face, fractions, match_contributors, cache)
    if data is None:
        return EmbeddedSource(seed, tuple(methods), morphs_per_face, fractions)
    path = Path(data)
    return ManifestSource(path, cache) if path.suffix.lower() == ".csv" else FolderSource(path, cache)


def read_source(data: str | None, seed: int, methods: list[str], morphs_per_face: int,
                fractions: tuple[float, float], **embedded: Any) -> tuple[list[Sample], DataReport]:
    """Every sample a data set holds, through its :class:`Source`, and the report of what was read.

    Args:
        embedded: ``embedded``, ``match_contributors`` and ``cache`` of :func:`open_source`.

    Raises:
        DataError: If the source is missing, malformed or holds no readable image.
    """
    source = open_source(data, seed, methods, morphs_per_face, fractions, **embedded)
    report = DataReport(source.description)
    samples = source.read(report)
    if not samples:
        n_skipped = sum(report.skipped.values())
        skipped = f"; skipped {n_skipped} files: {dict(report.skipped)}" if n_skipped else ""
        raise DataError(f"no readable images under {str(data)!r}{skipped}")
    return samples, report


def load_samples(data: str | None, seed: int, methods: list[str], morphs_per_face: int,
                 fractions: tuple[float, float],
                 identity_pattern: str | None = None, *, embedded: str = "lfw_subset",
                 match_contributors: bool = True, crop: CropPolicy = WHOLE_IMAGES, cache: Path | None = None,
                 need_morphs: tuple[str, ...] = SPLITS) -> tuple[list[Sample], DataReport]:
    """All samples of a run with their splits, from the embedded set, a folder or a CSV.

    Args:
        identity_pattern: A regex whose named groups read identities from file names (see
            :func:`~.identities.parse_identity_pattern`); applies to samples without an identity.
        embedded: Without ``data``: ``orl`` (the ORL faces, landmark morphs) or ``lfw_subset``.
        match_contributors: ORL morphs get their contributors' contrast and sharpness
            (``morph_match_contributors``).
        crop: With ``face_crop=align``, faces are found now (images without one left out and
            counted) and every image is read as its aligned crop.
        cache: Folder for the ORL frames, the files' checks, face detections and crops.
        need_morphs: The splits that must hold morphs (every split needs bona fides).
    """
    samples, report = read_source(data, seed, methods, morphs_per_face, fractions, embedded=embedded,
                                  match_contributors=match_contributors, cache=cache)
    if data is not None and identity_pattern:
        samples = apply_identity_pattern(samples, identity_pattern, report)
    samples = crop.crop_samples(samples, cache, report)
    if data is not None:
        samples = assign_splits(samples, fractions, seed, report)
    check_splits(samples, report, need_morphs)
    return samples, report


EVAL_SPLITS = ("all", *SPLITS)


def evaluation_samples(data: str | None, split: str, seed: int, methods: list[str], morphs_per_face: int,
                       fractions: tuple[float, float],
                       identity_pattern: str | None = None, *, embedded: str = "lfw_subset",
                       match_contributors: bool = True, crop: CropPolicy = WHOLE_IMAGES,
                       cache: Path | None = None,
                       record: SplitRecord | None = None) -> tuple[list[Sample], list[Sample], DataReport]:
    """The samples ``test`` scores: one split of ``data``, or all of it (``split="all"``: a data set the
    model was not trained on is scored whole, whatever splits it has and whichever classes they lack).

    Args:
        embedded, match_contributors, crop, cache: As for :func:`load_samples`; with
            ``face_crop=align`` images without a face are left out and counted.
        identity_pattern: As for :func:`load_samples`; on a whole data set (``split="all"``), file
            names it finds no identity in leave their images without one (counted in a note).
        record: The split the model file recorded for ``data``: the split's images are those, found
            by content (:meth:`~..data.recorded.SplitRecord.assign`), never computed again.
            Without one (an older model file) the split is computed as ``train`` computed it.

    Returns:
        ``(scored, everything, report)``; ``everything`` is the whole data set (with splits
        where it has them), for the counts and the shortcut baselines' dev images.

    Raises:
        DataError: For an unknown split, a scored set without both classes (naming the counts), or
            a recorded split whose images are no longer all there (naming how many are missing).
    """
    if split not in EVAL_SPLITS:
        raise DataError(f"split {split!r} is not one of {list(EVAL_SPLITS)}")
    samples, report = read_source(data, seed, methods, morphs_per_face, fractions, embedded=embedded,
                                  match_contributors=match_contributors, cache=cache)
    samples = crop.crop_samples(samples, cache, report)
    if data is not None and identity_pattern:
        samples = _named(samples, identity_pattern, report, whole=split == "all")
    if split == "all":
        scored = samples
    else:
        if record is not None:
            samples = _recorded(samples, record, split, report)
        elif data is not None:
            samples = assign_splits(samples, fractions, seed, report)
        scored = [s for s in samples if s.split == split]
    n_bf = sum(s.label == 0 for s in scored)
    if n_bf == 0 or n_bf == len(scored):
        raise DataError(f"the {split} images of {report.source} are {n_bf} bona fide and {len(scored) - n_bf}"
                        " morphs; scoring needs both classes")
    return scored, samples, report


def _named(samples: list[Sample], pattern: str, report: DataReport, whole: bool) -> list[Sample]:
    """Identities from file names (:func:`apply_identity_pattern`). On a whole data set, which may be
    another one named otherwise, they only let :meth:`~..data.recorded.SplitRecord.seen` check people:
    names without one are noted, not an error."""
    try:
        return apply_identity_pattern(samples, pattern, report)
    except DataError as err:
        if not whole:
            raise
        report.notes.append(f"identities not read from file names, so people were not checked: {err}")
        return samples


def _recorded(samples: list[Sample], record: SplitRecord, split: str, report: DataReport) -> list[Sample]:
    """``samples`` in the splits ``record`` gives them; refuses when ``split`` lost recorded images.

    Raises:
        DataError: Naming how many of the split's recorded images no file gives any more.
    """
    samples, missing = record.assign(samples)
    n = len(record.keys[split])
    if missing[split]:
        raise DataError(
            f"the {split} split this model was trained with is no longer all in {report.source}: {missing[split]} of"
            f" its {n} images are missing or changed (no file there has their content); restore them, or score"
            " every image there with --split all")
    new = sum(1 for s in samples if not s.split)
    report.notes.append(f"the {split} split is the one recorded in the model file: its {n} images found by content"
                        + (f"; {new} images not recorded at training (added since) are not in any split" if new
                           else ""))
    return samples
