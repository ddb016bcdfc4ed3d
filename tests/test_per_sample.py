"""adapter_per_sample: each sample through its own adapter, one batch, one graph, gradients kept apart."""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mha_models import OpenClipStyleViT, TorchvisionStyleViT
from models import HF4StyleViT, TimmStyleViT
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from lora_vit import AdapterSpec, LoRAError, LoRALinear, adapter_per_sample, inject_lora, lora_state_dict, set_adapter

FAMILIES = {  # (model, input of batch n): fused qkv slices, separate Linears, and nn.MultiheadAttention
    "timm": (lambda: TimmStyleViT(dim=32, depth=2, heads=4), lambda n: torch.randn(n, 3, 32, 32)),
    "hf4": (HF4StyleViT, lambda n: torch.randn(n, 5, 32)),
    "torchvision": (TorchvisionStyleViT, lambda n: torch.randn(n, 3, 32, 32)),
    "open_clip": (OpenClipStyleViT, lambda n: torch.randn(n, 3, 32, 32)),
}
ADAPTERS = {  # other targets, ranks (padded when stacked) and DoRA on the Linear-only adapter
    "a": {"targets": ["q", "v"], "r": 2, "alpha": 4},
    "b": {"targets": ["q", "k", "v", "o"], "r": 3, "alpha": 6},
    "c": {"targets": ["fc1", "v"], "r": 2, "alpha": 8, "use_dora": True},
}
MIX = ["b", None, "a", "c", "a", "b"]


def build(family, names=("a", "b", "c"), dropout=0.0):
    torch.manual_seed(0)
    model = FAMILIES[family][0]()
    for name in names:
        spec = dict(ADAPTERS[name])
        if family in ("torchvision", "open_clip") and spec.get("use_dora"):
            spec["targets"] = ["fc1", "o"]  # DoRA is refused on the packed in-projection
        inject_lora(model, dropout=dropout, adapter=name, **spec)
        generator = torch.Generator().manual_seed(len(name) + ord(name))
        with torch.no_grad():
            for value in lora_state_dict(model, adapter=name).values():
                value.add_(0.1 * torch.randn(value.shape, generator=generator))
    return model


def one_by_one(model, x, names):
    """Each sample alone, through its adapter chosen with set_adapter: the reference."""
    outs = []
    for i, name in enumerate(names):
        set_adapter(model, name)
        outs.append(model(x[i : i + 1]))
    set_adapter(model, "a")
    return torch.cat(outs)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_equals_each_sample_through_its_own_adapter(family):
    model = build(family).eval()
    x = FAMILIES[family][1](len(MIX))
    with torch.no_grad():
        expected = one_by_one(model, x, MIX)
        with adapter_per_sample(model, MIX):
            got = model(x)
        after = model(x)
        set_adapter(model, "a")
        assert torch.equal(after, model(x))  # leaving the block restores the running adapter
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_mixed_step_equals_the_per_adapter_sub_batch_steps_summed(family):
    model = build(family).train()
    x = FAMILIES[family][1](len(MIX))
    target = torch.randn_like(model.eval()(x)).detach()
    model.train()

    def loss(out, rows):
        return ((out - target[rows]) ** 2).sum()

    with adapter_per_sample(model, MIX):
        loss(model(x), slice(None)).backward()
    mixed = grads(model)
    model.zero_grad()
    for name in ("a", "b", "c"):  # base samples (None) reach no adapter: nothing to add
        rows = [i for i, n in enumerate(MIX) if n == name]
        set_adapter(model, name)
        loss(model(x[rows]), rows).backward()  # accumulates: the sum of the sub-batch steps
    summed = grads(model)
    assert mixed.keys() == summed.keys()
    for key in mixed:
        torch.testing.assert_close(mixed[key], summed[key], rtol=1e-4, atol=1e-5, msg=key)
    # An adapter no sample used gets no gradient at all.
    model.zero_grad()
    with adapter_per_sample(model, ["a"] * len(MIX)):
        loss(model(x), slice(None)).backward()
    untouched = [n for n, p in model.named_parameters() if "__b" in n or "__c" in n]
    assert untouched and all(
        model.get_parameter(n).grad is None or not model.get_parameter(n).grad.any() for n in untouched
    )


def test_dropout_differs_per_sample_but_keeps_the_expectation():
    model = build("hf4", names=("a",), dropout=0.5).train()
    x = FAMILIES["hf4"][1](2)
    with torch.no_grad(), adapter_per_sample(model, ["a", None]):
        first, second = model(x), model(x)
    assert not torch.equal(first[0], second[0])  # sample 0 runs adapter a with dropout
    assert torch.equal(first[1], second[1])  # sample 1 runs the base: no dropout anywhere


