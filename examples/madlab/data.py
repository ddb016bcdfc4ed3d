"""Samples and splits: the embedded ``lfw_subset`` smoke test, folder trees and CSV manifests.

Every source yields :class:`Sample` rows with a split (train/dev/test). Splits are decided
before any pairing (embedded) and by identity where identities are known, so no face is
shared across splits by construction; where identities are unknown the report says so.
"""

from __future__ import annotations

import csv
import itertools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import MadlabError
from .identities import identities_from_name, leaks, parse_identity_pattern, partition_identities, straddling
from .morphs import morph

__all__ = [
    "DataError",
    "DataReport",
    "Sample",
    "apply_identity_pattern",
    "assign_splits",
    "check_splits",
    "embedded_samples",
    "load_samples",
    "read_csv_manifest",
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
# Modes that convert to RGB without inventing colour information we do not have.
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B"}  # 16-bit grayscale: scaled by 1/65535, not clipped at 255
_CONVERTIBLE = {"L", "LA", "P", "RGBA", *_SIXTEEN_BIT}
TOO_LARGE = "image too large (over Pillow's decompression-bomb limit of 2 x Image.MAX_IMAGE_PIXELS)"


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


@dataclass
class DataReport:
    """What was loaded, converted and skipped, for the terminal and for metrics.json."""

    source: str
    notes: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)
    converted: Counter = field(default_factory=Counter)

    def skip(self, path: str, reason: str) -> None:
        self.skipped[reason] += 1
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
            "converted_to_rgb": dict(self.converted),
            "notes": self.notes,
        }

    def lines(self, samples: list[Sample]) -> list[str]:
        info = self.to_dict(samples)
        out = [f"data: {self.source}"]
        for split in SPLITS:
            if split in info["counts"]:
                out.append(f"  {split}: " + ", ".join(f"{k}={v}" for k, v in sorted(info["counts"][split].items())))
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


def check_image(path: Path, report: DataReport) -> bool:
    """Open and fully decode ``path``; count and skip it if it is unreadable or not convertible to RGB."""
    try:
        with Image.open(path) as img:
            img.load()  # decodes the pixels, so truncated files fail here and not mid-training
            mode = img.mode
    except Image.DecompressionBombError:
        report.skip(str(path), TOO_LARGE)
        return False
    except (UnidentifiedImageError, OSError, ValueError) as err:
        report.skip(str(path), f"unreadable or corrupt image ({type(err).__name__})")
        return False
    if mode != "RGB":
        if mode not in _CONVERTIBLE:
            report.skip(str(path), f"image mode {mode} is not RGB or convertible (L, LA, P, RGBA, I;16)")
            return False
        report.converted[mode] += 1
    return True


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


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


def _scan_class_tree(folder: Path, split: str, report: DataReport) -> list[Sample]:
    classes = _class_dirs(folder)
    samples = []
    for label, class_dir in sorted(classes.items()):
        for path in _images_under(class_dir):
            if not check_image(path, report):
                continue
            rel = path.relative_to(class_dir).parts
            # The first folder under morph/ names the morphing method (PAIS).
            method = "bona_fide" if label == 0 else (rel[0] if len(rel) > 1 else class_dir.name.lower())
            samples.append(Sample(str(path), label, method, split))
    return samples


def scan_folder(root: str | Path, report: DataReport) -> list[Sample]:
    """Read ``ROOT[/<split>]/{bona_fide|bonafide|raw, morph|attack}/[<method>/]...`` recursively.

    Split folders are ``train``, ``dev`` (or ``val``/``validation``) and ``test``. Without
    them the returned samples have an empty split, to be assigned by :func:`assign_splits`.

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
        return _scan_class_tree(root, "", report)
    if "train" not in splits or "test" not in splits:
        raise DataError(f"{root} has split folders {sorted(splits)}; train and test are required (dev optional)")
    samples = []
    for split, folder in splits.items():
        if not _class_dirs(folder):
            raise DataError(f"split folder {folder} has no bona_fide/bonafide/raw or morph/attack folder")
        samples += _scan_class_tree(folder, split, report)
    return samples


def read_csv_manifest(path: str | Path, report: DataReport) -> list[Sample]:
    """Read a manifest with header ``path,label[,method,identity,split]``.

    Relative paths are relative to the CSV's folder. ``label`` is 0/1 or
    bona_fide/bonafide/raw/morph/attack. ``identity`` may list a morph's contributors
    joined by ``+``. ``split`` is train/dev/val/test or empty.

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
            if not check_image(image_path, report):
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

STRADDLES = "morph contributors fall into different splits"


def _leak_reason(earlier: str) -> str:
    return f"identity already in the {earlier} split (dropped from the later split)"


