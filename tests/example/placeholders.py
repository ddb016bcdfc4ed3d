"""Small stand-ins for the paths README.md and examples/README.md write as placeholders.

Each data set is a few dozen ORL photos (real faces, so the default ``face_crop=align`` finds
them) in the layout the page's section describes; a morph is the pixel average of two people's
photos, which the face detector still finds. Each backbone is a tiny random model saved in the
format its ``/models/...`` name implies. Everything is made once per test module.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


# ---------------------------------------------------------------- photos and data sets


def orl(person: int, shot: int) -> np.ndarray:
    from madlab.sources.orl import orl_folder

    return np.asarray(Image.open(orl_folder() / f"s{person}" / f"{shot}.pgm").convert("RGB"))


def save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def average(a: int, b: int, shot: int) -> np.ndarray:
    """A crude morph of people ``a`` and ``b``: their photos' pixel average."""
    return ((orl(a, shot).astype(np.float64) + orl(b, shot)) / 2).round().astype(np.uint8)


def flat_set(root: Path, people: list[int], methods: tuple[str, ...] = ("average",)) -> Path:
    """``ROOT/{bona_fide, morph/<method>}/`` without splits (what ``test --data`` scores whole): one
    photo a person, and per method one morph of each neighbouring pair."""
    for p in people:
        save(root / "bona_fide" / f"s{p}_1.png", orl(p, 1))
    for k, method in enumerate(methods):
        for a, b in zip(people, people[1:]):
            save(root / "morph" / method / f"s{a}_s{b}.png", average(a, b, 2 + k))
    return root


def split_set(root: Path, first: int) -> Path:
    """``ROOT/{train,dev,test}/{bona_fide, morph/average}/``: 3 people a split, 2 photos each, and the
    morphs of each pair of a split's people (people ``first`` to ``first + 8``)."""
    for k, split in enumerate(("train", "dev", "test")):
        people = [first + 3 * k + i for i in range(3)]
        for p in people:
            for shot in (1, 2):
                save(root / split / "bona_fide" / f"s{p}_{shot}.png", orl(p, shot))
        for a, b in zip(people, people[1:] + people[:1]):
            save(root / split / "morph" / "average" / f"s{a}_s{b}.png", average(a, b, 3))
    return root


def bona_fides_only(root: Path, people: list[int]) -> Path:
    """``ROOT/bona_fide/`` alone: what ``attacks=synthetic`` and ``generated`` train on."""
    for p in people:
        save(root / "bona_fide" / f"s{p}_1.png", orl(p, 1))
    return root


def frll(root: Path, people: list[int]) -> Path:
    """FRLL's naming, no splits: bona fides ``001_03.jpg`` (person, shot) and morphs ``001_002.jpg`` (both
    people), which ``identity_pattern=^(?P<a>\\d{3})_(?:\\d{2}|(?P<b>\\d{3}))\\.`` parses; the people come in
    pairs that are morphed both ways, so an identity split keeps each pair together."""
    ids = {p: f"{i + 1:03d}" for i, p in enumerate(people)}
    for p in people:
        for shot in (3, 4):
            save(root / "bona_fide" / f"{ids[p]}_{shot:02d}.jpg", orl(p, shot))
    for a, b in zip(people[::2], people[1::2]):
        save(root / "morph" / "facemorpher" / f"{ids[a]}_{ids[b]}.jpg", average(a, b, 3))
        save(root / "morph" / "facemorpher" / f"{ids[b]}_{ids[a]}.jpg", average(b, a, 4))
    return root


def photos(folder: Path, people: list[int], suffix: str = ".png") -> Path:
    """Unlabelled photos for ``predict``: one a person, the last one in a sub-folder (read recursively)."""
    for i, p in enumerate(people):
        where = folder / "more" if i == len(people) - 1 else folder
        save(where / f"s{p}_5{suffix}", orl(p, 5))
    return folder


# ---------------------------------------------------------------- backbones


def _hf(make: Callable, folder: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    make(transformers).save_pretrained(folder)
    return folder


def vit_mae(folder: Path) -> Path:
    """A ViT-MAE folder with its decoder (as ``facebook/vit-mae-*``): trains, and ``pretrain`` continues it."""
    return _hf(lambda t: t.ViTMAEForPreTraining(t.ViTMAEConfig(
        image_size=32, patch_size=8, decoder_hidden_size=16, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2, decoder_intermediate_size=32, **TINY)), folder)


def clip_vision(folder: Path) -> Path:
    return _hf(lambda t: t.CLIPVisionModel(t.CLIPVisionConfig(image_size=32, patch_size=8, **TINY)), folder)


def dinov2(folder: Path) -> Path:
    small = {k: v for k, v in TINY.items() if k != "intermediate_size"}
    return _hf(lambda t: t.Dinov2Model(t.Dinov2Config(image_size=32, patch_size=8, mlp_ratio=2, **small)), folder)


def timm_dinov2(folder: Path) -> Path:
    """A timm hub folder (``config.json`` + ``model.safetensors``) of ``vit_small_patch14_dinov2`` made
    tiny (its ``model_args`` in config.json say how), as ``--backbone_weights`` reads it."""
    from timm_support import import_timm

    timm = import_timm()
    from timm.models import _hub

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, img_size=28, embed_dim=32,
                              depth=2, num_heads=2)
    _hub.save_for_hf(model, folder, safe_serialization=True, model_args=dict(embed_dim=32, depth=2, num_heads=2))
    assert json.loads((folder / "config.json").read_text())["model_args"]["embed_dim"] == 32
    return folder
