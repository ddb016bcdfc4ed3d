import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lora_vit import LoRAError, LoRALinear

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


@st.composite
def layer_cases(draw):
    """A Linear shape, optional disjoint slices with their own ranks/alphas, and an input."""
    in_features = draw(st.integers(1, 24))
    out_features = draw(st.integers(1, 24))
    sliced = draw(st.booleans()) and out_features >= 2
    if sliced:
        cuts = sorted(draw(st.sets(st.integers(0, out_features), min_size=2, max_size=6)))
        pairs = [(a, b) for a, b in zip(cuts, cuts[1:])]
        chosen = draw(st.lists(st.sampled_from(pairs), min_size=1, unique=True))
        slices = {f"s{i}": bounds for i, bounds in enumerate(chosen)}
        r = {name: draw(st.integers(1, min(in_features, b - a))) for name, (a, b) in slices.items()}
        alpha = {name: draw(st.floats(0.1, 64)) for name in slices}
    else:
        slices = None
        r = draw(st.integers(1, min(in_features, out_features)))
        alpha = draw(st.floats(0.1, 64))
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))
    return {
        "in_features": in_features, "out_features": out_features, "slices": slices, "r": r,
        "alpha": alpha, "lead": tuple(lead), "bias": draw(st.booleans()),
        "rslora": draw(st.booleans()), "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
    }


def dense_reference(layer: LoRALinear, case: dict, x: torch.Tensor) -> torch.Tensor:
    """``x @ (W + sum_s scaling_s * B_s @ A_s placed at rows_s).T + b``, from the case, in float64."""
    w = layer.weight.detach().double().clone()
    slices = case["slices"] or {"": (0, case["out_features"])}
    for name, (start, stop) in slices.items():
        r = case["r"][name] if isinstance(case["r"], dict) else case["r"]
        alpha = case["alpha"][name] if isinstance(case["alpha"], dict) else case["alpha"]
        suffix = f"_{name}" if name else ""
        a = getattr(layer, "lora_A" + suffix).detach().double()
        b = getattr(layer, "lora_B" + suffix).detach().double()
        scaling = alpha / (math.sqrt(r) if case["rslora"] else r)
        w[start:stop] += scaling * b @ a
    out = x.double() @ w.T
    if layer.bias is not None:
        out = out + layer.bias.detach().double()
    return out


@given(layer_cases())
def test_forward_matches_dense_formula(case):
    base = nn.Linear(case["in_features"], case["out_features"], bias=case["bias"], dtype=case["dtype"])
    layer = LoRALinear(
        base, case["r"], case["alpha"], 0.0, slices=case["slices"], use_rslora=case["rslora"]
    )
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.normal_()
    x = torch.randn(*case["lead"], case["in_features"], dtype=case["dtype"])
    y = layer(x)
    assert y.shape == (*case["lead"], case["out_features"])
    assert y.dtype == case["dtype"]
    tol = TOL[case["dtype"]]
    torch.testing.assert_close(y.double(), dense_reference(layer, case, x), rtol=tol, atol=tol)
    # delta_weight() is the same update as a matrix.
    expected_delta = dense_reference(layer, case, torch.eye(case["in_features"], dtype=case["dtype"])).T
    if layer.bias is not None:
        expected_delta = expected_delta - layer.bias.detach().double()[:, None]
    expected_delta -= layer.weight.detach().double()
    torch.testing.assert_close(layer.delta_weight().double(), expected_delta, rtol=1e-4, atol=1e-4)


@given(layer_cases())
def test_new_layer_computes_exactly_the_base(case):
    base = nn.Linear(case["in_features"], case["out_features"], bias=case["bias"], dtype=case["dtype"])
    layer = LoRALinear(base, case["r"], case["alpha"], 0.5, slices=case["slices"])
    x = torch.randn(*case["lead"], case["in_features"], dtype=case["dtype"])
    layer.train()  # dropout active: the zero B still adds exactly nothing
    assert torch.equal(layer(x), base(x))


def test_base_parameters_are_taken_over_under_their_own_names():
    base = nn.Linear(6, 4)
    layer = LoRALinear(base, r=2)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert [k for k, _ in layer.named_parameters()] == ["weight", "bias", "lora_A", "lora_B"]
    assert layer.lora_A.shape == (2, 6) and layer.lora_B.shape == (4, 2)


def test_fused_slices_have_own_factors_and_leave_other_rows_untouched():
    base = nn.Linear(8, 12)
    layer = LoRALinear(base, {"q": 2, "v": 3}, {"q": 4.0, "v": 6.0}, 0.0, slices={"q": (0, 4), "v": (8, 12)})
    assert layer.lora_A_q.shape == (2, 8) and layer.lora_B_q.shape == (4, 2)
    assert layer.lora_A_v.shape == (3, 8) and layer.lora_B_v.shape == (4, 3)
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.normal_()
    x = torch.randn(5, 8)
    delta = layer(x) - base(x)
    assert torch.equal(delta[:, 4:8], torch.zeros(5, 4))
    assert delta[:, :4].abs().min() > 0 and delta[:, 8:].abs().min() > 0
    assert layer.scalings == (2.0, 2.0)


