"""Facts about images kept under the image's content, so a later run reads them instead of decoding.

A file is keyed by the SHA-256 of its bytes: reading a file costs far less than decoding it,
and the key changes whenever the bytes do, so a file replaced under the same path is looked
at afresh. An in-memory image is keyed by its shape, dtype and pixels. The settings that
produced a fact are part of its entry's name, so other settings make other entries instead of
reading stale ones.

Entries are small JSON files, written atomically. One that cannot be read, is not JSON, or
does not hold what its reader expects counts as missing: it is made again, never trusted and
never a crash.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat as stat_module
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .files import write_text_atomically

__all__ = ["content_key", "entry_path", "file_key", "read_entry", "write_entry"]

_CHUNK = 1 << 20
_KNOWN: dict[tuple, str] = {}  # file identity -> key, for this process
_KNOWN_MAX = 1_000_000


def content_key(data: bytes | np.ndarray) -> str:
    """A hex digest of a file's bytes or of an in-memory image (its shape, dtype and pixels)."""
    h = hashlib.sha256()
    if isinstance(data, np.ndarray):
        h.update(f"{data.shape}{data.dtype}".encode())
        h.update(np.ascontiguousarray(data).tobytes())
    else:
        h.update(data)
    return h.hexdigest()[:32]


def file_key(path: str | os.PathLike[str]) -> str | None:
    """:func:`content_key` of the bytes of the file at ``path``, read in chunks; nothing is decoded.

    A run meets each file more than once (the file check, then face detection), so the key is
    remembered for the file's identity, size and modification time: a file rewritten since is
    read again.

    Returns:
        The key, or ``None`` when the file cannot be read (missing, a folder, a link loop, no
        permission) or is no regular file (a FIFO would block the read until some writer
        came): the caller's own reader then says why.
    """
    try:
        stat = os.stat(path)
    except (OSError, ValueError):
        return None
    if not stat_module.S_ISREG(stat.st_mode):
        return None
    identity = (os.fspath(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if identity in _KNOWN:
        return _KNOWN[identity]
    key = _hash_file(path)
    if key is not None:
        if len(_KNOWN) >= _KNOWN_MAX:
            _KNOWN.clear()
        _KNOWN[identity] = key
    return key


def _hash_file(path: str | os.PathLike[str]) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()[:32]


def entry_path(root: str | os.PathLike[str], kind: str, key: str, settings: str) -> Path:
    """Where the ``kind`` entry of content ``key`` made with ``settings`` lives under ``root``.

    Entries are spread over 256 sub-folders by the key's first two digits, so that no folder
    holds every image of a large data set.
    """
    return Path(root) / kind / key[:2] / f"{key}-{settings}.json"


def read_entry(path: Path, valid: Callable[[dict], bool]) -> dict | None:
    """The entry at ``path`` if it is a JSON object that ``valid`` accepts, else ``None`` (made again)."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, cut short or not JSON (UnicodeDecodeError too)
        return None
    try:
        return found if isinstance(found, dict) and valid(found) else None
    except (TypeError, ValueError, KeyError):  # a validator meeting values of the wrong kind
        return None


def write_entry(path: Path, value: dict) -> None:
    """Write ``value`` as the JSON entry at ``path`` (atomically: a reader never sees half of it)."""
    write_text_atomically(path, json.dumps(value))
