"""``predict``: unlabelled photos in, one CSV row of decisions per file out, in input order.

Inputs are image files, folders (every file in them, recursively, following links but never
around a loop: the decoder, not the name, decides what is an image, and every file gets a row)
and list files (``.txt``: one path a line; ``.csv``: a header with a ``path`` column),
relative paths taken from the list's folder. Each file is read (decoded, or for a
``face_crop=align`` model turned into its aligned face crop through the face cache,
:class:`~.cropping.AlignedReader`), resized and normalised exactly as ``test`` does it
(:func:`~.images.resize_pixels`, :meth:`~.detector.Detector.normalise`),
then scored in batches by the one :class:`~.detector.Detector`.

A file that cannot be scored gets a row with its ``status`` (see :data:`~.pixels.UNREADABLE`)
and empty score cells; it never stops the run. A reader or a per-image step (``steps``: pixels
in, pixels out, after reading) that raises :class:`~.pixels.RejectedImageError` (a face
detector finding no face, say) marks only that image, with its own status.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data.images import resize_pixels
from ..evaluation.report import p_morph
from ..faces.cropping import CropPolicy
from ..io.errors import MadlabError
from ..io.files import write_text_atomically
from ..io.pixels import RejectedImageError, find_images, load_pixels
from .detector import Detector

__all__ = [
    "EXIT_SOME_FAILED",
    "PREDICT_COLUMNS",
    "Prediction",
    "expand_inputs",
    "run_predict",
    "run_predictions",
    "summary",
    "write_predictions",
]

PREDICT_COLUMNS = ["path", "status", "logit", "p_morph", "decision"]
EXIT_SOME_FAILED = 4  # predict's exit status when some inputs got no score (0: all scored; 2: an error)
LIST_SUFFIXES = (".txt", ".csv", ".lst")
OK = "ok"

Step = Callable[[np.ndarray, str], np.ndarray]
Reader = Callable[[str], np.ndarray]  # a path in, H x W x 3 float pixels in [0, 1] out


@dataclass
class Prediction:
    """One CSV row: a file, whether it was scored, and the logit and decision if it was."""

    path: str
    status: str = OK
    logit: float | None = None

    def row(self, threshold: float) -> list[str]:
        if self.logit is None:
            return [self.path, self.status, "", "", ""]
        decision = "morph" if self.logit >= threshold else "bona_fide"
        return [self.path, self.status, repr(self.logit), repr(float(p_morph(self.logit))), decision]


class InputError(MadlabError):
    """An ``--input`` that names nothing usable at all (the run stops before scoring)."""


def _read_list(path: Path) -> list[Prediction]:
    """The paths a ``.txt``/``.lst`` (one per line, ``#`` comments) or ``.csv`` (``path`` column) lists.

    Raises:
        InputError: If the file cannot be read, or (``.csv``) has no ``path`` column or an empty
            path cell, naming the file and the line.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read the list file {str(path)!r}: {err}") from None
    if path.suffix.lower() == ".csv":
        names = _csv_paths(path, text)
    else:
        names = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [Prediction(str(p if p.is_absolute() else path.parent / p)) for p in map(Path, names)]


def _csv_paths(path: Path, text: str) -> list[str]:
    """The ``path`` column of a CSV list, blank lines skipped. A header is required: without one, the
    first file named would be taken for a column name and lost, or a CSV of other columns read as paths."""
    reader = csv.reader(io.StringIO(text))
    header = [c.strip().lower() for c in next(reader, [])]
    if "path" not in header:
        raise InputError(f"{path} line 1: a .csv list needs a header with a 'path' column, got {header};"
                         " list one path a line in a .txt file for a plain list")
    column = header.index("path")
    names = []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        name = row[column].strip() if len(row) > column else ""
        if not name:
            raise InputError(f"{path} line {reader.line_num}: the 'path' cell is empty")
        names.append(name)
    return names


def expand_inputs(inputs: Sequence[str]) -> list[Prediction]:
    """Every file the ``--input`` arguments name, in their order (a folder's files sorted by path).

    A missing path gets a row saying so rather than stopping the run.

    Raises:
        InputError: If no input was given, or a list file cannot be read (or a ``.csv`` list has
            no ``path`` column or an empty path cell).
    """
    if not inputs:
        raise InputError("predict needs at least one --input (an image, a folder, or a .txt/.csv list of paths)")
    rows: list[Prediction] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            rows += [Prediction(str(f), status or OK) for f, status in find_images(path)]
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            rows += _read_list(path)
        else:
            rows.append(Prediction(str(path)))  # an image, or a missing/odd path its row will name
    return rows


class _Inputs(Dataset):
    """Read, run the per-image steps, resize: ``(uint8 3 x S x S or None, status, index)``."""

    def __init__(self, paths: list[str], size: int, steps: Sequence[Step], read: Reader | None) -> None:
        self.paths, self.size, self.steps, self.read = paths, size, list(steps), read

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, str, int]:
        path = self.paths[index]
        try:
            pixels = self.read(path) if self.read is not None else load_pixels(path, self.size)[0]
            for step in self.steps:
                pixels = step(pixels, path)
            return resize_pixels(pixels, self.size), OK, index
        except RejectedImageError as err:
            return None, err.status, index
        except MemoryError:
            return None, "out of memory while decoding", index
        except Exception as err:  # a hostile file must cost its own row, never the run
            return None, f"could not read ({type(err).__name__})", index


