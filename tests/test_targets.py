import pytest
from models import HF4StyleViT, PlainNet, TimmStyleViT, hf_vit
from torch import nn

from lora_vit import LoRAError, inject_lora, resolve_targets


def names(model, targets, **kwargs):
    return [(m.module, m.slice, m.bounds) for m in resolve_targets(model, targets, **kwargs)]


def per_block(template, depth=2):
    return [template.format(i) for i in range(depth)]


HF4 = "encoder.layer.{}."
HF5 = "layers.{}."


@pytest.mark.parametrize(
    ("target", "hf4", "hf5", "timm"),
    [
        ("q", ["attention.attention.query"], ["attention.q_proj"], [("attn.qkv", "q", (0, 32))]),
        ("k", ["attention.attention.key"], ["attention.k_proj"], [("attn.qkv", "k", (32, 64))]),
        ("v", ["attention.attention.value"], ["attention.v_proj"], [("attn.qkv", "v", (64, 96))]),
        ("o", ["attention.output.dense"], ["attention.o_proj"], ["attn.proj"]),
        ("fc1", ["intermediate.dense"], ["mlp.fc1"], ["mlp.fc1"]),
        ("fc2", ["output.dense"], ["mlp.fc2"], ["mlp.fc2"]),
    ],
)
def test_logical_names_find_the_same_role_in_every_family(target, hf4, hf5, timm):
    def expand(prefix, items):
        out = []
        for i in range(2):
            for item in items:
                if isinstance(item, tuple):
                    out.append((prefix.format(i) + item[0], item[1], item[2]))
                else:
                    out.append((prefix.format(i) + item, None, None))
        return out

    assert names(HF4StyleViT(), [target]) == expand(HF4, hf4)
    assert names(hf_vit(), [target]) == expand(HF5, hf5)
    assert names(TimmStyleViT(), [target]) == expand("blocks.{}.", timm)


def test_seed_target_names_work_on_both_hf_schemes_and_timm():
    seed = ["query", "key", "value"]
    assert names(HF4StyleViT(), seed) == names(HF4StyleViT(), ["q", "k", "v"])
    assert [m[0] for m in names(hf_vit(), seed)] == [
        f"layers.{i}.attention.{p}_proj" for i in range(2) for p in "qkv"
    ]
    assert {m[1] for m in names(TimmStyleViT(), seed)} == {"q", "k", "v"}


def test_presets_expand_to_their_roles():
    model = TimmStyleViT()
    assert names(model, ["qkv"]) == names(model, ["q", "k", "v"])
    assert sorted(names(model, ["attn"]), key=str) == sorted(names(model, ["q", "k", "v", "o"]), key=str)
    assert names(model, ["mlp"]) == names(model, ["fc1", "fc2"])
    all_linear = [m[0] for m in names(model, ["all-linear"])]
    assert all_linear == [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert "head" not in [m[0] for m in names(model, ["all-linear"], exclude=["head"])]


def test_literal_suffix_and_glob_targets():
    model = PlainNet()
    assert [m[0] for m in names(model, ["mixer.left"])] == ["mixer.left"]
    assert [m[0] for m in names(model, ["left"])] == ["mixer.left"]
    assert [m[0] for m in names(model, ["mixer.*"])] == ["mixer.left", "mixer.right"]
    assert [m[0] for m in names(model, ["*t"])] == ["mixer.left", "mixer.right", "readout"]
    # A suffix matches whole components only: "eft" is not "left".
    with pytest.raises(LoRAError):
        resolve_targets(model, ["eft"])
    deep = TimmStyleViT()
    assert [m[0] for m in names(deep, ["blocks.1.attn.qkv"])] == ["blocks.1.attn.qkv"]
    assert names(deep, ["blocks.1.attn.qkv"])[0][1] is None  # a literal name adapts the whole layer


def test_duplicate_targets_adapt_a_layer_once():
    model = HF4StyleViT()
    assert names(model, ["q", "query", "attention.query"]) == names(model, ["q"])


def test_unmatched_target_lists_the_models_linear_layers():
    with pytest.raises(LoRAError) as err:
        resolve_targets(PlainNet(), ["q"])
    message = str(err.value)
    assert "'q' matches no Linear layer of PlainNet" in message
    for layer in ("stem", "mixer.left", "mixer.right", "readout"):
        assert layer in message
    with pytest.raises(LoRAError, match=r"blocks\.\*\.attn\.qkv \(x2\)"):
        resolve_targets(TimmStyleViT(), ["query_proj"])


def test_bad_target_values():
    with pytest.raises(LoRAError, match="targets is empty"):
        resolve_targets(PlainNet(), [])
    with pytest.raises(LoRAError, match="non-empty strings, got 3"):
        resolve_targets(PlainNet(), [3])  # type: ignore[list-item]
    assert names(PlainNet(), "stem") == [("stem", None, None)]  # a single string is one target


def test_whole_and_slice_of_the_same_fused_layer_is_an_error():
    with pytest.raises(LoRAError, match="both as a whole and as the fused slices"):
        resolve_targets(TimmStyleViT(), ["q", "blocks.0.attn.qkv"])


def test_fused_projection_that_does_not_split_in_three_is_an_error():
    model = nn.Sequential()
    model.add_module("qkv", nn.Linear(8, 10))
    with pytest.raises(LoRAError, match="do not split into three"):
        resolve_targets(model, ["q"])


def test_multihead_attention_roles_are_its_in_projection_thirds_and_out_proj():
    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2)

    found = [(m.module, m.slice, m.bounds) for m in resolve_targets(WithMHA(), ["q", "v", "o"])]
    assert found == [("mha", "q", (0, 8)), ("mha", "v", (16, 24)), ("mha.out_proj", None, None)]


def test_already_adapted_layer_is_refused():
    model = inject_lora(HF4StyleViT(), ["q"], r=2)
    with pytest.raises(LoRAError, match="already has a LoRA adapter"):
        resolve_targets(model, ["query"])
