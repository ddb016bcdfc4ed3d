"""Samples and splits: the embedded ``lfw_subset`` smoke test, folder trees and CSV manifests.

Every source yields :class:`Sample` rows with a split (train/dev/test). Splits are decided
before any pairing (embedded) and by identity where identities are known, so no face is
shared across splits by construction; where identities are unknown the report says so.
"""

from __future__ import annotations

import csv
import itertools
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import PIL
import PIL.Image

from .errors import MadlabError
from .identities import identities_from_name, parse_identity_pattern
from .keyed import entry_path, file_key, read_entry, write_entry
from .morphs import morph
from .pixels import UNREADABLE, UnreadableImageError, find_images, load_pixels
from .splits import STRADDLES, plan_splits

__all__ = [
    "DataError",
    "DataReport",
    "EmbeddedSource",
    "FolderSource",
    "ManifestSource",
    "OrlSource",
    "Sample",
    "Source",
    "apply_identity_pattern",
    "assign_splits",
    "check_splits",
    "embedded_samples",
    "evaluation_samples",
    "load_samples",
    "open_source",
    "read_csv_manifest",
    "read_source",
    "scan_folder",
]

SPLITS = ("train", "dev", "test")
BONA_FIDE_DIRS = ("bona_fide", "bonafide", "raw")
MORPH_DIRS = ("morph", "attack")
SPLIT_DIRS = {"train": "train", "dev": "dev", "val": "dev", "validation": "dev", "test": "test"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LABEL_NAMES = {
    "0": 0, "bona_fide": 0, "bonafide": 0, "bona fide": 0, "raw": 0, "bf": 0,
    "1": 1, "morph": 1, "attack": 1,
}
TOO_LARGE = UNREADABLE["bomb"]
CHECK_SIZE = 64  # scanning decodes every file in full, but keeps only a small copy of its pixels
# The scan's outcomes that depend on a file's bytes alone, so they can be kept under its content.
_CONTENT_STATUSES = {None, UNREADABLE["empty"], UNREADABLE["not_image"], UNREADABLE["corrupt"], UNREADABLE["bomb"]}


class DataError(MadlabError):
    """A dataset that cannot be used as given; the message names the path and what is expected."""


@dataclass
class Sample:
    """One image. ``label`` 0 = bona fide, 1 = morph; ``method`` is the PAIS for morphs."""

    path: str
    label: int
    method: str
    split: str = ""
    identity: tuple[str, ...] = ()
    image: np.ndarray | None = field(default=None, repr=False)  # HxWx3 float in [0,1], in memory
    # A madlab.faces.FaceRef once face_crop=align found the face: pixels are then its aligned crop.
    face: Any = field(default=None, repr=False)


@dataclass
class DataReport:
    """What was loaded, converted and skipped, for the terminal and for metrics.json."""

    source: str
    notes: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)  # every one, for metrics.json
    converted: Counter = field(default_factory=Counter)

    def skip(self, path: str, reason: str) -> None:
        self.skipped[reason] += 1
        self.skipped_files.append(f"{path}: {reason}")
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(f"{path}: {reason}")

    def to_dict(self, samples: list[Sample]) -> dict:
        counts: dict[str, dict[str, int]] = {}
        for s in samples:
            key = "bona_fide" if s.label == 0 else f"morph/{s.method}"
            counts.setdefault(s.split, Counter())[key] += 1
        return {
            "source": self.source,
            "counts": {k: dict(v) for k, v in counts.items()},
            "skipped": dict(self.skipped),
            "skipped_examples": self.skipped_examples,
            "skipped_files": self.skipped_files,
            "converted_to_rgb": dict(self.converted),
            "notes": self.notes,
        }

    def lines(self, samples: list[Sample]) -> list[str]:
        info = self.to_dict(samples)
        out = [f"data: {self.source}"]
        for split in (*SPLITS, ""):
            if split in info["counts"]:
                out.append(f"  {split or 'no split'}: "
                           + ", ".join(f"{k}={v}" for k, v in sorted(info["counts"][split].items())))
        if self.skipped:
            out.append(f"  skipped {sum(self.skipped.values())} files: {dict(self.skipped)}")
            out += [f"    e.g. {e}" for e in self.skipped_examples]
        if self.converted:
            out.append(f"  converted to RGB: {dict(self.converted)}")
        out += [f"  note: {n}" for n in self.notes]
        return out