def _collate(items: list[tuple[torch.Tensor | None, str, int]]) -> tuple[torch.Tensor | None, list[str], list[int]]:
    images = [x for x, _, _ in items if x is not None]
    return (torch.stack(images) if images else None, [s for _, s, _ in items], [i for _, _, i in items])


def run_predictions(detector: Detector, rows: list[Prediction], *, batch_size: int, num_workers: int,
                    progress: bool, steps: Sequence[Step] = (), read: Reader | None = None) -> float:
    """Score every row that is still ``ok`` in place; return the seconds scoring took.

    Args:
        steps: Per-image preprocessing run after reading and before resizing (see the module
            docstring); each takes ``(pixels H x W x 3 float in [0, 1], path)``.
        read: Turns a path into pixels (``H x W x 3`` float in [0, 1]), e.g. the aligned face
            crop (:meth:`~..faces.cropping.CropPolicy.reader`); ``None``: the decoded image.
    """
    todo = [k for k, r in enumerate(rows) if r.status == OK]
    inputs = _Inputs([rows[k].path for k in todo], detector.image_size, steps, read)
    loader = DataLoader(inputs, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc="predict", unit="img", disable=not progress, leave=False)
    for images, statuses, indices in loader:
        scored = [i for i, s in zip(indices, statuses) if s == OK]
        for i, status in zip(indices, statuses):
            rows[todo[i]].status = status
        if images is not None:
            logits = detector.score(detector.normalise(images))
            for i, logit in zip(scored, logits):
                if np.isfinite(logit):
                    rows[todo[i]].logit = float(logit)
                else:  # a diverged model: no decision can be read from it
                    rows[todo[i]].status = "non-finite logit"
        bar.update(len(indices))
    bar.close()
    return time.perf_counter() - start


def write_predictions(path: Path, rows: list[Prediction], threshold: float) -> None:
    """The CSV (``path,status,logit,p_morph,decision``), one row per input file, written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(PREDICT_COLUMNS)
    writer.writerows(r.row(threshold) for r in rows)
    write_text_atomically(path, buffer.getvalue())


def summary(rows: list[Prediction], threshold: float, seconds: float) -> str:
    """One line: counts by status and decision, and the scoring speed."""
    scored = [r for r in rows if r.logit is not None]
    morphs = sum(r.logit >= threshold for r in scored)
    failed = Counter(r.status for r in rows if r.logit is None)
    speed = len(scored) / seconds if seconds > 0 else 0.0
    failures = f", {sum(failed.values())} failed {dict(failed)}" if failed else ", 0 failed"
    return (f"predict: {len(rows)} files: {len(scored)} scored ({morphs} morph, {len(scored) - morphs} bona_fide)"
            f"{failures}; {speed:.1f} images/s")


def run_predict(model_path: str, inputs: Sequence[str], output: str | os.PathLike[str], *,
                operating_point: str = "dev", overrides: Sequence[str] = (), backbone: str | None = None,
                progress: bool = False, say: Callable[[str], None] = print, steps: Sequence[Step] = (),
                save_crops: str | os.PathLike[str] | None = None,
                cache: str | os.PathLike[str] | None = None) -> tuple[int, str]:
    """The ``predict`` command: score every input file and write the CSV.

    A model trained with ``face_crop=align`` scores each photo's aligned face crop, as ``train``
    and ``test`` did (:meth:`~..faces.cropping.CropPolicy.reader`), through the face cache in ``cache``
    (``None``: none); a photo without a face gets status ``no face``. ``save_crops`` writes each
    crop into that folder as ``<input stem>.png``, ``<input stem>-2.png`` for a second input of
    the same stem, and so on (:func:`~.cropping.crop_names`).

    Returns:
        The exit status (0 when every file was scored, :data:`EXIT_SOME_FAILED` when any was not)
        and the one-line result (:func:`summary`), which the command ends with.

    Raises:
        MadlabError: For a model file, operating point or input list that cannot be used at all
            (nothing is written then).
    """
    detector = Detector.load(model_path, list(overrides), backbone)
    threshold = detector.threshold(operating_point)
    rows = expand_inputs(inputs)
    crop = CropPolicy.from_config(detector.config)
    read = crop.reader(detector.image_size, cache, save_crops, [r.path for r in rows if r.status == OK])
    say(f"predict: {len(rows)} files from {len(inputs)} input(s); operating point {operating_point}"
        f" (tau = {threshold['value']:.4f}, rule {threshold['rule']}); {detector.precision},"
        f" {'compiled' if detector.net is not detector.model else 'eager'}, batch {detector.config.batch_size}")
    if crop.aligns:
        say(f"predict: {crop.describe()}, as in training; photos without a face get status 'no face'"
            + (f"; crops written to {Path(save_crops)}{os.sep}{_renamed(read.names)}" if save_crops is not None
               else ""))
    seconds = run_predictions(detector, rows, batch_size=detector.config.batch_size,
                              num_workers=detector.config.num_workers, progress=progress, steps=steps, read=read)
    write_predictions(Path(output), rows, threshold["value"])
    return EXIT_SOME_FAILED if any(r.logit is None for r in rows) else 0, summary(rows, threshold["value"], seconds)


def _renamed(names: dict[str, str]) -> str:
    """`` (n named <stem>-2.png etc. ...)`` when some inputs share a stem, else nothing."""
    renamed = [name for path, name in names.items() if Path(name).stem != Path(path).stem]
    if not renamed:
        return ""
    return (f" ({len(renamed)} share a stem with an earlier input and are named <stem>-2.png etc.,"
            f" e.g. {renamed[0]})")
