import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from models import PlainNet, TimmStyleViT
from torch import nn

from lora_vit import LoRAError, LoRALinear, inject_lora, merge_lora


def randomise_adapters(model, scale=1.0):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                for p in module.adapter_parameters():
                    p.normal_(0, scale)


@given(
    targets=st.lists(st.sampled_from(["q", "k", "v", "o", "fc1", "fc2"]), min_size=1, unique=True),
    r=st.integers(1, 8),
    alpha=st.floats(0.5, 32),
    rslora=st.booleans(),
    batch=st.integers(1, 3),
)
def test_merged_model_matches_unmerged(targets, r, alpha, rslora, batch):
    model = inject_lora(TimmStyleViT(dim=32), targets, r=r, alpha=alpha, use_rslora=rslora).eval()
    randomise_adapters(model, 0.1)
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        unmerged = model(x)
        merged = merge_lora(model)(x)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)


def test_merged_state_dict_has_the_base_keys_and_loads_into_an_unmodified_model():
    base = TimmStyleViT()
    model = inject_lora(copy.deepcopy(base), ["q", "v", "o", "mlp"], r=4, trainable=["head"]).eval()
    randomise_adapters(model, 0.1)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    merge_lora(model)
    state = model.state_dict()
    assert list(state) == list(base.state_dict())
    fresh = TimmStyleViT().eval()
    fresh.load_state_dict(state, strict=True)
    torch.testing.assert_close(fresh(x), expected, rtol=1e-4, atol=1e-5)
    assert [type(m) for m in fresh.modules()] == [type(m) for m in model.modules()]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_merge_is_computed_in_fp32_and_rounded_once(dtype):
    base = nn.Linear(64, 48).to(dtype)
    layer = LoRALinear(base, r=8, alpha=16)
    randomise_adapters(layer, 0.05)
    w, a, b = (t.detach().float() for t in (layer.weight, layer.lora_A, layer.lora_B))
    expected = (w + 2.0 * b @ a).to(dtype)
    merged = merge_lora(layer)
    assert type(merged) is nn.Linear and merged.weight.dtype == dtype
    assert torch.equal(merged.weight, expected)
    assert merged.bias is layer.bias


def test_merge_refuses_non_finite_results_and_leaves_the_model_untouched():
    model = inject_lora(PlainNet(), ["stem", "readout"], r=2)
    with torch.no_grad():
        model.readout.lora_B.fill_(float("inf"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoRAError, match=r"NaN or Inf into \['readout'\]"):
        merge_lora(model)
    assert isinstance(model.stem, LoRALinear) and isinstance(model.readout, LoRALinear)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_overflowing_merge_in_low_precision_is_refused():
    layer = LoRALinear(nn.Linear(4, 4).half(), r=1, alpha=1)
    with torch.no_grad():
        layer.lora_A.fill_(300.0)
        layer.lora_B.fill_(300.0)  # 90000 > fp16 max once rounded
    with pytest.raises(LoRAError, match="NaN or Inf"):
        layer.merged_linear()


def test_merge_without_adapters_is_an_error():
    with pytest.raises(LoRAError, match="no LoRA adapters to merge"):
        merge_lora(PlainNet())


def test_merge_keeps_trainable_head_and_frozen_base_flags():
    model = inject_lora(PlainNet(), ["stem"], r=2, trainable=["readout"])
    merge_lora(model)
    assert not model.stem.weight.requires_grad
    assert model.readout.weight.requires_grad


@pytest.mark.parametrize("use_dora", [False, True])
def test_a_float64_base_merges_in_float64(use_dora):
    base = nn.Linear(24, 12).double()
    layer = LoRALinear(copy.deepcopy(base), r=3, alpha=6, dropout=0.0, use_dora=use_dora)
    randomise_adapters(layer, 0.3)
    dense = base.weight.detach() + 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()  # alpha / r = 2
    if use_dora:
        dense = dense * (layer.lora_magnitude.detach() / dense.norm(dim=1))[:, None]
    merged = layer.merged_linear()
    assert merged.weight.dtype == torch.float64
    # Summed in float32 this differs by ~1e-8; in float64 only by float64 rounding.
    torch.testing.assert_close(merged.weight.detach(), dense, rtol=1e-13, atol=1e-14)
