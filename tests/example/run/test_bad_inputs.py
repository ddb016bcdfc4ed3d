"""Every row of the bad-input table in examples/README.md, through the example's command line.

Each test calls ``morph_detection.main`` (the CLI entry point) and asserts the exact outcome:
exit code 2 and an ``error:`` line naming the bad value, or a counted skip/conversion in a
run that then trains to the end. No row may end in a traceback.
"""

from __future__ import annotations

import ast
import re
import struct
import zlib
from pathlib import Path

import morph_detection
import numpy as np
import pytest
from madlab.data.folders import TOO_LARGE, scan_folder
from madlab.data.images import ImageDataset, sample_pixels
from madlab.data.samples import DataReport
from madlab.model.checkpoint import CheckpointError, load_weights
from madlab.model.network import MorphDetector
from madlab.run.resume import STATE_FILE
from PIL import Image

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
        "ROOT[/<split>]/{bona_fide|bonafide|raw, morph|attack}/[<method>/]*.{jpg,jpeg,png}"


def test_class_folders_without_images(tmp_path: Path) -> None:
    for name in ("bona_fide", "morph"):
        (tmp_path / "d" / name).mkdir(parents=True)
    (tmp_path / "d" / "morph" / "notes.txt").write_text("not an image")
    line = fails("train", "--data", str(tmp_path / "d"), "--output_dir", str(tmp_path / "o"))
    assert line == f"error: no readable .jpg/.jpeg/.png images under {str(tmp_path / 'd')!r}"


def test_every_image_corrupt(tmp_path: Path) -> None:
    for name in ("bona_fide/a.png", "morph/b.jpg"):
        (tmp_path / "d" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / name).write_bytes(b"garbage")
    line = fails("train", "--data", str(tmp_path / "d"), "--output_dir", str(tmp_path / "o"))
    assert line == (f"error: no readable .jpg/.jpeg/.png images under {str(tmp_path / 'd')!r}; skipped 2 files:"
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
    line = fails("test", "--model_path", str(out / MODEL), "--override", "lora_r=8", "--output_dir", str(tmp_path))
    assert line.startswith("error: --override lora_r=8 does not match the model file, which was trained with"
                           " lora_r=4.")


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
