"""The split record a model file keeps: images found by content, equal files, people, and malformed records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from madlab.data.recorded import SplitRecord, data_location, image_key, same_data
from madlab.data.samples import DataError, Sample
from madlab.io.keyed import file_key


def write(path: Path, content: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return str(path)


def test_a_trailing_slash_a_dot_and_a_link_name_one_data_set(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    for spelling in (f"{tmp_path}/data/", f"{tmp_path}/./data", str(tmp_path / "link")):
        assert same_data(spelling, str(tmp_path / "data")), spelling
    assert not same_data(str(tmp_path / "data"), str(tmp_path / "other"))
    assert not same_data(None, str(tmp_path / "data")) and same_data(None, None)
    assert data_location(f"{tmp_path}/data/") == str(tmp_path / "data")


def test_files_are_keyed_by_content_and_embedded_images_by_name(tmp_path: Path) -> None:
    a = write(tmp_path / "a.png", b"same bytes")
    b = write(tmp_path / "sub" / "b.png", b"same bytes")
    assert image_key(Sample(a, 0, "bona_fide")) == image_key(Sample(b, 0, "bona_fide")) == file_key(a)
    pixels = np.zeros((2, 2, 3))
    assert image_key(Sample("orl/test/bona_fide/s1_1", 0, "bona_fide", image=pixels)) == (
        "embedded:orl/test/bona_fide/s1_1")


def test_the_recorded_split_is_found_by_content_whatever_was_added_or_renamed(tmp_path: Path) -> None:
    files = {name: write(tmp_path / f"{name}.png", name.encode()) for name in ("t1", "t2", "d1", "x1", "x2")}
    trained = [Sample(files["t1"], 0, "bona_fide", "train"), Sample(files["t2"], 1, "blend", "train"),
               Sample(files["d1"], 0, "bona_fide", "dev"), Sample(files["x1"], 0, "bona_fide", "test"),
               Sample(files["x2"], 1, "blend", "test")]
    record = SplitRecord.of(trained, str(tmp_path))
    renamed = tmp_path / "renamed.png"
    Path(files["x1"]).rename(renamed)
    now = [Sample(str(renamed), 0, "bona_fide"), Sample(write(tmp_path / "new.png", b"new"), 0, "bona_fide"),
           *(Sample(files[n], s.label, s.method) for n, s in zip(("t1", "t2", "d1"), trained)),
           Sample(files["x2"], 1, "blend")]
    assigned, missing = record.assign(now)
    assert [s.split for s in assigned] == ["test", "", "train", "train", "dev", "test"]
    assert missing == {"train": 0, "dev": 0, "test": 0}
    Path(files["x2"]).write_bytes(b"changed")
    assert record.assign(now)[1] == {"train": 0, "dev": 0, "test": 1}


def test_equal_files_in_two_splits_each_keep_their_own(tmp_path: Path) -> None:
    # A given-split layout can hold the same bytes in train and test: each copy stays where its folder puts it.
    train = Sample(write(tmp_path / "train" / "a.png", b"dup"), 0, "bona_fide", "train")
    test = Sample(write(tmp_path / "test" / "a.png", b"dup"), 0, "bona_fide", "test")
    record = SplitRecord.of([train, test], str(tmp_path))
    assert record.keys["train"] == record.keys["test"]
    assigned, missing = record.assign([test, train])
    assert [s.split for s in assigned] == ["test", "train"] and not any(missing.values())
    # Without given splits, each recorded copy still goes to one split: none is missing.
    assigned, missing = record.assign([Sample(test.path, 0, "bona_fide"), Sample(train.path, 0, "bona_fide")])
    assert sorted(s.split for s in assigned) == ["test", "train"] and not any(missing.values())


def test_seen_counts_images_by_content_and_by_person(tmp_path: Path) -> None:
    trained = [Sample(write(tmp_path / "t.png", b"t"), 0, "bona_fide", "train", ("001",)),
               Sample(write(tmp_path / "d.png", b"d"), 0, "bona_fide", "dev", ("002",)),
               Sample(write(tmp_path / "x.png", b"x"), 0, "bona_fide", "test", ("003",))]
    record = SplitRecord.of(trained, str(tmp_path))
    other = tmp_path / "other"
    scored = [Sample(write(other / "copy_of_d.png", b"d"), 0, "bona_fide", "", ("900",)),   # dev's bytes
              Sample(write(other / "001_re.png", b"re-encoded"), 0, "bona_fide", "", ("001",)),  # a train person
              Sample(write(other / "m.png", b"m"), 1, "blend", "", ("001", "003")),  # a train contributor
              Sample(write(other / "test_again.png", b"x"), 0, "bona_fide", "", ("003",)),  # test: not seen
              Sample(write(other / "unknown.png", b"u"), 0, "bona_fide")]
    seen = record.seen(scored)
    assert seen["seen"] == 3 and seen["scored"] == 5
    assert seen["images"] == {"train": 0, "dev": 1} and seen["people"] == {"train": 2, "dev": 0}
    assert seen["without_identity"] == 1 and seen["identities_recorded"]
    assert [Path(p).name for p in seen["examples"]] == ["copy_of_d.png", "001_re.png", "m.png"]


def test_a_record_round_trips_and_a_malformed_one_names_the_file(tmp_path: Path) -> None:
    trained = [Sample(write(tmp_path / f"{k}.png", bytes([k])), 0, "bona_fide", split, (str(k),))
               for k, split in enumerate(("train", "dev", "test"))]
    record = SplitRecord.of(trained, str(tmp_path))
    assert SplitRecord.from_dict(record.to_dict(), "'m.safetensors'") == record
    broken = {**record.to_dict(), "keys": {"train": [1]}}
    with pytest.raises(DataError, match=r"^'m.safetensors' has a malformed split record: 'keys' must map"):
        SplitRecord.from_dict(broken, "'m.safetensors'")
    with pytest.raises(DataError, match="'identities' must map"):
        SplitRecord.from_dict({"keys": record.to_dict()["keys"]}, "'m.safetensors'")
    with pytest.raises(DataError, match="'keys' must map"):
        SplitRecord.from_dict(["not", "a", "dict"], "'m.safetensors'")
