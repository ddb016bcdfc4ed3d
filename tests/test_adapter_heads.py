"""Trainable modules belong to an adapter: each adapter trains, saves, loads and routes its own head."""

import copy

import pytest
import torch
from models import TimmStyleViT, randomise
from safetensors import safe_open
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from lora_vit import (
    LoRAError,
    adapter_names,
    adapter_per_sample,
    delete_adapter,
    inject_lora,
    load_lora,
    lora_state_dict,
    merge_lora,
    save_lora,
    set_adapter,
)

torch.manual_seed(0)
BASE = TimmStyleViT(dim=32, depth=2, heads=4, num_classes=3).eval()
X = torch.randn(6, 3, 32, 32)
# The mixed path sums each sample's update with batched matmuls, the single-adapter path with
# plain ones: the same values up to float32 summation order, through 2 blocks and a head
# (observed up to 6e-7 on outputs of size ~1.5). A shared head (the defect) is off by O(1).
MIXED = {"rtol": 1e-5, "atol": 1e-5}



def detector(name, seed, targets=("q", "v"), classes=None):
    """A detector trained apart: its own copy of the base, its own adapter and head."""
    model = copy.deepcopy(BASE)
    if classes is not None:
        model.head = nn.Linear(32, classes)
    inject_lora(model, list(targets), r=2, dropout=0.0, trainable=["head"], adapter=name)
    randomise(model, name, seed)
    return model.eval()


def saved(model, name, tmp_path):
    return save_lora(model, tmp_path / f"{name}.safetensors", adapter=name)


def test_two_detectors_from_two_files_in_one_mixed_batch_give_what_each_gives_alone(tmp_path):
    one, two = detector("d1", 1), detector("d2", 2, targets=("q", "k", "v"))
    paths = [saved(one, "d1", tmp_path), saved(two, "d2", tmp_path)]
    served = copy.deepcopy(BASE)
    for path in paths:
        load_lora(served, path)
    assert adapter_names(served) == ("d1", "d2")
    mix = ["d1", "d2", "d2", None, "d1", "d2"]
    with torch.no_grad():
        alone = {"d1": one(X), "d2": two(X), None: BASE(X)}
        with adapter_per_sample(served, mix):
            mixed = served(X)
        for i, name in enumerate(mix):
            torch.testing.assert_close(mixed[i], alone[name][i], **MIXED, msg=f"sample {i} ({name})")
        for name in ("d1", "d2"):  # each chosen alone: the very same computation, bit for bit
            set_adapter(served, name)
            assert torch.equal(served(X), alone[name])


def test_each_adapter_has_its_own_head_and_files_carry_only_their_own(tmp_path):
    model = copy.deepcopy(BASE)
    inject_lora(model, ["q"], r=2, trainable=["head"], adapter="a")
    inject_lora(model, ["v"], r=2, trainable=["head"], adapter="b")
    randomise(model, "a", 1)
    randomise(model, "b", 2)
    assert type(model.head).__name__ == "AdapterModules" and model.head.adapter_names == ("a", "b")
    head_a, head_b = (lora_state_dict(model, adapter=n)["head.weight"] for n in ("a", "b"))
    assert not torch.equal(head_a, head_b)
    path = saved(model, "b", tmp_path)
    with safe_open(str(path), "pt") as handle:
        assert torch.equal(handle.get_tensor("head.weight"), head_b)
    # Loading b again (a hot swap) leaves a's head alone.
    before_a = head_a.clone()
    with torch.no_grad():
        model.head.per_adapter["b"].weight.zero_()
    load_lora(model, path)
    assert torch.equal(lora_state_dict(model, adapter="a")["head.weight"], before_a)
    assert torch.equal(lora_state_dict(model, adapter="b")["head.weight"], head_b)


def test_none_and_adapters_without_a_head_run_the_untrained_original(tmp_path):
    model = detector("d1", 1)
    inject_lora(model, ["v"], r=2, dropout=0.0, adapter="plain")  # no head of its own
    randomise(model, "plain", 3)
    reference = inject_lora(copy.deepcopy(BASE), ["v"], r=2, dropout=0.0, adapter="plain")
    load_lora(reference, saved(model, "plain", tmp_path))
    with torch.no_grad():
        set_adapter(model, None)
        assert torch.equal(model(X), BASE(X))
        set_adapter(model, "plain")
        assert torch.equal(model(X), reference(X))
        with adapter_per_sample(model, [None, "plain", "d1", None, "plain", "d1"]):
            mixed = model(X)
        torch.testing.assert_close(mixed[[0, 3]], BASE(X)[[0, 3]], **MIXED)
        torch.testing.assert_close(mixed[[1, 4]], reference(X)[[1, 4]], **MIXED)


@pytest.mark.parametrize("order", [("d1", "c"), ("c", "d1")])
def test_a_file_without_a_head_loads_beside_one_with_a_head_in_either_order(order, tmp_path):
    models = {"d1": detector("d1", 1), "c": inject_lora(copy.deepcopy(BASE), ["v"], r=2, dropout=0.0, adapter="c")}
    randomise(models["c"], "c", 4)
    paths = {name: saved(m, name, tmp_path) for name, m in models.items()}
    served = copy.deepcopy(BASE)
    for name in order:
        load_lora(served, paths[name])
    with torch.no_grad():
        for name in order:
            set_adapter(served, name)
            assert torch.equal(served(X), models[name].eval()(X))