# --------------------------------------------------------------------------- embedded


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


# --------------------------------------------------------------------------- images on disk


def check_image(path: Path, report: DataReport, cache: Path | None = None) -> bool:
    """Decode ``path`` once (:func:`~.pixels.load_pixels`); count and skip it if it cannot be read,
    count what had to be converted (grey, palette, CMYK, 16-bit, EXIF-rotated, animated).

    Args:
        cache: Folder where the outcome is kept under the file's content (:func:`_checked`),
            so a later scan of the same bytes decodes nothing; ``None``: always decode.
    """
    status, converted = _checked(path, cache)
    if status is not None:
        report.skip(str(path), status)
        return False
    if converted:
        report.converted[converted] += 1
    return True


def _check_settings() -> str:
    # What else decides a file's outcome besides its bytes: the decoder and its size limit.
    return f"{CHECK_SIZE}-pillow{PIL.__version__}-{PIL.Image.MAX_IMAGE_PIXELS}"


def _valid_check(entry: dict) -> bool:
    return all(entry.get(k) is None or isinstance(entry[k], str) for k in ("status", "converted"))


def _checked(path: Path, cache: Path | None) -> tuple[str | None, str | None]:
    """``(status, converted)`` of decoding ``path``: the cached outcome for its bytes, or decoded now.

    Only outcomes the bytes decide are cached (readable, not an image, corrupt, too large,
    empty); a file that cannot even be read is not keyed and :func:`~.pixels.load_pixels` says why.
    """
    key = None if cache is None else file_key(path)
    entry = None if key is None else entry_path(Path(cache) / "scan", "checks", key, _check_settings())
    if entry is not None and (found := read_entry(entry, _valid_check)) is not None:
        return found.get("status"), found.get("converted")
    try:
        _, converted = load_pixels(path, CHECK_SIZE)
        status = None
    except UnreadableImageError as err:
        status, converted = err.status, None
    if entry is not None and status in _CONTENT_STATUSES:
        write_entry(entry, {"status": status, "converted": converted})
    return status, converted


def _images_under(folder: Path, report: DataReport) -> list[Path]:
    """The ``.jpg/.jpeg/.png`` files under ``folder`` (following folder links, never around a loop); links
    that loop or dangle are skipped and counted."""
    paths = []
    for path, status in find_images(folder, frozenset(IMAGE_SUFFIXES)):
        if status is None:
            paths.append(path)
        else:
            report.skip(str(path), status)
    return paths


