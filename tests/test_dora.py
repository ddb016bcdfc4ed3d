"""DoRA: forward and every gradient against a dense float64 formula, norms, memory, merge, files."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lora_vit import (
    LoRAError,
    LoRALinear,
    inject_lora,
    load_lora,
    load_lora_state_dict,
    lora_state_dict,
    lora_summary,
    merge_lora,
    save_lora,
    verify_lora,
)
from lora_vit.functional import dora_row_norms

IN, OUT = 24, 18
SLICES = {"q": (0, 6), "v": (12, 18)}


def make_layer(sliced, dtype=torch.float64, p=0.0, bias=True, use_rslora=False, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT, bias=bias).to(dtype)
    if sliced:
        layer = LoRALinear(base, {"q": 2, "v": 3}, {"q": 4, "v": 6}, p, slices=SLICES, use_dora=True,
                           use_rslora=use_rslora)
    else:
        layer = LoRALinear(base, 3, 6, p, use_dora=True, use_rslora=use_rslora)
    with torch.no_grad():  # a trained-looking adapter: B != 0, magnitudes away from the row norms
        for s in layer.slices:
            getattr(layer, s.b_name).normal_(0, 0.3)
            getattr(layer, s.magnitude_name).mul_(torch.empty(s.rows, dtype=dtype).uniform_(0.5, 1.5))
    return layer


def dropout_mask(shape, p, seed):
    """The keep mask the fused nodes draw after ``torch.manual_seed(seed)``, read off a LoRA identity layer."""
    width = shape[-1]
    probe = LoRALinear(nn.Linear(width, width, bias=False), r=width, alpha=width, dropout=p).train()
    with torch.no_grad():
        probe.weight.zero_()
        probe.lora_A.copy_(torch.eye(width))
        probe.lora_B.copy_(torch.eye(width))
    positive = torch.rand(shape) + 1.0  # drawn before seeding: the node's seed is the first draw
    torch.manual_seed(seed)
    return probe(positive) != 0


def dense_reference(layer, x, keep=None, p=0.0):
    """float64 autograd through the explicit formula: ``b + m / ||W + dW||_row * (W x + dW drop(x))``."""
    params = {
        name: getattr(layer, name).detach().double().clone().requires_grad_() for name, _ in layer.adapter_shapes()
    }
    # The base too (inject_lora freezes it, a bare LoRALinear does not): its gradients are checked.
    params["weight"] = w = layer.weight.detach().double().clone().requires_grad_()
    if layer.bias is not None:
        params["bias"] = layer.bias.detach().double().clone().requires_grad_()
    x = x.detach().double().clone().requires_grad_()
    delta = torch.zeros(OUT, IN, dtype=torch.float64)
    scale = torch.ones(OUT, dtype=torch.float64)
    rows = []
    for s, c in zip(layer.slices, layer.scalings):
        d = c * params[s.b_name] @ params[s.a_name]
        delta = delta.index_put((torch.arange(s.start, s.stop),), d)
        rows.append(s)
    norms = (w + delta).norm(dim=1).detach()  # a constant in backward (DoRA section 4.3, PEFT)
    for s in rows:
        scale = scale.index_put((torch.arange(s.start, s.stop),), params[s.magnitude_name] / norms[s.start : s.stop])
    dropped = x if keep is None else x * keep / (1 - round(p * 65536) / 65536)
    y = scale * (x @ w.T + dropped @ delta.T)
    if layer.bias is not None:
        y = y + params["bias"]
    return y, x, params


def close(got, want, rtol, atol, autocast, msg=""):
    if autocast:  # bf16 rounds every element: compare whole tensors by relative norm
        err = (got.double() - want).norm() / want.norm()
        assert err < rtol, f"{msg}: relative error {err:.3g}"
    else:
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol, msg=msg or None)


def check_against_reference(layer, x, p, seed, rtol, atol, autocast=False):
    layer.train(p > 0)
    x = x.clone().requires_grad_()
    grad = torch.randn(*x.shape[:-1], OUT, dtype=torch.float64)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.backward(grad.to(y.dtype))
    keep = dropout_mask(x.shape, p, seed) if p > 0 else None
    ref, ref_x, ref_params = dense_reference(layer, x, keep, p)
    ref.backward(grad)
    close(y, ref, rtol, atol, autocast, "output")
    close(x.grad, ref_x.grad, rtol, atol, autocast, "x")
    for name, param in ref_params.items():
        close(getattr(layer, name).grad, param.grad, rtol, atol, autocast, name)


@pytest.mark.parametrize("sliced", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_all_gradients_match_the_dense_float64_formula(sliced, p, bias):
    layer = make_layer(sliced, p=p, bias=bias)
    check_against_reference(layer, torch.randn(4, 5, IN, dtype=torch.float64), p, seed=7, rtol=1e-10, atol=1e-10)


@settings(max_examples=15, deadline=None)
@given(
    sliced=st.booleans(), p=st.sampled_from([0.0, 0.1, 0.5]), tokens=st.integers(1, 9),
    rslora=st.booleans(), seed=st.integers(0, 1000),
)
def test_float32_layers_match_the_float64_formula(sliced, p, tokens, rslora, seed):
    layer = make_layer(sliced, dtype=torch.float32, p=p, use_rslora=rslora, seed=seed)
    check_against_reference(layer, torch.randn(tokens, IN), p, seed=seed, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("sliced", [False, True])
def test_bf16_autocast_matches_the_float64_formula_to_bf16_precision(sliced):
    layer = make_layer(sliced, dtype=torch.float32, p=0.2)
    check_against_reference(layer, torch.randn(64, IN), 0.2, seed=3, rtol=2e-2, atol=0, autocast=True)
    assert all(p.grad.dtype == torch.float32 for p in layer.adapter_parameters())


@pytest.mark.parametrize("sliced", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fresh_adapter_computes_exactly_the_base(sliced, bias, dtype):
    base = nn.Linear(IN, OUT, bias=bias).to(dtype)
    kwargs = {"slices": SLICES} if sliced else {}
    rank = {"q": 2, "v": 2} if sliced else 2
    layer = LoRALinear(copy.deepcopy(base), rank, 4, 0.0, use_dora=True, **kwargs)
    x = torch.randn(7, IN, dtype=dtype)
    assert torch.equal(layer(x), base(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), base(x))
    for s in layer.slices:  # magnitudes are the adapted rows' norms, in at least float32
        m = getattr(layer, s.magnitude_name)
        assert m.dtype == torch.promote_types(dtype, torch.float32)
        torch.testing.assert_close(m, base.weight[s.start : s.stop].float().norm(dim=1).to(m.dtype))


def test_row_norms_match_the_dense_norm_without_forming_it():
    layer = make_layer(True, dtype=torch.float32)
    dense = (layer.weight.double() + layer.delta_weight().double()).norm(dim=1)
    torch.testing.assert_close(layer.row_norms().double(), dense, rtol=1e-6, atol=0)


@pytest.mark.parametrize("cancel", [0.9, 0.99])
def test_norm_formula_precision_when_the_update_nearly_cancels_the_row(cancel):
    """||W + dW||^2 as a sum loses relative precision ~ eps * ||W||^2 / ||W + dW||^2 (documented)."""
    torch.manual_seed(0)
    w = torch.randn(OUT, IN)
    a = torch.randn(1, IN)
    # dW_i = -cancel * (projection of W_i on a) scaled up: the row keeps (1 - cancel) of that part.
    b = -cancel * (w @ a.T) / a.square().sum()
    dense = (w.double() + b.double() @ a.double()).norm(dim=1)
    ratio = (w.double().norm(dim=1) / dense).square().max().item()
    err = ((dora_row_norms(w, a, b).double() - dense) / dense).abs().max().item()
    assert err < 2e-7 * ratio + 1e-7


def test_zero_rows_give_finite_outputs_and_gradients():
    base = nn.Linear(IN, OUT)
    with torch.no_grad():
        base.weight[:3] = 0
    layer = LoRALinear(base, 2, 4, 0.0, use_dora=True)
    x = torch.randn(5, IN)
    torch.testing.assert_close(layer(x), base(x))
    with torch.no_grad():
        layer.lora_B.normal_()
    layer(x).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.adapter_parameters())


def test_nothing_of_size_out_by_in_and_no_dropped_copy_is_saved():
    x = torch.randn(8, 50, 96, requires_grad=True)
    layers = [LoRALinear(nn.Linear(96, 96), r=8, dropout=0.1, use_dora=True).train() for _ in range(3)]
    for layer in layers:
        with torch.no_grad():
            layer.lora_B.normal_()
    storages: dict[int, tuple] = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = [layer(x) for layer in layers]
    shapes = [shape for _, shape in storages.values()]
    assert (96, 96) not in shapes, "an (out, in) tensor was saved"
    # x once, per layer: its own output (which attention saves anyway), the (tokens, r)
    # hidden, scaled B, the (out,) row scale and norms (for dm) and a seed; no dropped copy of
    # x, no mask.
    tokens = 8 * 50
    budget = x.nbytes + 3 * (tokens * 96 * 4 + tokens * 8 * 4 + 96 * 8 * 4 + 2 * 96 * 4 + 8)
    assert sum(n for n, _ in storages.values()) <= budget
    outputs = {o.untyped_storage().data_ptr() for o in outs}
    assert outputs <= set(storages), "the saved (tokens, out) tensors are the outputs themselves"
    sum(o.sum() for o in outs).backward()


def test_inject_merge_equals_unmerged_and_gives_plain_linear():
    from models import TimmStyleViT

    torch.manual_seed(0)
    model = inject_lora(TimmStyleViT(), ["q", "v", "fc1"], r=2, alpha=4, dropout=0.0, use_dora=True).eval()
    assert "dora" in str(lora_summary(model))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for s in m.slices:
                    getattr(m, s.b_name).normal_(0, 0.2)
                    getattr(m, s.magnitude_name).mul_(1.3)
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(x), before, rtol=1e-5, atol=1e-5)


def test_merge_is_float32_rounded_once_and_refuses_non_finite():
    layer = make_layer(False, dtype=torch.float32).to(torch.bfloat16)
    truth = layer.weight.double() + layer.delta_weight().double()
    truth = truth * (layer.lora_magnitude.double() / truth.norm(dim=1))[:, None]
    merged = layer.merged_weight()
    assert merged.dtype == torch.bfloat16
    # Within half a bf16 step of the exact value (plus float32's share): one rounding, not many.
    ulp = 2.0 ** (torch.frexp(truth)[1].double() - 8)
    assert ((merged.double() - truth).abs() <= 0.5 * ulp * (1 + 1e-4)).all()
    with torch.no_grad():
        layer.lora_magnitude[0] = float("inf")
    with pytest.raises(LoRAError, match="NaN or Inf"):
        merge_lora(layer)


def test_state_save_and_load_rebuild_dora_on_a_fresh_base(tmp_path):
    from models import TimmStyleViT

    torch.manual_seed(0)
    base = TimmStyleViT().eval()
    model = inject_lora(copy.deepcopy(base), ["q", "v"], r=2, use_dora=True).eval()
    state = lora_state_dict(model)
    assert "blocks.0.attn.qkv.lora_magnitude_q" in state and state["blocks.0.attn.qkv.lora_magnitude_q"].shape == (32,)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for p in m.adapter_parameters():
                    p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 3, 32, 32)
    save_lora(model, tmp_path / "dora.safetensors")
    loaded = load_lora(copy.deepcopy(base), tmp_path / "dora.safetensors").eval()
    assert all(m.use_dora for m in loaded.modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    verify_lora(loaded, x)  # every slice still on the forward path
    with pytest.raises(LoRAError, match="other base weights"):
        load_lora(TimmStyleViT(), tmp_path / "dora.safetensors")


def test_strict_loads_name_a_missing_or_misshaped_magnitude(tmp_path):
    model = inject_lora(nn.Sequential(nn.Linear(8, 6)), ["0"], r=2, use_dora=True)
    state = dict(lora_state_dict(model))
    missing = {k: v for k, v in state.items() if k != "0.lora_magnitude"}
    with pytest.raises(LoRAError, match=r"missing tensors \['0.lora_magnitude'\]"):
        load_lora_state_dict(model, missing)
    with pytest.raises(LoRAError, match=r"'0\.lora_magnitude' has shape"):
        load_lora_state_dict(model, {**state, "0.lora_magnitude": torch.ones(5)})
    # A plain LoRA model refuses a DoRA state (the magnitude is unexpected), and vice versa.
    plain = inject_lora(nn.Sequential(nn.Linear(8, 6)), ["0"], r=2)
    with pytest.raises(LoRAError, match="unexpected tensors"):
        load_lora_state_dict(plain, state)
    save_lora(model, tmp_path / "a.safetensors")
    with pytest.raises(LoRAError, match="another layout"):
        load_lora(plain, tmp_path / "a.safetensors")


def test_use_dora_must_be_a_bool():
    with pytest.raises(LoRAError, match="use_dora"):
        inject_lora(nn.Sequential(nn.Linear(4, 4)), ["0"], use_dora="yes")


def test_dora_trains_through_parents_that_add_to_its_output_in_place():
    """timm EVA/BEiT (after routing) do ``qkv = self.qkv(x); qkv += bias``; DoRA saves its output."""

    class AddsInPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 6, bias=False)
            self.q_bias = nn.Parameter(torch.randn(6))
            self.qkv_bias_separate = False  # timm's switch; inject_lora turns it on

        def forward(self, x):
            if self.qkv_bias_separate:
                out = self.qkv(x)
                out += self.q_bias
                return out
            return nn.functional.linear(x, self.qkv.weight, self.q_bias)

    model = inject_lora(AddsInPlace(), ["q", "v"], r=1, dropout=0.0, use_dora=True)  # slices of the fused qkv
    assert model.qkv_bias_separate and model.qkv.output_modified_in_place
    with torch.no_grad():
        for s in model.qkv.slices:
            getattr(model.qkv, s.b_name).normal_()
    x = torch.randn(5, 8)
    reference = copy.deepcopy(model)
    model(x).square().sum().backward()
    # The same layer, its output used out of place: same numbers, same gradients.
    (reference.qkv(x) + reference.q_bias).square().sum().backward()
    for name, _ in model.qkv.adapter_shapes():
        torch.testing.assert_close(getattr(model.qkv, name).grad, getattr(reference.qkv, name).grad, msg=name)


@pytest.mark.parametrize("sliced", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inference_with_many_tokens_folds_and_matches_the_float64_formula(sliced, dtype, monkeypatch):
    import lora_vit.functional as functional

    layer = make_layer(sliced, dtype=dtype).eval()
    x = torch.randn(2, 4 * max(IN, OUT), IN, dtype=dtype)  # tokens >= features: the folded path
    want, _, _ = dense_reference(layer, x)
    node = layer(x).detach()  # with gradients on: through the autograd node
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(functional._DoRALinear, "apply", None)  # the folded path must not call it
        folded = layer(x)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(folded.double(), want.detach(), **tol)
    torch.testing.assert_close(folded, node, **tol)