def test_gradients_reach_each_slice_only_through_its_rows():
    layer = LoRALinear(nn.Linear(8, 12), 2, 4, 0.0, slices={"q": (0, 4), "v": (8, 12)})
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.normal_()
    x = torch.randn(3, 8)
    layer(x)[:, 8:].sum().backward()  # only v rows in the loss
    assert layer.lora_B_q.grad.abs().sum() == 0 and layer.lora_A_q.grad.abs().sum() == 0
    assert layer.lora_B_v.grad.abs().sum() > 0 and layer.lora_A_v.grad.abs().sum() > 0


def test_default_init_is_normal_with_std_002_and_b_zero():
    layer = LoRALinear(nn.Linear(512, 512), r=64)
    a = layer.lora_A.detach()
    assert abs(a.std().item() - 0.02) < 0.001 and abs(a.mean().item()) < 0.001
    assert torch.count_nonzero(layer.lora_B) == 0


def test_kaiming_init_is_uniform_within_its_bound():
    layer = LoRALinear(nn.Linear(256, 64), r=16, init="kaiming")
    bound = 1 / math.sqrt(256)  # kaiming_uniform_ with a=sqrt(5)
    a = layer.lora_A.detach()
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert torch.count_nonzero(layer.lora_B) == 0


def test_reset_parameters_restores_identity_and_keeps_base():
    base = nn.Linear(6, 6)
    weight = base.weight.detach().clone()
    layer = LoRALinear(base, r=2)
    with torch.no_grad():
        layer.lora_B.fill_(1.0)
    layer.reset_parameters()
    x = torch.randn(2, 6)
    assert torch.equal(layer(x), base(x)) and torch.equal(layer.weight, weight)


def test_rslora_scaling():
    assert LoRALinear(nn.Linear(16, 16), r=4, alpha=8, use_rslora=True).scalings == (4.0,)
    assert LoRALinear(nn.Linear(16, 16), r=4, alpha=8).scalings == (2.0,)


def test_extra_repr_shows_rank_alpha_dropout_and_slices():
    text = repr(LoRALinear(nn.Linear(4, 6), r=2, alpha=8, dropout=0.1))
    assert "r=2" in text and "alpha=8" in text and "dropout=0.1" in text and "scaling=4" in text
    fused = repr(LoRALinear(nn.Linear(4, 6), 1, 2, 0.0, slices={"q": (0, 2), "v": (4, 6)}))
    assert "q[0:2] r=1" in fused and "v[4:6] r=1" in fused


def test_dropout_acts_on_the_lora_branch_only_in_training():
    layer = LoRALinear(nn.Linear(64, 64), r=8, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 64)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_config_round_trip_rebuilds_the_same_layout():
    layer = LoRALinear(nn.Linear(8, 12), {"q": 2, "v": 3}, {"q": 4, "v": 5}, 0.1, slices={"q": (0, 4), "v": (8, 12)},
                       use_rslora=True)
    again = LoRALinear.from_config(nn.Linear(8, 12), layer.config())
    assert again.config() == layer.config()
    plain = LoRALinear(nn.Linear(8, 12), r=3, alpha=7)
    assert LoRALinear.from_config(nn.Linear(8, 12), plain.config()).config() == plain.config()
    with pytest.raises(LoRAError, match=r"Linear\(8, 12\)"):
        LoRALinear.from_config(nn.Linear(8, 10), layer.config())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r must be a positive integer, got 0"),
        ({"r": True}, "r must be a positive integer"),
        ({"r": 2.5}, "r must be a positive integer, got 2.5"),
        ({"r": 9}, "r=9 is larger than"),
        ({"alpha": 0}, "alpha must be a positive finite number, got 0"),
        ({"alpha": -1.0}, "alpha must be a positive finite number, got -1.0"),
        ({"alpha": float("inf")}, "alpha must be a positive finite number"),
        ({"alpha": "8"}, "alpha must be a positive number, got '8'"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\), got -0.1"),
        ({"init": "xavier"}, r"init must be one of \('normal', 'kaiming'\), got 'xavier'"),
        ({"slices": {"q": (0, 3), "k": (2, 6)}, "r": 1}, "overlap"),
        ({"slices": {"q": (0, 9)}, "r": 1}, r"inside \[0, 8\)"),
        ({"slices": {"q": (3, 3)}, "r": 1}, "not a non-empty row range"),
        ({"slices": {"1q": (0, 3)}, "r": 1}, "identifiers"),
        ({"slices": {"q": (0, 4)}, "r": {"k": 1}}, "without an entry for slice 'q'"),
        ({"slices": {"q": (0, 2)}, "r": 3}, "r=3 is larger than slice 'q'"),
        ({"r": {"q": 1}}, "need `slices`"),
    ],
)
def test_invalid_arguments_raise_lora_error_naming_the_value(kwargs, message):
    with pytest.raises(LoRAError, match=message):
        LoRALinear(nn.Linear(16, 8), **kwargs)


def test_base_must_be_a_linear():
    with pytest.raises(LoRAError, match="got Conv2d"):
        LoRALinear(nn.Conv2d(3, 3, 1))  # type: ignore[arg-type]


def test_lora_error_is_a_value_error():
    assert issubclass(LoRAError, ValueError)


def test_output_can_be_modified_in_place_in_training():
    """timm's EVA adds its q/v bias in place to the qkv output: that must stay legal."""
    layer = LoRALinear(nn.Linear(8, 6), r=2, dropout=0.1).train()
    x = torch.randn(2, 3, 8, requires_grad=True)
    y = layer(x)
    y += 1.0
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape and layer.lora_B.grad is not None