def test_unknown_names_and_bad_sequences_are_refused_on_entry():
    model = build("timm")
    for names, message in [
        (["a", "zz"], r"names\[1\] = 'zz' is not an adapter of this model; its adapters are \['a', 'b', 'c'\]"),
        ("ab", "must be a sequence of adapter names"),
        ([], "names is empty"),
    ]:
        with pytest.raises(LoRAError, match=message), adapter_per_sample(model, names):
            pytest.fail("the block must not run")


def test_a_batch_of_the_wrong_size_is_a_lora_error_before_any_layer_computes():
    model = build("timm").eval()
    message = "given 3 adapter names, but this layer's input has shape"
    with pytest.raises(LoRAError, match=message), adapter_per_sample(model, ["a", "b", "c"]):
        model(FAMILIES["timm"][1](4))


def test_blocks_nest_and_restore_the_outer_routing():
    model = build("hf4").eval()
    x = FAMILIES["hf4"][1](2)
    with torch.no_grad(), adapter_per_sample(model, ["a", "b"]):
        outer = model(x)
        with adapter_per_sample(model, ["c", None]):
            inner = model(x)
        assert torch.equal(model(x), outer)
    assert not torch.equal(inner, outer)


@pytest.mark.parametrize("family", ["timm", "torchvision"])
@pytest.mark.parametrize("training", [False, True])
def test_compiled_new_mix_of_the_same_size_does_not_recompile(family, training, fresh_dynamo):
    model = build(family).train(training)
    x = FAMILIES[family][1](len(MIX))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    mixes = [MIX, list(reversed(MIX)), ["c"] * len(MIX), [None, "a", "a", "b", "c", None]]
    for mix in mixes:
        with torch.set_grad_enabled(training), adapter_per_sample(model, mix):
            out = compiled(x)
            if training:
                out.square().sum().backward()
            else:
                torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
    assert dict(counters["graph_break"]) == {}
    with pytest.raises(LoRAError, match="given 5 adapter names"), adapter_per_sample(model, MIX[:5]):
        compiled(x)


def test_inductor_mixed_step_matches_eager():
    """Inductor compiles the routing as its own gather (a where chain): same outputs and gradients."""
    import copy

    eager = build("timm").train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = FAMILIES["timm"][1](len(MIX))
    with adapter_per_sample(eager, MIX), adapter_per_sample(compiled_model, MIX):
        expected, got = eager(x), compiled(x)
        expected.square().mean().backward()
        got.square().mean().backward()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    compared = 0
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=name)
            compared += 1
    assert compared >= 3 * 2 * 2  # A and B of three adapters on at least two layers each


@settings(max_examples=25, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    dora=st.lists(st.booleans(), min_size=4, max_size=4),
    mix=st.lists(st.integers(-1, 3), min_size=1, max_size=6),
    sliced=st.booleans(),
)
def test_any_mix_on_one_layer_equals_the_dense_formula(ranks, dora, mix, sliced):
    """LoRALinear with adapters of any ranks, slices and DoRA: row i is W_i-adapted x_i, densely."""
    torch.manual_seed(len(mix))
    slices = {"q": (0, 3), "v": (6, 9)} if sliced else None
    names = [f"n{i}" for i in range(len(ranks))]
    specs = [
        AdapterSpec.build(9, 6, {"q": r, "v": r} if sliced else r, {"q": 2.0 * r, "v": r} if sliced else 2.0 * r,
                          0.0, slices=slices, use_dora=use_dora)
        for r, use_dora in zip(ranks, dora)
    ]
    lora = LoRALinear(nn.Linear(6, 9).double(), adapter=names[0], spec=specs[0])
    for name, spec in zip(names[1:], specs[1:]):
        lora.add_adapter(name, spec)
    model = nn.Sequential(lora)
    with torch.no_grad():
        for name in names:
            for value in lora.adapter(name).adapter_parameters():
                value.add_(0.3 * torch.randn_like(value))
    routed = [names[i] if 0 <= i < len(names) else None for i in mix]
    x = torch.randn(len(mix), 2, 6, dtype=torch.float64)
    with torch.no_grad(), adapter_per_sample(model, routed):
        got = model(x)
    for i, name in enumerate(routed):
        weight = model[0].weight
        if name is not None:
            weight = model[0].adapter(name).merged_weight()  # dense W + sBA, DoRA rows rescaled
        expected = x[i] @ weight.T + model[0].bias
        torch.testing.assert_close(got[i], expected, rtol=1e-10, atol=1e-10)
