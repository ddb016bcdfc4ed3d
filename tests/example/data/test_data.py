"""Data sources of the morph-detection example: embedded pools, folder trees, CSV manifests, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from madlab.attacks.morphs import inner_face_mask, morph
from madlab.data.folders import read_csv_manifest, scan_folder
from madlab.data.images import ImageDataset
from madlab.data.samples import DataError, DataReport, Sample
from madlab.sources.lfw import embedded_samples
from madlab.sources.reading import load_samples
from PIL import Image


def _image(path: Path, mode: str = "RGB", size: int = 12, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    array = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(path)
    return path


def _tree(root: Path, split: str | None, n: int = 3, methods=("opencv", "stylegan")) -> None:
    base = root / split if split else root
    for i in range(n):
        _image(base / "bona_fide" / f"bf{i}.png", value=i)
        for m in methods:
            _image(base / "morph" / m / "deep" / f"{m}{i}.jpg", value=100 + i)


# ---------------------------------------------------------------- embedded


def test_embedded_pools_are_disjoint_and_pairs_stay_inside() -> None:
    samples = embedded_samples(0, ["blend", "splice"], 2, (0.6, 0.2))
    splits = ("train", "dev", "test")
    faces = {split: {s.identity[0] for s in samples if s.split == split and s.label == 0} for split in splits}
    assert [len(faces[s]) for s in ("train", "dev", "test")] == [60, 20, 20]
    assert not (faces["train"] & faces["dev"] or faces["train"] & faces["test"] or faces["dev"] & faces["test"])
    for s in samples:
        if s.label == 1:
            a, b = s.identity
            assert a != b, "a morph needs two different faces"
            assert {a, b} <= faces[s.split], "morph contributors must come from the same pool"
    methods = {s.method for s in samples if s.label == 1}
    assert methods == {"blend", "splice"}


def test_embedded_is_deterministic_under_seed() -> None:
    a = embedded_samples(3, ["blend"], 1, (0.6, 0.2))
    b = embedded_samples(3, ["blend"], 1, (0.6, 0.2))
    c = embedded_samples(4, ["blend"], 1, (0.6, 0.2))
    assert [s.path for s in a] == [s.path for s in b]
    assert np.array_equal(a[-1].image, b[-1].image)
    assert [s.path for s in a] != [s.path for s in c]


def test_morph_methods_differ_and_mix_contributors() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random((25, 25)), rng.random((25, 25))
    blended = morph("blend", a, b)
    spliced = morph("splice", a, b)
    assert np.allclose(blended, (a + b) / 2)
    mask = inner_face_mask(25, 25)
    assert mask[13, 12] > 0.9 and mask[0, 0] < 0.05, "soft mask: inner face in, corners out"
    assert np.allclose(spliced[0, 0], a[0, 0], atol=0.05), "outside the face the splice keeps contributor a"
    assert not np.allclose(spliced, blended)
    with pytest.raises(ValueError, match="choose from"):
        morph("warp", a, b)


# ---------------------------------------------------------------- folders


def test_folder_with_split_folders_and_methods(tmp_path: Path) -> None:
    for split in ("train", "val", "test"):
        _tree(tmp_path, split)
    samples, report = load_samples(str(tmp_path), 0, [], 1, (0.6, 0.2))
    assert {s.split for s in samples} == {"train", "dev", "test"}
    assert {s.method for s in samples if s.label == 1} == {"opencv", "stylegan"}
    assert sum(1 for s in samples if s.split == "test" and s.label == 0) == 3
    assert not report.skipped


def test_folder_aliases_and_jpeg_recursive(tmp_path: Path) -> None:
    _image(tmp_path / "raw" / "a" / "x.JPEG")
    _image(tmp_path / "raw" / "y.png")
    _image(tmp_path / "attack" / "z.jpg")
    report = DataReport("t")
    samples = scan_folder(tmp_path, report)
    assert sorted(s.label for s in samples) == [0, 0, 1]
    # A morph directly under morph/ gets the folder name as its method.
    assert [s.method for s in samples if s.label == 1] == ["attack"]


def test_folder_without_splits_is_split_by_image_with_a_note(tmp_path: Path) -> None:
    _tree(tmp_path, None, n=10)
    samples, report = load_samples(str(tmp_path), 0, [], 1, (0.6, 0.2))
    assert {s.split for s in samples} == {"train", "dev", "test"}
    assert any("have no identity: split by image" in n for n in report.notes)


def test_bad_and_non_rgb_images_are_counted(tmp_path: Path) -> None:
    _tree(tmp_path, None, n=10)
    (tmp_path / "bona_fide" / "broken.jpg").write_bytes(b"not an image at all")
    good = _image(tmp_path / "bona_fide" / "trunc.png", size=64)
    (tmp_path / "bona_fide" / "truncated.png").write_bytes(good.read_bytes()[:80])
    _image(tmp_path / "bona_fide" / "gray.png", mode="L")
    _image(tmp_path / "bona_fide" / "cmyk.jpg", mode="CMYK")
    report = DataReport("t")
    samples = scan_folder(tmp_path, report)
    assert sum(report.skipped.values()) == 2
    assert report.skipped == {"not an image": 1, "truncated or corrupt image": 1}
    assert report.converted == {"L": 1, "CMYK": 1}, "CMYK is converted, not skipped"
    gray = next(s for s in samples if s.path.endswith("gray.png"))
    x, y, _ = ImageDataset([gray], 16)[0]
    assert x.shape == (3, 16, 16) and y.item() == 0.0
    assert any("skipped 2 files" in line for line in report.lines(samples))


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        ("missing", "does not exist"),
        ("empty", "no class or split folders"),
        ("only_bona_fide", "split has .* 0 morph"),
        ("split_missing_test", "train and test are required"),
        ("mixed", "both split folders"),
    ],
)
def test_bad_folders_give_clear_errors(tmp_path: Path, layout: str, match: str) -> None:
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "only_bona_fide":
        for i in range(6):
            _image(root / "bona_fide" / f"{i}.png", value=i)
        (root / "morph").mkdir()
    elif layout == "split_missing_test":
        _tree(root, "train")
    elif layout == "mixed":
        _tree(root, "train")
        _tree(root, None)
    with pytest.raises(DataError, match=match):
        load_samples(str(root), 0, [], 1, (0.6, 0.2))


def test_split_without_one_class_is_refused(tmp_path: Path) -> None:
    _tree(tmp_path, "train")
    _tree(tmp_path, "dev")
    for i in range(3):
        _image(tmp_path / "test" / "bona_fide" / f"{i}.png")
    (tmp_path / "test" / "morph").mkdir()
    with pytest.raises(DataError, match="the test split has 3 bona fide and 0 morph"):
        load_samples(str(tmp_path), 0, [], 1, (0.6, 0.2))


# ---------------------------------------------------------------- CSV


def test_csv_manifest_splits_by_identity(tmp_path: Path) -> None:
    lines = ["path,label,method,identity"]
    for i in range(12):
        _image(tmp_path / "img" / f"bf{i}.png", value=i)
        lines.append(f"img/bf{i}.png,bonafide,,p{i}")
    for i in range(12):
        _image(tmp_path / "img" / f"m{i}.png", value=50 + i)
        j = (i + 1) % 12
        lines.append(f"img/m{i}.png,attack,{'fm' if i % 2 else 'cv'},p{i}+p{j}")
    manifest = tmp_path / "data.csv"
    manifest.write_text("\n".join(lines) + "\n")
    report = DataReport("t")
    samples = read_csv_manifest(manifest, report)
    assert len(samples) == 24 and {s.method for s in samples if s.label} == {"fm", "cv"}
    from madlab.data.folders import assign_splits

    kept = assign_splits(samples, (0.5, 0.25), 0, report)
    where = {}
    for s in kept:
        for ident in s.identity:
            where.setdefault(ident, set()).add(s.split)
    assert all(len(v) == 1 for v in where.values()), "no identity may appear in two splits"
    # Morphs whose contributors fall into different splits are dropped and counted.
    assert report.skipped["morph contributors fall into different splits"] == 24 - len(kept)


def test_csv_manifest_with_split_column_and_bad_rows(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\na.png,0,train\nmissing.png,1,test\n")
    report = DataReport("t")
    samples = read_csv_manifest(manifest, report)
    assert [s.split for s in samples] == ["train"]
    assert report.skipped["file listed in the manifest does not exist"] == 1
    manifest.write_text("path,label\na.png,maybe\n")
    with pytest.raises(DataError, match="line 2: label 'maybe'"):
        read_csv_manifest(manifest, report)
    manifest.write_text("file,class\na.png,0\n")
    with pytest.raises(DataError, match="at least path,label"):
        read_csv_manifest(manifest, report)
    manifest.write_text("path,label,split\na.png,0,holdout\n")
    with pytest.raises(DataError, match="split 'holdout'"):
        read_csv_manifest(manifest, report)
    with pytest.raises(DataError, match="does not exist"):
        read_csv_manifest(tmp_path / "nope.csv", report)


def test_every_source_is_read_through_one_interface(tmp_path: Path) -> None:
    from madlab.sources.reading import EmbeddedSource, FolderSource, ManifestSource, open_source

    _tree(tmp_path / "tree", None, n=2, methods=("opencv",))
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{'morph' if 'morph' in str(p) else 'bona_fide'}\n"
                                                 for p in sorted((tmp_path / "tree").rglob("*.*"))))
    kinds = {None: EmbeddedSource, str(tmp_path / "tree"): FolderSource, str(manifest): ManifestSource}
    read = {}
    for data, kind in kinds.items():
        source = open_source(data, 0, ["blend"], 1, (0.6, 0.2))
        assert type(source) is kind
        report = DataReport(source.description)
        read[kind] = source.read(report)
        assert read[kind] and all(isinstance(s, Sample) for s in read[kind])
    # The folder and the manifest listing the same files give the same samples.
    as_rows = lambda samples: sorted((s.path, s.label) for s in samples)  # noqa: E731
    assert as_rows(read[FolderSource]) == as_rows(read[ManifestSource])


def test_links_in_a_data_folder_are_followed_once_and_loops_counted(tmp_path: Path) -> None:
    _tree(tmp_path, None, n=2, methods=("opencv",))
    (tmp_path / "bona_fide" / "self.png").symlink_to(tmp_path / "bona_fide" / "self.png")
    (tmp_path / "bona_fide" / "up").symlink_to(tmp_path / "bona_fide")  # a folder loop
    (tmp_path / "bona_fide" / "empty.jpg").write_bytes(b"")
    report = DataReport("t")
    samples = scan_folder(tmp_path, report)
    assert sorted(Path(s.path).name for s in samples if s.label == 0) == ["bf0.png", "bf1.png"]
    assert report.skipped == {"symlink loop": 2, "empty file (0 bytes)": 1}
    named = report.to_dict(samples)["skipped_files"]
    assert sorted(Path(line.split(": ")[0]).name for line in named) == ["empty.jpg", "self.png", "up"]
