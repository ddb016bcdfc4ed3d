"""The real torchvision ViT and open_clip VisionTransformer (skipped when the packages are absent)."""

import copy

import torch
from torch import nn
from vision_support import import_open_clip_transformer, import_torchvision

from lora_vit import (
    LoRALinear,
    LoRAMultiheadAttention,
    inject_lora,
    load_lora,
    merge_lora,
    save_lora,
    verify_lora,
)


def randomize(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (LoRALinear, LoRAMultiheadAttention)):
                for p in m.adapter_parameters():
                    p.normal_(0, 0.05)
    return model


def check_round_trip(base, x, targets, attn_name, tmp_path):
    base = base.eval()
    model = inject_lora(copy.deepcopy(base), targets, r=4, alpha=8)
    assert isinstance(model.get_submodule(attn_name), LoRAMultiheadAttention)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    randomize(model).eval()
    verify_lora(model, x)
    loaded = load_lora(copy.deepcopy(base), save_lora(model, tmp_path / "adapter.safetensors")).eval()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        merge_lora(model)
        assert type(model.get_submodule(attn_name)) is nn.MultiheadAttention
        plain = copy.deepcopy(base)
        plain.load_state_dict(model.state_dict(), strict=True)
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)
    model.train()
    model.zero_grad()
    loaded.train()(x).sum().backward()
    grads = [p.grad for n, p in loaded.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)


def test_torchvision_vision_transformer(tmp_path):
    tv = import_torchvision()
    base = tv.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=3
    )
    nn.init.normal_(base.heads.head.weight)  # torchvision starts the head at zero: no output would move
    check_round_trip(
        base, torch.randn(2, 3, 32, 32), ["q", "v", "o", "fc1", "fc2"], "encoder.layers.encoder_layer_0.self_attention",
        tmp_path,
    )


def test_torchvision_vit_b_16_adapts_and_merges_back_to_its_own_keys():
    tv = import_torchvision()
    base = tv.models.vit_b_16(weights=None).eval()
    model = inject_lora(copy.deepcopy(base), ["q", "v"], r=8, alpha=16)
    assert sum(isinstance(m, LoRAMultiheadAttention) for m in model.modules()) == 12
    merge_lora(randomize(model))  # the forward is tested on the small VisionTransformer above
    base.load_state_dict(model.state_dict(), strict=True)


def test_open_clip_vision_transformer(tmp_path):
    oc = import_open_clip_transformer()
    base = oc.VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_ratio=4.0, output_dim=8)
    check_round_trip(
        base, torch.randn(2, 3, 32, 32), ["q", "k", "v", "o", "fc1", "fc2"], "transformer.resblocks.0.attn", tmp_path
    )
