"""Samples and the report of what a data set held: the records every layer passes on.

A :class:`Sample` is one image with its label, attack method, split and identities; a
:class:`DataReport` counts what was read, converted and skipped, for the terminal and for
``metrics.json``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..io.errors import MadlabError

__all__ = ["SPLITS", "DataError", "DataReport", "Sample"]

SPLITS = ("train", "dev", "test")


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
    # A madlab.faces.detection.FaceRef once face_crop=align found the face: pixels are then its aligned crop.
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

