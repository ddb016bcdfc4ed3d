"""madlab.io.files: the example writes files as the library does (atomically, with open()'s mode)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from madlab.io.files import write_atomically, write_text_atomically
from torch import nn

import lora_vit


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_a_new_file_gets_the_mode_the_library_gives_its_files(tmp_path: Path, umask_027) -> None:
    model = lora_vit.inject_lora(nn.Sequential(nn.Linear(4, 4)), targets=["0"], r=2)
    library = Path(lora_vit.save_lora(model, tmp_path / "adapter.safetensors"))
    example = write_atomically(tmp_path / "out.bin", b"x")
    assert example.stat().st_mode & 0o777 == library.stat().st_mode & 0o777 == 0o640


def test_a_rewritten_file_keeps_its_mode_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = write_text_atomically(tmp_path / "sub" / "scores.csv", "a,b\r\n")
    target.chmod(0o600)
    write_text_atomically(target, "c,d\r\n")
    assert target.read_bytes() == b"c,d\r\n"  # newlines as given
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["scores.csv"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    target = write_atomically(tmp_path / "model.bin", b"old")

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.bin"]
