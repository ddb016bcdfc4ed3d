"""The example's content keys: a file is keyed by its bytes, read once per run while it is unchanged."""

from __future__ import annotations

import os

from madlab.io import keyed


def test_a_files_key_is_the_key_of_its_bytes_and_is_read_once_while_unchanged(tmp_path, monkeypatch):
    path = tmp_path / "face.png"
    path.write_bytes(b"first bytes")
    reads = []
    real = keyed._hash_file
    monkeypatch.setattr(keyed, "_hash_file", lambda p: reads.append(p) or real(p))
    first = keyed.file_key(path)
    assert first == keyed.content_key(b"first bytes")
    assert keyed.file_key(path) == first and len(reads) == 1, "the second look reuses the key"
    path.write_bytes(b"other bytes, same path")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # even on a coarse clock
    assert keyed.file_key(path) == keyed.content_key(b"other bytes, same path") and len(reads) == 2


def test_a_file_that_cannot_be_read_has_no_key(tmp_path):
    assert keyed.file_key(tmp_path / "missing.png") is None
    assert keyed.file_key(tmp_path) is None  # a folder


def test_a_fifo_or_device_has_no_key_and_is_never_opened(tmp_path, monkeypatch):
    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would wait for a writer forever
    (tmp_path / "zero.png").symlink_to("/dev/zero")  # reading it would never end
    opened = []
    monkeypatch.setattr(keyed, "_hash_file", lambda p: opened.append(p))
    assert keyed.file_key(tmp_path / "pipe.png") is None and keyed.file_key(tmp_path / "zero.png") is None
    assert opened == []
