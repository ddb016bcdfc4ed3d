"""Data sets on disk: folder trees and CSV manifests, read into samples and split.

Splits are decided by identity where identities are known, so no face is shared across
splits by construction; where identities are unknown the report says so.
"""

from __future__ import annotations

import csv
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

import PIL
import PIL.Image

from ..io.config import parse_identity_pattern
from ..io.errors import MadlabError
from ..io.keyed import entry_path, file_key, read_entry, write_entry
from ..io.pixels import UNREADABLE, UnreadableImageError, find_images, load_pixels
from .identities import identities_from_name
from .samples import SPLITS, DataError, DataReport, Sample
from .splits import STRADDLES, plan_splits

__all__ = [
    "apply_identity_pattern",
    "assign_splits",
    "check_image",
    "check_splits",
    "read_csv_manifest",
    "scan_folder",
]

BONA_FIDE_DIRS = ("bona_fide", "bonafide", "raw")
MORPH_DIRS = ("morph", "attack")
SPLIT_DIRS = {"train": "train", "dev": "dev", "val": "dev", "validation": "dev", "test": "test"}
LABEL_NAMES = {
    "0": 0, "bona_fide": 0, "bonafide": 0, "bona fide": 0, "raw": 0, "bf": 0,
    "1": 1, "morph": 1, "attack": 1,
}
TOO_LARGE = UNREADABLE["bomb"]
OUTSIDE = "not in a class folder (not read)"
CHECK_SIZE = 64  # scanning decodes every file in full, but keeps only a small copy of its pixels
# The scan's outcomes that depend on a file's bytes alone, so they can be kept under its content.
_CONTENT_STATUSES = {None, UNREADABLE["empty"], UNREADABLE["not_image"], UNREADABLE["corrupt"], UNREADABLE["bomb"]}
LAYOUT = "ROOT[/<split>]/{bona_fide|bonafide|raw, morph|attack}/[<method>/]<image files, any format Pillow reads>"


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
    if entry is not None and (status in _CONTENT_STATUSES or status.startswith(UNREADABLE["format"])):
        write_entry(entry, {"status": status, "converted": converted})
    return status, converted


def _images_under(folder: Path, report: DataReport) -> list[Path]:
    """The files under ``folder`` to decode (following folder links, never around a loop), whatever
    their names: the decoder, not the extension, decides what is an image. Links that loop or
    dangle and what is no regular file (a FIFO, a device) are skipped and counted unopened."""
    paths = []
    for path, status in find_images(folder):
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


def _count_outside(folder: Path, used: Collection[Path], report: DataReport) -> None:
    """Count, unopened, every file under ``folder`` that none of the ``used`` folders holds: a
    misspelt class folder (``morphs/``) or a stray file must show in the report, not vanish."""
    for child in sorted(folder.iterdir()):
        if child in used:
            continue
        if child.is_dir():
            for path, _ in find_images(child):
                report.skip(str(path), OUTSIDE)
        else:
            report.skip(str(child), OUTSIDE)


def _scan_class_tree(folder: Path, split: str, report: DataReport, cache: Path | None) -> list[Sample]:
    classes = _class_dirs(folder)
    _count_outside(folder, set(classes.values()), report)
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
    outcome for its bytes; files outside the class folders are counted (:data:`OUTSIDE`), unopened.

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
    if splits and classes:
        raise DataError(f"{root} has both split folders {sorted(splits)} and class folders; use one layout: {LAYOUT}")
    if not splits and not classes:
        found = sorted(c.name for c in root.iterdir())[:10]
        raise DataError(f"{root} has no class or split folders (found {found}); expected {LAYOUT}")
    if not splits:
        return _scan_class_tree(root, "", report, cache)
    if "train" not in splits or "test" not in splits:
        raise DataError(f"{root} has split folders {sorted(splits)}; train and test are required (dev optional)")
    _count_outside(root, set(splits.values()), report)
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
            if not image_path.exists():  # a folder or FIFO listed is counted by check_image, unopened
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
