"""LoRA inside nn.MultiheadAttention: same function as PyTorch's module, adapters against dense references."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from mha_models import OpenClipStyleViT, TorchvisionStyleViT
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from lora_vit import (
    LoRAError,
    LoRALinear,
    LoRAMultiheadAttention,
    inject_lora,
    load_lora,
    lora_state_dict,
    lora_summary,
    merge_lora,
    save_lora,
    verify_lora,
)

FAMILIES = {"torchvision": TorchvisionStyleViT, "open_clip": OpenClipStyleViT}
ATTN = {"torchvision": "encoder.layers.encoder_layer_0.self_attention", "open_clip": "transformer.resblocks.0.attn"}


def randomize(model, std=0.1):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (LoRALinear, LoRAMultiheadAttention)):
                for p in m.adapter_parameters():
                    p.normal_(0, std)
    return model


def case_inputs(draw_case, dim=16):
    """query, key, value and call kwargs for one drawn case (seq-first or batch-first as asked)."""
    c = draw_case
    N, L, S = 2, 5, (5 if c["attention"] == "self" else 4)
    lead = (N, L) if c["batch_first"] else (L, N)
    query = torch.randn(*(lead if c["batched"] else (L,)), dim)
    if c["attention"] == "self":
        key = value = query
    else:
        kv_shape = ((N, S) if c["batch_first"] else (S, N)) if c["batched"] else (S,)
        key = torch.randn(*kv_shape, dim)
        value = key if c["attention"] == "shared_kv" else torch.randn(*kv_shape, dim)
    kwargs = {"need_weights": c["need_weights"], "average_attn_weights": c["average"]}
    if c["mask"] != "none" or c["causal"]:
        if c["causal"]:
            mask = torch.ones(L, S, dtype=torch.bool).triu(1)
        elif c["mask"] == "bool3d" and c["batched"]:
            mask = torch.rand(N * 2, L, S) > 0.7
        else:
            mask = torch.rand(L, S) > 0.7
        mask[..., 0] = False  # keep one position per row, or softmax of all -inf is NaN
        kwargs["attn_mask"] = mask.float().masked_fill(mask, float("-inf")) if c["mask"] == "float" else mask
        kwargs["is_causal"] = c["causal"]
    if c["padding"]:
        kpm = torch.rand(N, S) > 0.7 if c["batched"] else torch.rand(S) > 0.7
        kpm[..., 0] = False
        if "attn_mask" in kwargs and kwargs["attn_mask"].dtype != torch.bool:
            kpm = kpm.float().masked_fill(kpm, float("-inf"))
        kwargs["key_padding_mask"] = kpm
    return query, key, value, kwargs


CASES = st.fixed_dictionaries(
    {
        "batch_first": st.booleans(),
        "batched": st.booleans(),
        "attention": st.sampled_from(["self", "shared_kv", "cross"]),
        "need_weights": st.booleans(),
        "average": st.booleans(),
        "mask": st.sampled_from(["none", "bool", "float", "bool3d"]),
        "causal": st.booleans(),
        "padding": st.booleans(),
        "bias": st.booleans(),
        "bias_kv": st.booleans(),
        "zero_attn": st.booleans(),
        "mode": st.sampled_from(["train", "eval_grad", "eval_no_grad"]),
        "attn_dropout": st.sampled_from([0.0, 0.3]),
        "slices": st.sampled_from(["qv", "qkv", "whole", "none"]),
    }
)

SLICES = {"qv": {"q": (0, 16), "v": (32, 48)}, "qkv": {"q": (0, 16), "k": (16, 32), "v": (32, 48)}, "whole": None,
          "none": {}}


def run(module, query, key, value, kwargs, mode, seed=1):
    module.train(mode == "train")
    torch.manual_seed(seed)
    with torch.set_grad_enabled(mode != "eval_no_grad"):
        return module(query, key, value, **kwargs)


@settings(max_examples=60, deadline=None)
@given(case=CASES)
def test_fresh_adapter_computes_exactly_what_multihead_attention_computes(case):
    """Every argument combination, both routes (adapter node / merged weights), same outputs and grads."""
    base = nn.MultiheadAttention(16, 2, dropout=case["attn_dropout"], bias=case["bias"], add_bias_kv=case["bias_kv"],
                                 add_zero_attn=case["zero_attn"], batch_first=case["batch_first"])
    adapted = LoRAMultiheadAttention(copy.deepcopy(base), r=2, alpha=4, dropout=0.0, slices=SLICES[case["slices"]])
    query, key, value, kwargs = case_inputs(case)
    if case["mode"] != "eval_no_grad":
        query.requires_grad_(True)
    expected_error = None
    try:
        expected = run(base, query, key, value, kwargs, case["mode"])
    except (RuntimeError, AssertionError) as err:
        expected_error = type(err)
    if expected_error is not None:
        with pytest.raises(expected_error):
            run(adapted, query, key, value, kwargs, case["mode"])
        return
    got = run(adapted, query, key, value, kwargs, case["mode"])
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    if expected[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)
    if case["mode"] != "eval_no_grad":
        (g_expected,) = torch.autograd.grad(expected[0].square().sum(), query)
        (g_got,) = torch.autograd.grad(got[0].square().sum(), query)
        torch.testing.assert_close(g_got, g_expected, rtol=1e-5, atol=1e-6)


def dense_reference(adapted: LoRAMultiheadAttention, a_b: dict, query, kwargs):
    """F.multi_head_attention_forward with W + s * B @ A formed explicitly from the leaf tensors ``a_b``."""
    w = adapted.in_proj_weight.detach().clone()
    for s, scaling in zip(adapted.slices, adapted.scalings):
        update = scaling * a_b[s.b_name] @ a_b[s.a_name]
        w = w + F.pad(update, (0, 0, s.start, w.shape[0] - s.stop))
    out_w = adapted.out_proj.weight.detach()
    if isinstance(adapted.out_proj, LoRALinear):
        out_w = out_w + adapted.out_proj.scalings[0] * a_b["out_proj.lora_B"] @ a_b["out_proj.lora_A"]
    x = query.transpose(0, 1) if adapted.batch_first else query
    out, _ = F.multi_head_attention_forward(
        x, x, x, adapted.embed_dim, adapted.num_heads, w, adapted.in_proj_bias, None, None, False, 0.0, out_w,
        adapted.out_proj.bias, training=False, need_weights=False, **kwargs,
    )
    return out.transpose(0, 1) if adapted.batch_first else out


@pytest.mark.parametrize("no_grad", [False, True], ids=["adapter-node", "merged-weights"])
def test_adapted_forward_and_gradients_match_a_dense_float64_reference(no_grad):
    holder = nn.Module()
    holder.attn = nn.MultiheadAttention(16, 4, batch_first=True, dtype=torch.float64)
    inject_lora(holder, ["q", "v", "o"], r={"q": 2, "v": 3, "o": 2}, alpha=4, dropout=0.0)
    adapted = randomize(holder).attn.eval()
    query = torch.randn(3, 6, 16, dtype=torch.float64)
    mask = torch.rand(6, 6) > 0.8
    mask[:, 0] = False
    kwargs = {"attn_mask": mask}
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in adapted.named_parameters() if "lora_" in n}
    reference = dense_reference(adapted, leaves, query, kwargs)
    if no_grad:
        with torch.no_grad():
            out = adapted(query, query, query, need_weights=False, **kwargs)[0]
        # Merged weights are formed in float32 (as merge_lora forms them), then rounded once.
        torch.testing.assert_close(out, reference.detach(), rtol=1e-6, atol=1e-6)
        return
    out = adapted(query, query, query, need_weights=False, **kwargs)[0]
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (reference * upstream).sum().backward()
    for name, param in adapted.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param.grad, leaves[name].grad, rtol=1e-9, atol=1e-10, msg=name)


def test_in_projection_update_is_lora_linears_for_the_same_factors():
    mha = nn.MultiheadAttention(12, 3)
    adapted = randomize(LoRAMultiheadAttention(mha, r=2, alpha=6, slices={"k": (12, 24), "v": (24, 36)}))
    linear = nn.Linear(12, 36)
    linear.weight, linear.bias = mha.in_proj_weight, mha.in_proj_bias
    twin = LoRALinear(linear, r=2, alpha=6, slices={"k": (12, 24), "v": (24, 36)})
    for name in ("lora_A_k", "lora_B_k", "lora_A_v", "lora_B_v"):
        getattr(twin, name).data.copy_(getattr(adapted, name))
    torch.testing.assert_close(adapted.delta_weight(), twin.delta_weight(), rtol=0, atol=0)
    x = torch.randn(4, 5, 12)
    expected = twin.eval()(x).unflatten(-1, (3, 12))
    q, k, v = adapted.eval()._project(x, x, x)
    torch.testing.assert_close(torch.stack([q, k, v], dim=-2), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_inject_q_v_o_keeps_keys_starts_at_base_and_merges_to_plain_modules(family):
    base = FAMILIES[family]().eval()
    model = inject_lora(copy.deepcopy(base), ["q", "v", "o"], r=2, alpha=4)
    attn = model.get_submodule(ATTN[family])
    assert isinstance(attn, LoRAMultiheadAttention) and isinstance(attn.out_proj, LoRALinear)
    assert [s.name for s in attn.slices] == ["q", "v"]
    assert set(base.state_dict()) <= set(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    randomize(model)
    with torch.no_grad():
        unmerged = model(x)
    assert not torch.allclose(unmerged, base(x))
    merge_lora(model)
    merged_attn = model.get_submodule(ATTN[family])
    assert type(merged_attn) is nn.MultiheadAttention
    assert type(merged_attn.out_proj) is NonDynamicallyQuantizableLinear
    fresh = copy.deepcopy(base)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), unmerged, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_verify_and_state_dict_on_a_fresh_model(family, tmp_path):
    base = FAMILIES[family]()
    model = randomize(inject_lora(copy.deepcopy(base), ["q", "k", "v", "o"], r=2, alpha=4)).eval()
    prefix = ATTN[family]
    state = lora_state_dict(model)
    assert {k for k in state if k.startswith(prefix + ".")} == {
        f"{prefix}.lora_{f}_{s}" for f in "AB" for s in "qkv"
    } | {f"{prefix}.out_proj.lora_A", f"{prefix}.out_proj.lora_B"}
    x = torch.randn(2, 3, 32, 32)
    changes = verify_lora(model, x)
    assert f"{prefix}[q]" in changes and f"{prefix}.out_proj" in changes
    path = save_lora(model, tmp_path / "a.safetensors")
    loaded = load_lora(copy.deepcopy(base), path).eval()
    assert isinstance(loaded.get_submodule(prefix), LoRAMultiheadAttention)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    other = FAMILIES[family]()
    with pytest.raises(LoRAError, match="other base weights"):
        load_lora(other, path)


def test_o_alone_routes_multihead_attention_through_its_out_proj(tmp_path):
    base = TorchvisionStyleViT().eval()
    model = randomize(inject_lora(copy.deepcopy(base), ["o"], r=2, alpha=4))
    attn = model.get_submodule(ATTN["torchvision"])
    assert isinstance(attn, LoRAMultiheadAttention) and attn.slices == ()
    assert next(name for name, _ in lora_summary(model).adapted).endswith("self_attention.out_proj")
    x = torch.randn(2, 3, 32, 32)
    verify_lora(model, x)
    loaded = load_lora(copy.deepcopy(base), save_lora(model, tmp_path / "o.safetensors"))
    assert isinstance(loaded.get_submodule(ATTN["torchvision"]), LoRAMultiheadAttention)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        merge_lora(model)
        assert type(model.get_submodule(ATTN["torchvision"])) is nn.MultiheadAttention
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_literal_name_and_all_linear_adapt_the_whole_in_projection():
    model = inject_lora(OpenClipStyleViT(), ["*.attn"], r=2)  # a glob: "attn" alone is the q, k, v, o preset
    attn = model.get_submodule(ATTN["open_clip"])
    assert attn.covers_all_rows and attn.slices[0].name == "" and not isinstance(attn.out_proj, LoRALinear)
    everything = inject_lora(OpenClipStyleViT(), ["all-linear"], r=2)
    names = dict(lora_summary(everything).adapted)
    assert "transformer.resblocks.0.attn" in names and "transformer.resblocks.0.attn.out_proj" in names


def test_injecting_twice_is_refused_but_o_then_q_is_fine():
    model = inject_lora(TorchvisionStyleViT(), ["q"], r=2)
    with pytest.raises(LoRAError, match="already has a LoRA adapter"):
        inject_lora(model, ["v"], r=2)
    model = inject_lora(TorchvisionStyleViT(), ["o"], r=2)
    inject_lora(model, ["q"], r=2)
    attn = model.get_submodule(ATTN["torchvision"])
    assert [s.name for s in attn.slices] == ["q"] and isinstance(attn.out_proj, LoRALinear)


def test_separate_weight_attention_refuses_q_k_v_and_adapts_o():
    holder = nn.Module()
    holder.attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=12)
    with pytest.raises(LoRAError, match="separate q/k/v weights"):
        inject_lora(copy.deepcopy(holder), ["q"])
    base = copy.deepcopy(holder)
    inject_lora(holder, ["o"], r=2, alpha=4, dropout=0.0)
    randomize(holder)
    q, k, v = torch.randn(5, 2, 16), torch.randn(4, 2, 8), torch.randn(4, 2, 12)
    out_proj = holder.attn.out_proj
    base.attn.out_proj.weight.data = out_proj.merged_weight()
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(holder.attn(q, k, v)[0], base.attn(q, k, v)[0], rtol=1e-5, atol=1e-6)


def test_root_multihead_attention_cannot_route_its_own_out_proj():
    with pytest.raises(LoRAError, match="model itself"):
        inject_lora(nn.MultiheadAttention(8, 2), ["o"])


def test_lora_dropout_is_the_in_projection_inputs_and_attention_dropout_keeps_its_meaning():
    holder = nn.Module()
    holder.attn = nn.MultiheadAttention(16, 2, dropout=0.25, batch_first=True)
    inject_lora(holder, ["q", "v"], r=2, dropout=0.5)
    attn = randomize(holder).attn
    assert attn.dropout == 0.25 and attn.lora_dropout == 0.5
    x = torch.randn(2, 5, 16)
    attn.train()
    attn.dropout = 0.0
    a, b = attn(x, x, x)[0], attn(x, x, x)[0]
    assert not torch.allclose(a, b), "LoRA dropout draws a new mask per call in training"
    attn.eval()
    with torch.no_grad():
        merged = attn(x, x, x)[0]
    torch.testing.assert_close(attn(x, x, x)[0], merged, rtol=1e-5, atol=1e-6)


def _peft_outputs(base, folder, x):
    from peft import PeftModel

    with torch.no_grad():
        return PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()(x)


def test_peft_round_trip_of_whole_in_projection_adapters(tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    from lora_vit import load_peft_adapter, save_peft_adapter

    base = TorchvisionStyleViT().eval()
    x = torch.randn(2, 3, 32, 32)
    ours = randomize(inject_lora(copy.deepcopy(base), ["*.self_attention"], r=2, alpha=4, dropout=0.0)).eval()
    with torch.no_grad():
        expected = ours(x)
    folder = save_peft_adapter(ours, tmp_path / "ours")
    torch.testing.assert_close(_peft_outputs(base, folder, x), expected, rtol=1e-5, atol=1e-5)
    back = load_peft_adapter(copy.deepcopy(base), folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), expected, rtol=0, atol=0)

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["self_attention"],
                        rank_pattern={"encoder_layer_1.self_attention": 3})
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name and "out_proj" not in name:
                param.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "theirs")
    loaded = load_peft_adapter(copy.deepcopy(base), tmp_path / "theirs").eval()
    attn = loaded.encoder.layers.encoder_layer_1.self_attention
    assert attn.slices[0].r == 3 and not isinstance(attn.out_proj, LoRALinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), peft_model.eval()(x), rtol=1e-5, atol=1e-5)



def _peft_with_out_proj(base, folder):
    """A PEFT MultiheadAttention adapter with non-zero in-projection and out_proj updates, saved to ``folder``."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["self_attention"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    peft_model.save_pretrained(folder)
    return peft_model.eval()