def apply_identity_pattern(samples: list[Sample], pattern: str, report: DataReport) -> None:
    """Give every sample without an identity the identities ``pattern`` finds in its file name.

    Raises:
        DataError: If the pattern is invalid or finds no identity in some file names (naming
            how many and a few of them), so that a split is never silently made by image.
    """
    try:
        compiled = parse_identity_pattern(pattern)
    except MadlabError as err:
        raise DataError(str(err)) from None
    missing = []
    for s in samples:
        if s.identity:
            continue
        found = identities_from_name(compiled, Path(s.path).name, s.label)
        if found is None:
            missing.append(Path(s.path).name)
        else:
            s.identity = found
    if missing:
        raise DataError(
            f"identity_pattern={pattern!r} finds no identity in {len(missing)} of {len(samples)} file names"
            f" (a bona fide needs exactly one matching named group, a morph at least one), e.g. {missing[:3]}")
    report.notes.append(f"identities read from file names by identity_pattern={pattern!r}")


def _split_by_identity(samples: list[Sample], fractions: dict[str, float], seed: int, report: DataReport,
                       what: str) -> list[Sample]:
    """Split ``samples`` (all with identities) by :func:`partition_identities`; drop and count the morphs
    whose contributors land in different splits."""
    groups = [s.identity for s in samples]
    where = partition_identities(groups, fractions, seed)
    cut = set(straddling(groups, where))
    kept, dropped = [], Counter()
    for k, s in enumerate(samples):
        if k in cut:
            report.skip(s.path, STRADDLES)
            dropped[s.method] += 1
            continue
        s.split = where[s.identity[0]]
        kept.append(s)
    sizes = Counter(where.values())
    n_morph = sum(1 for s in samples if s.label == 1)
    lost = (f"{sum(dropped.values())} of {n_morph} morphs had contributors in different splits and were dropped"
            f" (by method: {dict(sorted(dropped.items()))})" if dropped else f"all {n_morph} morphs kept")
    report.notes.append(
        f"{what}: {len(where)} identities ({', '.join(f'{k} {sizes[k]}' for k in fractions)}), none shared"
        f" across splits, identities linked by morphs kept together where possible; {lost}")
    return kept


def _drop_leaks(samples: list[Sample], report: DataReport) -> list[Sample]:
    """Given splits: drop each sample of a later split whose identity is already in an earlier one, and say so."""
    n_known = sum(1 for s in samples if s.identity)
    if n_known == 0:
        report.notes.append(
            "WARNING: splits are given but no identities, so nothing checks whether a person appears in more than"
            " one split; results can be optimistic. Give identities (a CSV identity column, or identity_pattern"
            " for file names) to check")
        return samples
    found = leaks([s.split for s in samples], [s.identity for s in samples])
    per_split: Counter = Counter()
    for k, earlier in found.items():
        report.skip(samples[k].path, _leak_reason(earlier))
        per_split[f"{samples[k].split}/{'bona_fide' if samples[k].label == 0 else 'morph'}"] += 1
    if found:
        report.notes.append(
            f"identities checked across the given splits: dropped {len(found)} samples whose identity (bona fide)"
            f" or contributor (morph) is already in an earlier split: {dict(sorted(per_split.items()))}")
    else:
        report.notes.append("identities checked across the given splits: no identity is in two splits")
    if n_known < len(samples):
        report.notes.append(f"WARNING: {len(samples) - n_known} of {len(samples)} samples have no identity and"
                            " could not be checked for identities shared across splits")
    return [s for k, s in enumerate(samples) if k not in found]


def _carve_dev(samples: list[Sample], seed: int, report: DataReport) -> list[Sample]:
    """No dev split given: a quarter of train becomes dev, by identity when every train sample has one."""
    train = [s for s in samples if s.split == "train"]
    others = [s for s in samples if s.split != "train"]
    if train and all(s.identity for s in train):
        kept = _split_by_identity(train, {"train": 0.75, "dev": 0.25}, seed, report,
                                  "no dev split given: 25% of the train identities became dev")
        return others + kept
    rng = np.random.default_rng(seed)
    for s in train:
        if rng.random() < 0.25:
            s.split = "dev"
    report.notes.append("WARNING: no dev split given and the train samples have no identities: 25% of train,"
                        " by image, became dev, so a person may be in both train and dev (dev figures and"
                        " the threshold can be optimistic)")
    return samples