def test_heads_of_different_sizes_run_alone_and_refuse_to_mix(tmp_path):
    three, five = detector("d3", 1), detector("d5", 2, classes=5)
    served = copy.deepcopy(BASE)
    for model, name in ((three, "d3"), (five, "d5")):
        load_lora(served, saved(model, name, tmp_path))
    with torch.no_grad():
        set_adapter(served, "d5")
        assert served(X).shape == (6, 5) and torch.equal(served(X), five(X))
        set_adapter(served, "d3")
        assert torch.equal(served(X), three(X))
        with adapter_per_sample(served, ["d5"] * 6):  # one shape: fine
            torch.testing.assert_close(served(X), five(X), **MIXED)
        mixed = adapter_per_sample(served, ["d3", "d5"] * 3)
        with pytest.raises(LoRAError, match=r"cannot mix 'head'.*'d3'.*'d5'"), mixed:
            pytest.fail("the block must not run")


def test_a_mixed_step_trains_each_head_only_from_its_own_samples():
    model = copy.deepcopy(BASE)
    for name, seed in (("a", 1), ("b", 2)):
        inject_lora(model, ["q", "v"], r=2, dropout=0.0, trainable=["head"], adapter=name)
        randomise(model, name, seed)
    mix = ["a", "b", None, "b", "a", "a"]
    target = torch.randn(6, 3)

    def grads():
        return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                for n, p in model.named_parameters() if p.requires_grad}

    with adapter_per_sample(model, mix):
        ((model(X) - target) ** 2).sum().backward()
    mixed = grads()
    model.zero_grad()
    for name in ("a", "b"):
        rows = [i for i, n in enumerate(mix) if n == name]
        set_adapter(model, name)
        ((model(X[rows]) - target[rows]) ** 2).sum().backward()
    summed = grads()
    assert any(k.startswith("head.per_adapter.a.") for k in mixed)
    assert not any(k.startswith("head.original.") for k in mixed)  # the original never trains
    for key in mixed:
        # float32 gradients of 3 samples summed in another order: ~1e-6 relative.
        torch.testing.assert_close(mixed[key], summed[key], rtol=1e-4, atol=1e-5, msg=key)


def test_single_adapter_models_and_files_keep_their_keys(tmp_path):
    model = inject_lora(copy.deepcopy(BASE), ["q", "v"], r=2, dropout=0.0, trainable=["head"])
    assert type(model.head) is nn.Linear  # the default adapter trains the head in place, as before
    keys = set(model.state_dict())
    assert {"head.weight", "head.bias"} <= keys and not any("per_adapter" in k for k in keys)
    assert {"head.weight", "head.bias"} <= set(lora_state_dict(model))
    assert model.head.weight.requires_grad
    randomise(model, "default", 5)
    fresh = load_lora(copy.deepcopy(BASE), save_lora(model, tmp_path / "d.safetensors"))
    assert type(fresh.head) is nn.Linear and set(fresh.state_dict()) == keys
    # A second adapter with a head of its own: the default one keeps its trained head.
    inject_lora(model, ["q"], r=2, dropout=0.0, trainable=["head"], adapter="other")
    with torch.no_grad():
        set_adapter(model, "default")
        assert torch.equal(model(X), fresh(X))
        set_adapter(model, None)
        assert torch.equal(model(X), BASE(X))  # the original, kept from before training
    assert set(lora_state_dict(model, adapter="default")) == set(lora_state_dict(fresh))


def test_delete_and_merge_give_each_head_back():
    model = detector("d1", 1)
    inject_lora(model, ["q"], r=2, dropout=0.0, trainable=["head"], adapter="d2")
    randomise(model, "d2", 2)
    with torch.no_grad():
        set_adapter(model, "d1")
        d1 = model(X)
    merged = merge_lora(copy.deepcopy(model), adapter="d1", discard_others=True)
    assert type(merged.head) is nn.Linear and set(merged.state_dict()) == set(BASE.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(X), d1, rtol=1e-5, atol=1e-5)  # merged weights: fp32 rounding
    delete_adapter(model, "d1")
    assert model.head.adapter_names == ("d2",)
    delete_adapter(model, "d2")
    assert type(model.head) is nn.Linear and torch.equal(model.head.weight, BASE.head.weight)
    assert set(model.state_dict()) == set(BASE.state_dict())


def test_a_trainable_module_holding_adapted_layers_is_refused():
    model = inject_lora(copy.deepcopy(BASE), ["q"], r=2, adapter="a")
    with pytest.raises(LoRAError, match=r"trainable module 'blocks.0' contains adapted layers \['blocks.0.attn.qkv'\]"):
        inject_lora(model, ["fc1"], r=2, trainable=["blocks.0"], adapter="b")
    assert adapter_names(model) == ("a",)


@pytest.mark.parametrize("training", [False, True])
def test_compiled_mixed_batches_with_heads_compile_once_without_breaks(training, fresh_dynamo):
    model = copy.deepcopy(BASE).train(training)
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        inject_lora(model, ["q", "v"], r=2, dropout=0.0, trainable=["head"], adapter=name)
        randomise(model, name, seed)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for mix in (["a", "b", "c", None, "a", "b"], ["c"] * 6, [None, "b", "b", "a", "c", None]):
        with torch.set_grad_enabled(training), adapter_per_sample(model, mix):
            out = compiled(X)
            if training:
                out.square().sum().backward()
            else:
                torch.testing.assert_close(out, model(X), **MIXED)
    assert counter.frame_count == 1
    assert dict(counters["graph_break"]) == {}
