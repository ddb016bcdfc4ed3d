"""The split a model was trained on, as its model file records it, and what a later data set holds of it.

``train`` records, per split, one key per image and the identities (bona fides and morph
contributors) where they are known, beside the data set's resolved location
(:meth:`SplitRecord.of`). An image file's key is the SHA-256 of its bytes
(:func:`~..io.keyed.file_key`), so a renamed file is still the image trained on and a file
rewritten in place is not; an embedded image, made in-process from the seed, is keyed by its
name. ``test`` then scores exactly the recorded split (:meth:`SplitRecord.assign`), whatever
files were added since, and refuses when the recorded images are no longer all there; on any
data it reports which scored images or people training or dev saw (:meth:`SplitRecord.seen`).
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io.keyed import file_key
from .samples import SPLITS, DataError, Sample

__all__ = ["SEEN_IN", "SplitRecord", "data_location", "describe_seen", "image_key", "same_data"]

SEEN_IN = ("train", "dev")  # what a scored image must not have been seen in
_EXAMPLES = 5


def data_location(data: str | os.PathLike[str] | None) -> str | None:
    """Where a data set is, resolved (``ROOT``, ``ROOT/``, ``./ROOT`` and a link to it are one data set);
    ``None`` for the embedded one."""
    return None if data is None else str(Path(data).expanduser().resolve())


def same_data(a: str | os.PathLike[str] | None, b: str | os.PathLike[str] | None) -> bool:
    """Whether ``a`` and ``b`` name the same data set (compared resolved, :func:`data_location`)."""
    return data_location(a) == data_location(b)


def image_key(sample: Sample) -> str:
    """What identifies ``sample``'s image across runs: its file's content hash, or, for an embedded image
    made in-process (``sample.image`` set), its name.

    Raises:
        DataError: If the file can no longer be read.
    """
    if sample.image is not None:
        return f"embedded:{sample.path}"
    key = file_key(sample.path)
    if key is None:
        raise DataError(f"could not read {sample.path!r} (it was readable when scanned)")
    return key


def _identities(sample: Sample) -> tuple[str, ...]:
    return tuple(sample.identity)


@dataclass(frozen=True)
class SplitRecord:
    """Per split, the image keys (one per image, repeated for files of equal content) and the identities.

    Attributes:
        data: The data set's resolved location (:func:`data_location`), ``None`` for the embedded set.
        keys: Split -> sorted image keys (:func:`image_key`).
        identities: Split -> sorted identities of its bona fides and morph contributors (empty where
            the data had none).
    """

    data: str | None
    keys: dict[str, tuple[str, ...]]
    identities: dict[str, tuple[str, ...]]

    @classmethod
    def of(cls, samples: Sequence[Sample], data: str | os.PathLike[str] | None) -> SplitRecord:
        """The record of ``samples`` (each with its split) read from ``data``."""
        keys = {split: tuple(sorted(image_key(s) for s in samples if s.split == split)) for split in SPLITS}
        identities = {split: tuple(sorted({i for s in samples if s.split == split for i in _identities(s)}))
                      for split in SPLITS}
        return cls(data_location(data), keys, identities)

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "keys": {k: list(v) for k, v in self.keys.items()},
                "identities": {k: list(v) for k, v in self.identities.items()}}

    @classmethod
    def from_dict(cls, value: Any, where: str) -> SplitRecord:
        """A record from :meth:`to_dict`'s output, as a model file stores it.

        Raises:
            DataError: Naming ``where`` (the model file) and the malformed part.
        """
        def strings(part: str) -> dict[str, tuple[str, ...]]:
            found = value.get(part) if isinstance(value, dict) else None
            if not isinstance(found, dict) or set(found) != set(SPLITS) or not all(
                    isinstance(v, list) and all(isinstance(i, str) for i in v) for v in found.values()):
                raise DataError(f"{where} has a malformed split record: {part!r} must map {list(SPLITS)} to lists"
                                " of strings; it was not written by this example or was damaged")
            return {k: tuple(v) for k, v in found.items()}

        keys, identities = strings("keys"), strings("identities")
        if not (value.get("data") is None or isinstance(value["data"], str)):
            raise DataError(f"{where} has a malformed split record: 'data' must be a path or null")
        return cls(value["data"], keys, identities)

    def assign(self, samples: Sequence[Sample]) -> tuple[list[Sample], dict[str, int]]:
        """``samples`` with the split the record gives their images (``""``: not recorded, e.g. added since).

        Equal files share a key, so each recorded copy goes to one of the splits recording it:
        the sample's own split (given by the folders) where that split still wants a copy,
        else the first such split.

        Returns:
            The new samples, and per split how many recorded images no sample gave (missing or changed).
        """
        wanted = {split: Counter(keys) for split, keys in self.keys.items()}
        out = []
        for s in samples:
            key = image_key(s)
            order = ([s.split] if s.split in wanted else []) + list(SPLITS)
            split = next((name for name in order if wanted[name][key] > 0), "")
            if split:
                wanted[split][key] -= 1
            out.append(dataclasses.replace(s, split=split))
        return out, {split: sum(left.values()) for split, left in wanted.items()}

    def seen(self, samples: Sequence[Sample]) -> dict[str, Any]:
        """Which of ``samples`` show an image, or a person, that training or dev saw (:data:`SEEN_IN`).

        Returns:
            For ``metrics.json``: ``scored``, ``seen`` (images seen either way), per split of
            :data:`SEEN_IN` the ``images`` with a recorded image's content and the ``people`` images
            showing a recorded identity, ``without_identity`` (scored images whose people are unknown),
            ``identities_recorded`` and a few ``examples``.
        """
        keys = {split: set(self.keys[split]) for split in SEEN_IN}
        people = {split: set(self.identities[split]) for split in SEEN_IN}
        images, persons, examples, seen = Counter(), Counter(), [], 0
        for s in samples:
            hit, key = False, image_key(s)
            for split in SEEN_IN:
                if key in keys[split]:
                    images[split] += 1
                    hit = True
                if people[split].intersection(_identities(s)):
                    persons[split] += 1
                    hit = True
            if hit:
                seen += 1
                if len(examples) < _EXAMPLES:
                    examples.append(s.path)
        return {"scored": len(samples), "seen": seen,
                "images": {split: images[split] for split in SEEN_IN},
                "people": {split: persons[split] for split in SEEN_IN},
                "without_identity": sum(1 for s in samples if not s.identity),
                "identities_recorded": any(people.values()), "examples": examples}


def describe_seen(seen: dict[str, Any]) -> str:
    """One line for the terminal: what :meth:`SplitRecord.seen` found."""
    n, scored = seen["seen"], seen["scored"]
    if not seen["identities_recorded"]:
        people = "people not checked: the training data had no identities"
    elif seen["without_identity"]:
        people = f"{seen['without_identity']} of the scored images have no identity and were checked by content only"
    else:
        people = "every scored image checked by content and by person"
    head = (f"WARNING: {n} of the {scored} scored images were seen in training or dev (same content as"
            f" {seen['images']['train']} train / {seen['images']['dev']} dev images; showing a train person:"
            f" {seen['people']['train']}, a dev person: {seen['people']['dev']}), e.g. {seen['examples'][:3]};"
            " their figures are optimistic" if n else
            f"none of the {scored} scored images was seen in training or dev")
    return f"{head} ({people})"
