"""Backbones known by name: built once into the cache, run at their own input size, rebuilt if the cache empties.

A fake entry (a tiny random DINOv2 folder) stands in for ``dinov2-vits14-imgfocus`` so the
wiring is tested in seconds; the real conversion is tested in test_dinov2_imgfocus.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from madlab.io.config import Config
from madlab.model.named import IMGFOCUS, NAMED, SMALL_VIT, NamedBackbone, is_small_vit

from example.cli import cli, overrides

FAST = ["num_epochs=1", "morphs_per_face=1", "batch_size=32", "use_early_stopping=false",
        "embedded_data=lfw_subset", "face_crop=none", "num_workers=0"]


def test_the_default_backbone_is_the_real_one_and_the_small_vit_keeps_its_name() -> None:
    assert Config().backbone == IMGFOCUS and IMGFOCUS in NAMED
    assert NAMED[IMGFOCUS].image_size % 14 == 0  # DINOv2's patches tile it
    assert is_small_vit(None) and is_small_vit(SMALL_VIT) and not is_small_vit(IMGFOCUS)


@pytest.fixture
def fake(tmp_path: Path, monkeypatch) -> dict:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    built = {"calls": 0}

    def build(cache: Path, say) -> Path:
        built["calls"] += 1
        folder = Path(cache) / "fake-dinov2"
        if not (folder / "config.json").is_file():
            torch.manual_seed(0)
            config = Dinov2Config(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, mlp_ratio=2)
            Dinov2Model(config).save_pretrained(folder)
            say(f"built {folder}")
        return folder

    monkeypatch.setitem(NAMED, "fake-dinov2", NamedBackbone(12, build, "a tiny random DINOv2 for tests"))
    built["cache"] = tmp_path / "cache"
    return built


def test_a_named_backbone_is_built_once_and_runs_at_its_own_size(fake: dict, tmp_path: Path) -> None:
    out, cache = tmp_path / "run", fake["cache"]
    rc, stdout, err = cli("train", "--backbone", "fake-dinov2", "--output_dir", str(out), "--cache_dir", str(cache),
                          "--no_progress", *overrides(FAST))
    assert rc == 0, err
    assert stdout.splitlines()[1] == "backbone fake-dinov2: a tiny random DINOv2 for tests"  # the first lines
    assert f"backbone: dinov2 {cache / 'fake-dinov2'}, 12 px" in stdout  # the entry's size, not the folder's 16
    rc, stdout, err = cli("train", "--backbone", "fake-dinov2", "--output_dir", str(tmp_path / "sized"),
                          "--cache_dir", str(cache), "--no_progress", *overrides([*FAST, "image_size=8"]))
    assert rc == 0 and ", 8 px" in stdout, err  # image_size still wins
    assert fake["calls"] == 2  # once per run; the second found the folder the first built


def test_an_emptied_cache_is_rebuilt_when_the_model_file_is_loaded(fake: dict, tmp_path: Path, monkeypatch) -> None:
    out, cache = tmp_path / "run", fake["cache"]
    rc, _, err = cli("train", "--backbone", "fake-dinov2", "--output_dir", str(out), "--cache_dir", str(cache),
                     "--no_progress", *overrides(FAST))
    assert rc == 0, err
    rc, _, err = cli("test", "--model_path", str(out / "morph_detector.safetensors"), "--output_dir",
                     str(tmp_path / "t1"), "--cache_dir", str(cache), "--no_progress")
    assert rc == 0, err
    shutil.rmtree(cache / "fake-dinov2")
    monkeypatch.setenv("LORA_VIT_CACHE", str(cache))  # where the rebuild goes without --cache_dir
    rc, _, err = cli("test", "--model_path", str(out / "morph_detector.safetensors"), "--output_dir",
                     str(tmp_path / "t2"), "--cache_dir", str(cache), "--no_progress")
    assert rc == 0, err
    assert (cache / "fake-dinov2" / "config.json").is_file()
    scores = [(tmp_path / name / "scores.csv").read_text() for name in ("t1", "t2")]
    assert scores[0] == scores[1]  # the rebuilt backbone is the same one (same seed, same batches)