def _set_peft_version(folder, version):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    if version is None:
        del config["peft_version"]
    else:
        config["peft_version"] = version
    path.write_text(json.dumps(config))


@pytest.mark.filterwarnings("ignore:Adapter 'default' was saved with PEFT < 0.22.0")
def test_peft_multihead_attention_out_proj_loads_with_peft_s_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    from lora_vit import load_peft_adapter

    if _release(peft.__version__) < (0, 22, 0):
        pytest.skip(f"peft {peft.__version__} adds the out_proj update twice; 0.22.0 and later add it once")
    base = TorchvisionStyleViT().eval()
    peft_model = _peft_with_out_proj(base, tmp_path)
    x = torch.randn(2, 3, 32, 32)
    loaded = load_peft_adapter(copy.deepcopy(base), tmp_path).eval()
    attn = loaded.encoder.layers.encoder_layer_0.self_attention
    assert isinstance(attn.out_proj, LoRALinear) and attn.out_proj.lora_A.shape == (2, attn.embed_dim)
    with torch.no_grad():
        expected = peft_model(x)
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
        # The same folder as an earlier PEFT wrote it: that PEFT added the update twice, so both
        # PEFT 0.22 and lora-vit double its lora_B, and the outputs move away from `expected` alike.
        for version in ("0.21.2", None, "0.21.0.dev0"):
            _set_peft_version(tmp_path, version)
            older = load_peft_adapter(copy.deepcopy(base), tmp_path).eval()
            assert not torch.allclose(older(x), expected, rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(older(x), _peft_outputs(base, tmp_path, x), rtol=1e-5, atol=1e-5)
        for version in ("0.22.0", "0.21.1.dev0@abc1234", "1.0"):
            _set_peft_version(tmp_path, version)
            torch.testing.assert_close(load_peft_adapter(copy.deepcopy(base), tmp_path).eval()(x), expected,
                                       rtol=1e-5, atol=1e-5)


def test_peft_multihead_attention_folder_with_an_unreadable_version_is_refused_unchanged(tmp_path):
    pytest.importorskip("peft")
    from lora_vit import load_peft_adapter

    base = TorchvisionStyleViT().eval()
    _peft_with_out_proj(base, tmp_path)
    _set_peft_version(tmp_path, "main")
    model = copy.deepcopy(base)
    with pytest.raises(LoRAError, match="peft_version 'main' is not a version number"):
        load_peft_adapter(model, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def _release(version):
    return tuple(int(part) for part in version.split(".")[:3] if part.isdigit())


def test_peft_applies_a_multihead_attention_out_proj_update_once_since_0_22():
    """The reference for the tests above: PEFT's forward against a dense W + (alpha / r) B A on out_proj."""
    peft = pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    if _release(peft.__version__) < (0, 22, 0):
        pytest.skip(f"peft {peft.__version__} adds the out_proj update twice; 0.22.0 and later add it once")
    base = TorchvisionStyleViT().eval()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["self_attention"]))
    dense = copy.deepcopy(base)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "out_proj.lora_" in name:
                param.normal_(0, 0.1)
        for name, module in dense.named_modules():
            if isinstance(module, nn.MultiheadAttention):
                inner = peft_model.base_model.model.get_submodule(name).base_layer.out_proj
                delta = inner.lora_B["default"].weight @ inner.lora_A["default"].weight
                module.out_proj.weight += (4 / 2) * delta
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(peft_model.eval()(x), dense(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("targets", "message"), [
    (["q", "v"], "whole in-projection"),
    (["o"], "out_proj alone"),
])
def test_peft_export_refuses_what_peft_multihead_attention_cannot_hold(targets, message, tmp_path):
    pytest.importorskip("peft")
    from lora_vit import save_peft_adapter

    model = inject_lora(TorchvisionStyleViT(), targets, r=2)
    with pytest.raises(LoRAError, match=message):
        save_peft_adapter(model, tmp_path / "ours")


def test_peft_export_of_an_out_proj_adapter_gives_peft_s_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    from lora_vit import load_peft_adapter, save_peft_adapter

    base = TorchvisionStyleViT().eval()
    ours = randomize(inject_lora(copy.deepcopy(base), ["all-linear"], r=2, alpha=4, dropout=0.0)).eval()
    folder = save_peft_adapter(ours, tmp_path / "ours")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_version"] == "0.22.0"
    assert not any(name.endswith("out_proj") for name in config["target_modules"])  # inside the attention's
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ours(x)
        back = load_peft_adapter(copy.deepcopy(base), folder).eval()
        torch.testing.assert_close(back(x), expected, rtol=0, atol=0)
        if _release(peft.__version__) >= (0, 22, 0):
            torch.testing.assert_close(_peft_outputs(base, folder, x), expected, rtol=1e-5, atol=1e-5)


def test_peft_export_refuses_an_out_proj_adapter_set_apart_from_its_in_projection(tmp_path):
    from lora_vit import save_peft_adapter

    model = inject_lora(TorchvisionStyleViT(), ["*.self_attention", "o"], r={"*.self_attention": 2, "o": 3})
    with pytest.raises(LoRAError, match=r"one adapter setting.*'r': \(2, 3\)"):
        save_peft_adapter(model, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def test_transformer_encoder_layer_calls_the_adapted_attention_instead_of_its_fast_path():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

        def forward(self, x):
            return self.encoder(x)

    model = randomize(inject_lora(Encoder(), ["q", "v", "o"], r=2, dropout=0.0)).eval()
    x = torch.randn(2, 5, 16)
    assert set(verify_lora(model, x)) >= {"encoder.layers.0.self_attn[q]", "encoder.layers.1.self_attn.out_proj"}
    with torch.no_grad():
        unmerged = model(x)
        merged = merge_lora(model)
        assert not merged.encoder.layers[0].self_attn._forward_pre_hooks  # plain again: its fast path is back
        torch.testing.assert_close(merged(x), unmerged, rtol=1e-5, atol=1e-5)
