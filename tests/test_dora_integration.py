"""DoRA with the rest of the library: disable_lora, rank-padded swaps, nn.MultiheadAttention."""

import copy

import pytest
import torch
from mha_models import TorchvisionStyleViT
from models import TimmStyleViT

from lora_vit import LoRAError, LoRALinear, disable_lora, inject_lora, load_lora, merge_lora, save_lora


def trained(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for s in m.slices:
                    getattr(m, s.b_name).normal_(0, 0.2)
                    getattr(m, s.magnitude_name).mul_(1.3)
    return model.eval()


def test_disable_lora_gives_the_base_outputs_and_restores_dora():
    base = TimmStyleViT().eval()
    model = trained(inject_lora(copy.deepcopy(base), ["q", "v", "fc1"], r=2, use_dora=True))
    x = torch.randn(2, 3, 32, 32)
    adapted = model(x)
    with disable_lora(model):
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=0)


def test_lower_rank_dora_swaps_into_a_maximum_rank_model(tmp_path):
    torch.manual_seed(0)
    base = TimmStyleViT().eval()
    small = trained(inject_lora(copy.deepcopy(base), ["q", "v"], r=2, alpha=4, use_dora=True))
    path = save_lora(small, tmp_path / "r2.safetensors")
    big = inject_lora(copy.deepcopy(base), ["q", "v"], r=8, alpha=4, use_dora=True).eval()
    load_lora(big, path, pad=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(big(x), small(x), rtol=1e-5, atol=1e-6)


def test_dora_refused_on_mha_in_projection_and_allowed_on_its_out_proj():
    with pytest.raises(LoRAError, match=r"use_dora is not supported on nn\.MultiheadAttention"):
        inject_lora(TorchvisionStyleViT(), ["q", "v"], r=2, use_dora=True)
    base = TorchvisionStyleViT().eval()
    model = trained(inject_lora(copy.deepcopy(base), ["o"], r=2, use_dora=True))
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    assert not torch.allclose(expected, base(x), atol=1e-4)
    torch.testing.assert_close(merge_lora(model)(x), expected, rtol=1e-5, atol=1e-5)


def test_dora_trains_through_real_timm_eva_and_beit():
    from timm_support import import_timm

    timm = import_timm()
    for name, kwargs in {"eva02_tiny_patch14_224": {"img_size": 28},
                         "beit_base_patch16_224": {"img_size": 32, "patch_size": 8}}.items():
        model = timm.create_model(name, pretrained=False, depth=2, embed_dim=32, num_heads=4, num_classes=3, **kwargs)
        inject_lora(model, ["q", "v"], r=2, alpha=4, dropout=0.1, use_dora=True).train()
        size = kwargs["img_size"]
        model.forward_features(torch.randn(2, 3, size, size)).square().mean().backward()  # qkv += bias after it
        grad = model.blocks[0].attn.qkv.lora_magnitude_q.grad
        assert grad is not None and torch.isfinite(grad).all(), name