def _class_dirs(folder: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for child in sorted(folder.iterdir()):
        if not child.is_dir():
            continue
        name = child.name.lower()
        label = 0 if name in BONA_FIDE_DIRS else 1 if name in MORPH_DIRS else None
        if label is None:
            continue
        if label in found:
            raise DataError(f"{folder} has two folders for the same class: {found[label].name} and {child.name}")
        found[label] = child
    return found


def _scan_class_tree(folder: Path, split: str, report: DataReport, cache: Path | None) -> list[Sample]:
    classes = _class_dirs(folder)
    samples = []
    for label, class_dir in sorted(classes.items()):
        for path in _images_under(class_dir, report):
            if not check_image(path, report, cache):
                continue
            rel = path.relative_to(class_dir).parts
            # The first folder under morph/ names the morphing method (PAIS).
            method = "bona_fide" if label == 0 else (rel[0] if len(rel) > 1 else class_dir.name.lower())
            samples.append(Sample(str(path), label, method, split))
    return samples


def scan_folder(root: str | Path, report: DataReport, cache: Path | None = None) -> list[Sample]:
    """Read ``ROOT[/<split>]/{bona_fide|bonafide|raw, morph|attack}/[<method>/]...`` recursively.

    Split folders are ``train``, ``dev`` (or ``val``/``validation``) and ``test``. Without
    them the returned samples have an empty split, to be assigned by :func:`assign_splits`.
    Every file is decoded once to check it (:func:`check_image`), unless ``cache`` holds the
    outcome for its bytes.

    Raises:
        DataError: If ``root`` is missing, has neither class folders nor split folders, or
            mixes both.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist or is not a folder")
    splits = {
        SPLIT_DIRS[c.name.lower()]: c for c in sorted(root.iterdir()) if c.is_dir() and c.name.lower() in SPLIT_DIRS
    }
    classes = _class_dirs(root)
    layout = "ROOT[/<split>]/{bona_fide|bonafide|raw, morph|attack}/[<method>/]*.{jpg,jpeg,png}"
    if splits and classes:
        raise DataError(f"{root} has both split folders {sorted(splits)} and class folders; use one layout: {layout}")
    if not splits and not classes:
        found = sorted(c.name for c in root.iterdir())[:10]
        raise DataError(f"{root} has no class or split folders (found {found}); expected {layout}")
    if not splits:
        return _scan_class_tree(root, "", report, cache)
    if "train" not in splits or "test" not in splits:
        raise DataError(f"{root} has split folders {sorted(splits)}; train and test are required (dev optional)")
    samples = []
    for split, folder in splits.items():
        if not _class_dirs(folder):
            raise DataError(f"split folder {folder} has no bona_fide/bonafide/raw or morph/attack folder")
        samples += _scan_class_tree(folder, split, report, cache)
    return samples


def read_csv_manifest(path: str | Path, report: DataReport, cache: Path | None = None) -> list[Sample]:
    """Read a manifest with header ``path,label[,method,identity,split]``.

    Relative paths are relative to the CSV's folder. ``label`` is 0/1 or
    bona_fide/bonafide/raw/morph/attack. ``identity`` may list a morph's contributors
    joined by ``+``. ``split`` is train/dev/val/test or empty. Each listed file is checked as
    :func:`scan_folder` checks it (``cache`` as there).

    Raises:
        DataError: For a missing file or column, or an unknown label or split (naming the row).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CSV manifest {str(path)!r} does not exist")
    samples = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        if "path" not in columns or "label" not in columns:
            raise DataError(
                f"{path} must have a header with at least path,label (optional method,identity,split); got {columns}")
        reader.fieldnames = columns
        for row_no, row in enumerate(reader, start=2):
            raw_label = (row.get("label") or "").strip().lower()
            if raw_label not in LABEL_NAMES:
                raise DataError(f"{path} line {row_no}: label {row.get('label')!r} is not one of {sorted(LABEL_NAMES)}")
            label = LABEL_NAMES[raw_label]
            split_raw = (row.get("split") or "").strip().lower()
            if split_raw and split_raw not in SPLIT_DIRS:
                raise DataError(f"{path} line {row_no}: split {split_raw!r} is not one of {sorted(SPLIT_DIRS)}")
            image_path = Path((row.get("path") or "").strip())
            if not str(image_path) or str(image_path) == ".":
                raise DataError(f"{path} line {row_no}: empty path")
            if not image_path.is_absolute():
                image_path = path.parent / image_path
            if not image_path.is_file():
                report.skip(str(image_path), "file listed in the manifest does not exist")
                continue
            if not check_image(image_path, report, cache):
                continue
            method = (row.get("method") or "").strip() or ("bona_fide" if label == 0 else "morph")
            identity = tuple(i for i in (row.get("identity") or "").strip().split("+") if i)
            samples.append(Sample(str(image_path), label, "bona_fide" if label == 0 else method,
                                  SPLIT_DIRS.get(split_raw, ""), identity))
    if not samples:
        skipped = f"; skipped {sum(report.skipped.values())} rows: {dict(report.skipped)}" if report.skipped else ""
        raise DataError(f"{path} lists no readable images{skipped}")
    return samples


# --------------------------------------------------------------------------- splitting

def apply_identity_pattern(samples: list[Sample], pattern: str, report: DataReport) -> list[Sample]:
    """Copies of ``samples`` where each one without an identity has the identities ``pattern`` finds in
    its file name.

    Raises:
        DataError: If the pattern is invalid or finds no identity in some file names (naming
            how many and a few of them), so that a split is never silently made by image.
    """
    try:
        compiled = parse_identity_pattern(pattern)
    except MadlabError as err:
        raise DataError(str(err)) from None
    missing, named = [], []
    for s in samples:
        found = s.identity or identities_from_name(compiled, Path(s.path).name, s.label)
        if found is None:
            missing.append(Path(s.path).name)
        else:
            named.append(replace(s, identity=found))
    if missing:
        raise DataError(
            f"identity_pattern={pattern!r} finds no identity in {len(missing)} of {len(samples)} file names"
            f" (a bona fide needs exactly one matching named group, a morph at least one), e.g. {missing[:3]}")
    report.notes.append(f"identities read from file names by identity_pattern={pattern!r}")
    return named


def assign_splits(samples: list[Sample], fractions: tuple[float, float], seed: int, report: DataReport) -> list[Sample]:
    """Samples with their splits, by the plan :func:`~.splits.plan_splits` makes (see there); the
    dropped ones are counted in ``report`` with their reasons, and the plan's notes added to it.
    The samples given are not changed: new ones are returned.

    Raises:
        DataError: If some samples have a split and others do not.
    """
    with_split = sum(1 for s in samples if s.split)
    if with_split and with_split != len(samples):
        raise DataError(f"{with_split} samples have a split and {len(samples) - with_split} do not;"
                        " give a split for all or none")
    plan = plan_splits(samples, fractions, seed)
    for k, reason in sorted(plan.dropped.items()):
        report.skip(samples[k].path, reason)
    report.notes += plan.notes
    return plan.apply(samples)


def check_splits(samples: list[Sample], report: DataReport | None = None,
                 need_morphs: tuple[str, ...] = SPLITS) -> None:
    """Refuse to go on when a split lacks bona fides, or morphs where ``need_morphs`` names it.

    A run with synthetic attacks (``attacks=synthetic``) needs no morphs in train and dev.

    Raises:
        DataError: Naming the split and its counts, and how many samples identity checks dropped.
    """
    dropped = sum(n for reason, n in (report.skipped.items() if report else ())
                  if reason == STRADDLES or reason.startswith("identity already in"))
    why = f" (after dropping {dropped} samples to keep identities out of two splits)" if dropped else ""
    for split in SPLITS:
        n_bf = sum(1 for s in samples if s.split == split and s.label == 0)
        n_m = sum(1 for s in samples if s.split == split and s.label == 1)
        if n_bf == 0 or (n_m == 0 and split in need_morphs):
            needs = ("every split needs both classes" if set(need_morphs) == set(SPLITS) else
                     f"every split needs bona fides, and {'/'.join(need_morphs) or 'no split'} also morphs")
            raise DataError(f"the {split} split has {n_bf} bona fide and {n_m} morph images{why}; {needs}")


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
        from .orl import CREDIT

        return f"embedded {CREDIT}; landmark morphs generated in-process"

    def read(self, report: DataReport) -> list[Sample]:
        from .orl import embedded_orl_samples  # orl builds on Sample: imported on use, one way

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
        raise DataError(f"no readable .jpg/.jpeg/.png images under {str(data)!r}{skipped}")
    return samples, report


def load_samples(data: str | None, seed: int, methods: list[str], morphs_per_face: int,
                 fractions: tuple[float, float],
                 identity_pattern: str | None = None, *, embedded: str = "lfw_subset",
                 match_contributors: bool = True, face_margin: float | None = None, cache: Path | None = None,
                 need_morphs: tuple[str, ...] = SPLITS) -> tuple[list[Sample], DataReport]:
    """All samples of a run with their splits, from the embedded set, a folder or a CSV.

    Args:
        identity_pattern: A regex whose named groups read identities from file names (see
            :func:`~.identities.parse_identity_pattern`); applies to samples without an identity.
        embedded: Without ``data``: ``orl`` (the ORL faces, landmark morphs) or ``lfw_subset``.
        match_contributors: ORL morphs get their contributors' contrast and sharpness
            (``morph_match_contributors``).
        face_margin: With a value, ``face_crop=align``: faces are found now (images without
            one left out and counted) and every image is read as its aligned crop.
        cache: Folder for the ORL frames, the files' checks, face detections and crops.
        need_morphs: The splits that must hold morphs (every split needs bona fides).
    """
    samples, report = read_source(data, seed, methods, morphs_per_face, fractions, embedded=embedded,
                                  match_contributors=match_contributors, cache=cache)
    if data is not None and identity_pattern:
        samples = apply_identity_pattern(samples, identity_pattern, report)
    if face_margin is not None:
        samples = _faces(samples, face_margin, cache, report)
    if data is not None:
        samples = assign_splits(samples, fractions, seed, report)
    check_splits(samples, report, need_morphs)
    return samples, report


def _faces(samples: list[Sample], margin: float, cache: Path | None, report: DataReport) -> list[Sample]:
    from .cropping import find_faces  # cropping reads pixels through images, which imports this module

    return find_faces(samples, margin, cache, report)


EVAL_SPLITS = ("all", *SPLITS)


def evaluation_samples(data: str | None, split: str, seed: int, methods: list[str], morphs_per_face: int,
                       fractions: tuple[float, float],
                       identity_pattern: str | None = None, *, embedded: str = "lfw_subset",
                       match_contributors: bool = True, face_margin: float | None = None,
                       cache: Path | None = None) -> tuple[list[Sample], list[Sample], DataReport]:
    """The samples ``test`` scores: one split of ``data``, or all of it (``split="all"``: a data set the
    model was not trained on is scored whole, whatever splits it has and whichever classes they lack).

    Args:
        embedded, match_contributors, face_margin, cache: As for :func:`load_samples`; with
            ``face_margin`` (``face_crop=align``) images without a face are left out and counted.

    Returns:
        ``(scored, everything, report)``; ``everything`` is the whole data set (with splits
        where it has them), for the counts and the shortcut baselines' dev images.

    Raises:
        DataError: For an unknown split, or a scored set without both classes (naming the counts).
    """
    if split not in EVAL_SPLITS:
        raise DataError(f"split {split!r} is not one of {list(EVAL_SPLITS)}")
    samples, report = read_source(data, seed, methods, morphs_per_face, fractions, embedded=embedded,
                                  match_contributors=match_contributors, cache=cache)
    if face_margin is not None:
        samples = _faces(samples, face_margin, cache, report)
    if split == "all":
        scored = samples
    else:
        if data is not None:
            if identity_pattern:
                samples = apply_identity_pattern(samples, identity_pattern, report)
            samples = assign_splits(samples, fractions, seed, report)
        scored = [s for s in samples if s.split == split]
    n_bf = sum(s.label == 0 for s in scored)
    if n_bf == 0 or n_bf == len(scored):
        raise DataError(f"the {split} images of {report.source} are {n_bf} bona fide and {len(scored) - n_bf}"
                        " morphs; scoring needs both classes")
    return scored, samples, report