def assign_splits(samples: list[Sample], fractions: tuple[float, float], seed: int, report: DataReport) -> list[Sample]:
    """Check or assign every sample's split, never silently letting an identity into two splits.

    * Splits given: a sample of a later split (train < dev < test) whose identity or morph
      contributor is already in an earlier split is dropped and counted; without identities
      a warning says this cannot be checked. Without a dev split, 25 % of train becomes
      dev, by identity when identities are known.
    * No splits, every sample with identities: identities are partitioned
      (:func:`~.identities.partition_identities`) and morphs whose contributors still land in
      different splits are dropped and counted.
    * Otherwise by image, stratified by class and method, with a warning.

    Raises:
        DataError: If some samples have a split and others do not.
    """
    with_split = sum(1 for s in samples if s.split)
    if with_split == len(samples):
        samples = _drop_leaks(samples, report)
        if not any(s.split == "dev" for s in samples):
            samples = _carve_dev(samples, seed, report)
        return samples
    if with_split:
        raise DataError(f"{with_split} samples have a split and {len(samples) - with_split} do not;"
                        " give a split for all or none")
    if all(s.identity for s in samples):
        shares = {"train": fractions[0], "dev": fractions[1], "test": 1.0 - fractions[0] - fractions[1]}
        return _split_by_identity(samples, shares, seed, report, "split by identity")
    rng = np.random.default_rng(seed)
    groups: dict[tuple[int, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.label, s.method), []).append(s)
    for group in groups.values():
        order = rng.permutation(len(group))
        n_train = max(1, round(fractions[0] * len(group)))
        n_dev = max(1, round(fractions[1] * len(group)))
        for rank, k in enumerate(order):
            group[k].split = "train" if rank < n_train else "dev" if rank < n_train + n_dev else "test"
    missing = sum(1 for s in samples if not s.identity)
    report.notes.append(
        f"WARNING: {missing} of {len(samples)} samples have no identity: split by image (stratified by class and"
        " method); the same person may appear in several splits, so results can be optimistic. Give a CSV with an"
        " identity column, identity_pattern for file names, or split folders, to avoid this"
    )
    return samples


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


def load_samples(data: str | None, seed: int, methods: list[str], morphs_per_face: int,
                 fractions: tuple[float, float],
                 identity_pattern: str | None = None,
                 need_morphs: tuple[str, ...] = SPLITS) -> tuple[list[Sample], DataReport]:
    """All samples of a run with their splits, from the embedded set, a folder or a CSV.

    Args:
        identity_pattern: A regex whose named groups read identities from file names (see
            :func:`~.identities.parse_identity_pattern`); applies to samples without an identity.
        need_morphs: The splits that must hold morphs (every split needs bona fides).
    """
    if data is None:
        report = DataReport("embedded skimage lfw_subset (100 faces, morphs generated in-process)")
        report.notes.append(
            "image pools split 60/20/20 before pairing, but lfw_subset has no identity labels and"
            " repeats some people, so residual identity leakage is possible"
        )
        samples = embedded_samples(seed, methods, morphs_per_face, fractions)
    else:
        path = Path(data)
        report = DataReport(str(path))
        is_csv = path.suffix.lower() == ".csv"
        samples = read_csv_manifest(path, report) if is_csv else scan_folder(path, report)
        if not samples:
            n_skipped = sum(report.skipped.values())
            skipped = f"; skipped {n_skipped} files: {dict(report.skipped)}" if n_skipped else ""
            raise DataError(f"no readable .jpg/.jpeg/.png images under {str(path)!r}{skipped}")
        if identity_pattern:
            apply_identity_pattern(samples, identity_pattern, report)
        samples = assign_splits(samples, fractions, seed, report)
    check_splits(samples, report, need_morphs)
    return samples, report


# --------------------------------------------------------------------------- tensors


def _load_pixels(sample: Sample, size: int | None = None) -> np.ndarray:
    """HxWx3 float pixels in [0, 1]. Images far larger than ``size`` are first shrunk by an integer
    box filter (JPEG: in the decoder), so a 50-megapixel photo never becomes a 1 GB float array."""
    if sample.image is not None:
        return sample.image
    try:
        with Image.open(sample.path) as img:
            if size and img.format == "JPEG":
                img.draft("RGB", (2 * size, 2 * size))
            if img.mode in _SIXTEEN_BIT:  # PIL's convert("RGB") would clip 16-bit values at 255
                gray = np.asarray(img, dtype=np.float32) / 65535.0
                return np.repeat(gray[..., None], 3, axis=2)
            img = img.convert("RGB")
            factor = min(img.size) // (2 * size) if size else 0
            if factor >= 2:
                img = img.reduce(factor)
            return np.asarray(img, dtype=np.float32) / np.float32(255.0)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"could not read {sample.path!r} (it was readable when scanned): {err}") from None


def __getattr__(name: str):
    # ImageDataset moved to images.py (decoding, caching, loaders); old imports keep working.
    if name == "ImageDataset":
        from .images import ImageDataset

        return ImageDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
