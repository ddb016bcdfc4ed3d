"""The example's ``lora_use_dora`` option reaches ``inject_lora``."""

from __future__ import annotations

from pathlib import Path

import torch
from madlab.io.config import Config, apply_overrides
from madlab.model.backbone import load_backbone
from madlab.model.network import MorphDetector, apply_strategy

from lora_vit import LoRALinear


def detector(tmp_path: Path) -> MorphDetector:
    from transformers import ViTConfig, ViTModel

    vit = ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=64), add_pooling_layer=False)
    vit.save_pretrained(tmp_path / "vit")
    return MorphDetector(*load_backbone(tmp_path / "vit"), 0.0)


def test_lora_use_dora_defaults_off_and_injects_dora_when_set(tmp_path: Path) -> None:
    assert Config().lora_use_dora is False
    model = detector(tmp_path)
    params, _ = apply_strategy(model, apply_overrides(Config(), ["lora_use_dora=true"]))
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert layers and all(m.use_dora for m in layers)
    magnitudes = {id(m.lora_magnitude) for m in layers}
    assert magnitudes <= {id(p) for p in params}, "the magnitudes are handed to the optimiser"
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(2, 3, 16, 16))).all()
