"""Real timm model classes (tiny configs, pretrained=False): fused-qkv slices, merging, EVA/BEiT."""

import copy
import itertools

import pytest
import torch
from timm_support import import_timm

from lora_vit import LoRAError, LoRALinear, inject_lora, load_lora, merge_lora, save_lora
from lora_vit.verify import verify_lora

timm = import_timm()

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 4, "num_classes": 3}
VITS = {
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 8},
    "deit_tiny_patch16_224": {"img_size": 32, "patch_size": 8},
    "deit_tiny_distilled_patch16_224": {"img_size": 32, "patch_size": 8},
}
# Attention that computes F.linear(x, self.qkv.weight, cat(q_bias, k_bias, v_bias)).
READERS = {
    "eva02_tiny_patch14_224": {"img_size": 28},
    "beit_base_patch16_224": {"img_size": 32, "patch_size": 8},
}


def create(name, **extra):
    kwargs = {**TINY, **VITS.get(name, {}), **READERS.get(name, {}), **extra}
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():  # timm starts biases (q_bias, v_bias included) at zero; make them count
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.normal_(0, 0.2)
    return model


def images(name, batch=2):
    size = {**VITS, **READERS}[name]["img_size"]
    return torch.randn(batch, 3, size, size)


def randomise(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for p in m.adapter_parameters():
                    p.normal_(0, 0.3)


def run(model, x):
    with torch.no_grad():
        return model(x)


SUBSETS = [list(c) for n in (1, 2, 3) for c in itertools.combinations("qkv", n)]


@pytest.mark.parametrize("roles", SUBSETS, ids=["".join(s) for s in SUBSETS])
def test_vit_adapts_exactly_the_chosen_qkv_slices(roles):
    base = create("vit_tiny_patch16_224")
    model = inject_lora(copy.deepcopy(base), roles, r=2, alpha=4, dropout=0.0)
    x = images("vit_tiny_patch16_224")
    assert torch.equal(run(model, x), run(base, x))  # B starts at zero
    randomise(model)
    layer, plain = model.blocks[0].attn.qkv, base.blocks[0].attn.qkv
    assert [s.name for s in layer.slices] == roles
    tokens = torch.randn(2, 5, 32)
    with torch.no_grad():
        out, ref = layer(tokens), plain(tokens)
    for index, role in enumerate("qkv"):
        rows = slice(32 * index, 32 * (index + 1))
        assert torch.equal(out[..., rows], ref[..., rows]) == (role not in roles), role
    # The dense formula for the adapted rows.
    for s, scaling in zip(layer.slices, layer.scalings):
        A, B = getattr(layer, s.a_name), getattr(layer, s.b_name)
        torch.testing.assert_close(out[..., s.start:s.stop], ref[..., s.start:s.stop] + tokens @ A.T @ B.T * scaling)
    assert set(verify_lora(model, x)) == {f"blocks.{i}.attn.qkv[{r}]" for i in range(2) for r in roles}


@pytest.mark.parametrize("name", list(VITS))
def test_merged_vit_and_deit_load_into_an_unmodified_timm_model(name):
    base = create(name)
    model = inject_lora(copy.deepcopy(base), ["q", "v", "o", "fc1"], r=4, alpha=8, trainable=["head"]).eval()
    randomise(model)
    x = images(name)
    expected = run(model, x)
    assert not torch.allclose(expected, run(base, x), atol=1e-3)
    merge_lora(model)
    plain = create(name)
    plain.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(run(plain, x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(READERS))
def test_weight_reading_attention_is_caught_by_verify_lora(name):
    model = inject_lora(create(name), ["q", "v", "fc1"], r=2, alpha=4)
    for block in model.blocks:  # what a model with no switch does: F.linear on qkv.weight
        block.attn.qkv_bias_separate = False
    with pytest.raises(LoRAError, match="do not change the output") as caught:
        verify_lora(model, images(name))
    message = str(caught.value)
    assert "blocks.0.attn.qkv[q]" in message and "blocks.1.attn.qkv[v]" in message
    assert "mlp.fc1" not in message.splitlines()[0]  # the called layers are fine
    assert "reads `layer.weight`" in message


@pytest.mark.parametrize("name", list(READERS))
def test_weight_reading_attention_is_routed_through_the_adapter(name, tmp_path):
    base = create(name)
    x = images(name)
    model = inject_lora(copy.deepcopy(base), ["q", "v"], r=2, alpha=4, dropout=0.0)
    assert all(block.attn.qkv_bias_separate for block in model.blocks)
    assert not any(block.attn.qkv_bias_separate for block in base.blocks)
    assert torch.equal(run(model, x), run(base, x))  # same function, now through the layer
    assert len(verify_lora(model, x)) == 4

    randomise(model)
    expected = run(model, x)
    attn = model.blocks[0].attn  # the adapter acts on the rows the attention reads
    tokens = torch.randn(1, 4, 32)
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    dense = attn.qkv.merged_weight()
    with torch.no_grad():
        torch.testing.assert_close(attn.qkv(tokens) + bias, torch.nn.functional.linear(tokens, dense, bias))

    path = save_lora(model, tmp_path / f"{name}.safetensors")
    fresh = load_lora(copy.deepcopy(base), path)
    assert all(block.attn.qkv_bias_separate for block in fresh.blocks)
    assert torch.equal(run(fresh, x), expected)

    merge_lora(model)
    plain = create(name)
    plain.load_state_dict(model.state_dict(), strict=True)
    assert not plain.blocks[0].attn.qkv_bias_separate
    torch.testing.assert_close(run(plain, x), expected, rtol=1e-4, atol=1e-5)


def test_training_through_eva_changes_what_the_attention_computes():
    model = inject_lora(create("eva02_tiny_patch14_224"), ["q", "k", "v"], r=2, alpha=4, dropout=0.1).train()
    randomise(model)
    x = images("eva02_tiny_patch14_224")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=10.0)
    before = run(model.eval(), x)
    model.train()
    model.forward_features(x).square().mean().backward()
    grads = [p.grad for p in model.blocks[0].attn.qkv.adapter_parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    opt.step()
    assert not torch.equal(run(model.eval(), x), before)
