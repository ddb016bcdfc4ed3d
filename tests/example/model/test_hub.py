"""Backbones by Hugging Face hub id, resolved through a hub cache folder this test builds (never the network).

The cache has huggingface_hub's own layout (``models--owner--name/{refs/main, snapshots/<commit>/}``);
``HF_HUB_OFFLINE=1`` (conftest) makes huggingface_hub read it without any request, as a user's
filled cache is read offline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from madlab.model.checkpoint import read_metadata
from madlab.model.families import load_backbone
from madlab.model.hub import HubError, is_hub_id, resolve
from PIL import Image

from example.cli import cli, overrides

MODEL = "morph_detector.safetensors"
# Generated noise images have no faces: they are read whole (face_crop=none).
TRAIN = ["num_epochs=1", "batch_size=8", "use_early_stopping=false", "num_threads=1", "num_workers=0", "face_crop=none"]
FIRST, SECOND = "1" * 40, "2" * 40






def snapshot(cache: Path, repo_id: str, commit: str, seed: int, main: bool = True) -> Path:
    """A tiny ViT checkpoint as huggingface_hub caches a download of ``repo_id`` at ``commit``."""
    from transformers import ViTConfig, ViTModel

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    folder = repo / "snapshots" / commit
    torch.manual_seed(seed)
    ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64), add_pooling_layer=False).save_pretrained(folder)
    if main:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    return folder


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants as constants

    folder = tmp_path / "hub"
    folder.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    assert constants.HF_HUB_OFFLINE, "conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported"
    return folder


def data_tree(root: Path) -> Path:
    for split in ("train", "dev", "test"):
        for i in range(4):
            for label, offset in (("bona_fide", 0), ("morph", 100)):
                path = root / split / label / f"{label}{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = np.random.default_rng(i + offset).integers(0, 255, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(path)
    return root


def test_hub_id_resolves_from_the_cache_offline(cache: Path) -> None:
    folder = snapshot(cache, "tester/tiny-vit", FIRST, seed=0)
    assert is_hub_id("tester/tiny-vit") and not is_hub_id("timm:vit_tiny") and not is_hub_id("/abs/path")
    assert resolve("tester/tiny-vit") == (folder, FIRST)
    model, spec = load_backbone("tester/tiny-vit")
    reference, _ = load_backbone(str(folder))
    assert spec.hub_id == "tester/tiny-vit" and spec.revision == FIRST and spec.source == str(folder)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(("source", "hub"), [
    ("facebook/dinov2-small", True),
    ("timm/vit_small_patch14_dinov2.lvd142m", True),  # dots inside a hub id
    ("./facebook/dinov2-small", False), ("../x/y", False), ("~/models/vit", False), ("/abs/x", False),
    ("foo/bar/baz", False), ("foo/bar/", False), ("foo\\bar", False), ("timm:vit_tiny", False),
    ("weights/vit.safetensors", False), ("org/config.json", False), ("org/model.pt", False),
    ("models/dinov2-smal", False),  # models/ is a folder here: a mistyped folder in it, not a hub id
    ("local/vit", False),  # exists here as a folder: the folder wins
])
def test_what_reads_as_a_path_is_never_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str,
                                                 hub: bool) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "dinov2-small").mkdir(parents=True)
    (tmp_path / "local" / "vit").mkdir(parents=True)
    assert is_hub_id(source) is hub


def test_uncached_id_is_one_clear_error(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(HubError) as err:
        resolve("facebook/dinov2-small")
    message = str(err.value)
    assert "'facebook/dinov2-small' is not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE=1 is set" in message and "hf download facebook/dinov2-small" in message
    data = data_tree(tmp_path / "data")
    rc, _, stderr = cli("train", "--data", str(data), "--backbone", "facebook/dinov2-small", "--output_dir",
                        str(tmp_path / "out"), "--no_progress", *overrides(TRAIN))
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: backbone 'facebook/dinov2-small' is not in")


def test_model_file_records_the_revision_and_rebuilds_from_it(cache: Path, tmp_path: Path) -> None:
    snapshot(cache, "tester/tiny-vit", FIRST, seed=0)
    data = data_tree(tmp_path / "data")
    out = tmp_path / "out"
    rc, _, err = cli("train", "--data", str(data), "--backbone", "tester/tiny-vit", "--output_dir", str(out),
                     "--no_progress", *overrides(TRAIN))
    assert rc == 0, err
    spec = read_metadata(out / MODEL)["backbone"]["spec"]
    assert (spec["hub_id"], spec["revision"]) == ("tester/tiny-vit", FIRST)
    # The hub's main branch moves on to other weights; the model file still gets the commit it was trained on.
    snapshot(cache, "tester/tiny-vit", SECOND, seed=1)
    assert resolve("tester/tiny-vit")[1] == SECOND
    rc, _, err = cli("test", "--model_path", str(out / MODEL), "--output_dir", str(tmp_path / "t"), "--no_progress")
    assert rc == 0, err
    rc, stdout, err = cli("predict", "--model_path", str(out / MODEL), "--input", str(data / "test"), "--output",
                          str(tmp_path / "p.csv"))
    assert rc == 0, err
    assert "8 scored" in stdout


def test_timm_hub_id(cache: Path, tmp_path: Path) -> None:
    from timm_support import import_timm

    timm = import_timm()
    from timm.models import _hub

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, img_size=28, embed_dim=32,
                              depth=2, num_heads=2)
    repo = cache / "models--timm--tiny_dinov2_test"
    _hub.save_for_hf(model, repo / "snapshots" / FIRST, safe_serialization=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FIRST)
    backbone, spec = load_backbone("timm/tiny_dinov2_test")
    assert spec.family == "timm" and spec.hub_id == "timm/tiny_dinov2_test" and spec.revision == FIRST
    assert torch.equal(backbone.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
