import copy

import pytest
import torch
from models import HF4StyleViT, PlainNet, TimmStyleViT, hf_vit, hf_vit_mae
from torch import nn

from lora_vit import LoRAError, LoRALinear, inject_lora, lora_summary

FAMILIES = {
    "timm": (TimmStyleViT, lambda: torch.randn(2, 3, 32, 32)),
    "hf4": (HF4StyleViT, lambda: torch.randn(2, 5, 32)),
    "hf5-vit": (hf_vit, lambda: torch.randn(2, 3, 32, 32)),
    "hf5-vit-mae": (hf_vit_mae, lambda: torch.randn(2, 3, 32, 32)),
}


def run(model, x):
    if type(model).__name__ == "ViTMAEModel":
        # ViTMAE orders patches by random noise; fixed noise keeps outputs comparable.
        return model(x, noise=torch.arange(16.0).expand(x.shape[0], -1)).last_hidden_state
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_injection_computes_exactly_what_the_base_computed(family):
    build, make_input = FAMILIES[family]
    base = build()
    model = copy.deepcopy(base)
    inject_lora(model, ["q", "k", "v", "o", "fc1", "fc2"], r=2, alpha=8, dropout=0.1)
    x = make_input()
    base.eval()
    model.eval()
    assert torch.equal(run(model, x), run(base, x))
    model.train()
    base.train()
    torch.manual_seed(1)
    expected = run(base, x)
    torch.manual_seed(1)
    assert torch.equal(run(model, x), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_adapters_and_trainable_modules_train(family):
    build, make_input = FAMILIES[family]
    model = build()
    head = "head" if family == "timm" else ("classifier" if family == "hf4" else "layernorm")
    inject_lora(model, ("q", "k", "v"), r=2, alpha=4, dropout=0.0, trainable=[head])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        n for n, _ in model.named_parameters() if ".lora_" in n or n.split(".")[0] == head
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        run(model, make_input()).pow(2).mean().backward()
        optimizer.step()
    after = model.state_dict()
    for key, value in before.items():
        if ".lora_" in key or key.split(".")[0] == head:
            assert not torch.equal(after[key], value), f"{key} should have trained"
        else:
            assert torch.equal(after[key], value), f"base tensor {key} changed"


def test_timm_fused_qkv_gets_slices_with_own_factors():
    model = inject_lora(TimmStyleViT(dim=32), ["q", "v"], r={"q": 2, "v": 3}, alpha=8)
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, LoRALinear)
    assert [(s.name, s.start, s.stop, s.r) for s in qkv.slices] == [("q", 0, 32, 2), ("v", 64, 96, 3)]
    assert isinstance(model.blocks[0].attn.proj, nn.Linear)


def test_summary_counts_are_right():
    model = TimmStyleViT(dim=32, depth=2)
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    inject_lora(model, ["q", "v", "fc1"], r=4, trainable=["head"])
    summary = lora_summary(model)
    # q, v slices: 4 * (32 + 32) each; fc1 (32 -> 128): 4 * (32 + 128); per block.
    adapters = 2 * (2 * 4 * (32 + 32) + 4 * (32 + 128))
    assert summary.adapter_params == adapters
    assert summary.trainable_params == adapters + head
    assert summary.total_params == total + adapters
    assert summary.trainable_modules == ("head",)
    assert [name for name, _ in summary.adapted] == [
        "blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv", "blocks.1.mlp.fc1"
    ]
    text = str(summary)
    assert "blocks.0.attn.qkv: q[0:32] r=4, alpha=32, v[64:96] r=4, alpha=32" in text
    assert f"trainable params: {adapters + head:,} of {total + adapters:,}" in text


def test_injecting_twice_into_the_same_layer_is_an_error_and_changes_nothing():
    model = inject_lora(PlainNet(), ["stem"], r=2)
    snapshot = copy.deepcopy(model)
    with pytest.raises(LoRAError, match="'stem' already has a LoRA adapter"):
        inject_lora(model, ["readout", "stem"], r=2)
    assert isinstance(model.readout, nn.Linear) and not isinstance(model.readout, LoRALinear)
    assert str(model) == str(snapshot)


def test_second_injection_on_other_layers_keeps_earlier_adapters_trainable():
    model = inject_lora(PlainNet(), ["stem"], r=2, trainable=["readout"])
    inject_lora(model, ["mixer.left"], r=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "stem.lora_A", "stem.lora_B", "mixer.left.lora_A", "mixer.left.lora_B", "readout.weight", "readout.bias"
    }


def test_failed_injection_leaves_the_model_untouched():
    model = PlainNet()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    # r=8 suits stem (12 -> 24) but not readout (24 -> 5): stem must not be swapped either.
    with pytest.raises(LoRAError, match="r=8 is larger"):
        inject_lora(model, ["stem", "readout"], r=8)
    with pytest.raises(LoRAError):
        inject_lora(model, ["stem", "nothing_here"], r=2)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r must be a positive integer, got 0"),
        ({"alpha": 0}, "alpha must be a positive finite number, got 0"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\), got 1.5"),
        ({"init": "zeros"}, "init must be one of"),
        ({"trainable": ["classifier"]}, "'classifier' matches no module of PlainNet"),
        ({"trainable": ["stem"]}, "'stem' is both a LoRA target and inside trainable module 'stem'"),
        ({"r": {"other": 2}}, "without an entry for target 'stem'"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(LoRAError, match=message):
        inject_lora(PlainNet(), ["stem"], **kwargs)


def test_all_linear_skips_trainable_modules():
    model = inject_lora(PlainNet(), "all-linear", r=2, trainable="readout")
    assert [n for n, m in model.named_modules() if isinstance(m, LoRALinear)] == ["stem", "mixer.left", "mixer.right"]
    assert model.readout.weight.requires_grad


def test_per_target_rank_and_alpha():
    model = inject_lora(HF4StyleViT(), ["q", "v"], r={"q": 2, "v": 4}, alpha={"q": 2, "v": 16})
    query = model.encoder.layer[0].attention.attention.query
    value = model.encoder.layer[0].attention.attention.value
    assert (query.slices[0].r, query.scalings[0]) == (2, 1.0)
    assert (value.slices[0].r, value.scalings[0]) == (4, 4.0)


def test_eval_does_not_merge():
    model = inject_lora(PlainNet(), ["stem"], r=2)
    model.eval()
    model.train()
    assert isinstance(model.stem, LoRALinear)
