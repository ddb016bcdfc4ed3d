"""export on every backbone family: the merged file rebuilds its architecture alone and scores as the unmerged model.

Each family's tiny random checkpoint is saved in its own layout (test_example_backbones'
builders); the detector gets LoRA on q, k, v, o with random B (so the adapters change the
logits), is exported, and the export is loaded with the backbone folder deleted.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from madlab.io.config import Config, apply_overrides
from madlab.model.families import load_backbone
from madlab.model.network import MorphDetector, apply_strategy
from madlab.run.detector import Detector
from madlab.run.export import export_detector
from safetensors import safe_open

from example.model.test_backbones import FAMILIES, save_backbone
from lora_vit import disable_lora

CONFIG = ["lora_target_modules=q,k,v,o", "num_threads=1"]


def detector_on(folder_or_source: str, weights: str | None, tmp_path: Path, extra: tuple[str, ...] = ()) -> Detector:
    backbone, spec = load_backbone(folder_or_source, weights)
    config = apply_overrides(Config(), [*CONFIG, *extra])
    model = MorphDetector.from_config(backbone, spec, config)
    apply_strategy(model, config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=generator))  # a trained-size head
    meta = {"config": config.to_dict(), "strategy": "lora", "backbone": {"spec": spec.to_dict()},
            "threshold": {"value": 0.25, "score": "logit", "rule": "dev_eer"}}
    return Detector(model.eval(), config, meta, tmp_path / "model.safetensors", "fp32", model)


def check_export(detector: Detector, tmp_path: Path, gone: Path, source: str) -> None:
    size = detector.image_size
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    unmerged = detector.score(x)
    with torch.no_grad(), disable_lora(detector.model):
        base_logits = detector.model(x).double().numpy()
    assert np.abs(base_logits - unmerged).max() > 1e-4, "the adapters change the logits"
    base_keys = set(load_backbone(source)[0].state_dict())
    output = tmp_path / "export.safetensors"
    export_detector(detector, output)
    shutil.rmtree(gone)  # the export needs no backbone folder
    loaded = Detector.load(output)
    assert np.abs(loaded.score(x) - unmerged).max() <= 1e-4
    with safe_open(str(output), framework="pt") as handle:
        keys = set(handle.keys())
    assert not any("lora" in k for k in keys)
    assert {k.removeprefix("backbone.") for k in keys if k.startswith("backbone.")} == base_keys
    assert {k for k in keys if not k.startswith("backbone.")} == {"head.weight", "head.bias"}
    assert loaded.threshold()["value"] == 0.25


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_of_every_hf_family(family: str, tmp_path: Path) -> None:
    folder = tmp_path / family
    save_backbone(family, folder)
    detector = detector_on(str(folder), None, tmp_path)
    check_export(detector, tmp_path, folder, str(folder))


def test_an_export_scores_both_views_as_its_model_did(tmp_path: Path) -> None:
    folder = tmp_path / "vit"
    save_backbone("vit", folder)
    detector = detector_on(str(folder), None, tmp_path, ("attacks=generated",))
    assert detector.model.flip_average
    check_export(detector, tmp_path, folder, str(folder))  # the export's scores are the model's, to 1e-4
    assert Detector.load(tmp_path / "export.safetensors").model.flip_average


def test_export_of_a_timm_backbone(tmp_path: Path) -> None:
    from timm_support import import_timm

    timm = import_timm()
    from timm.models import _hub

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, img_size=28, embed_dim=32,
                              depth=2, num_heads=2)
    with torch.no_grad():  # DINOv2's LayerScale starts at 1e-5, which would make the blocks (and adapters) inert
        for module in model.modules():
            if hasattr(module, "gamma"):
                module.gamma.fill_(1.0)
    folder = tmp_path / "timm_hub"
    _hub.save_for_hf(model, folder, safe_serialization=True)
    detector = detector_on(str(folder), None, tmp_path)
    assert detector.spec.family == "timm"
    check_export(detector, tmp_path, folder, str(folder))
