"""Named adapters on one base model: injecting, choosing, deleting, merging, files and state per adapter."""

import copy
import json

import pytest
import torch
from mha_models import TorchvisionStyleViT
from models import PlainNet, TimmStyleViT
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lora_vit.io
from lora_vit import (
    LoRAError,
    LoRALinear,
    LoRAMultiheadAttention,
    adapter_names,
    delete_adapter,
    disable_lora,
    inject_lora,
    load_lora,
    load_lora_state_dict,
    load_peft_adapter,
    lora_state_dict,
    lora_summary,
    merge_lora,
    read_lora_metadata,
    save_lora,
    save_peft_adapter,
    set_adapter,
    verify_lora,
)

torch.manual_seed(0)
BASE = TimmStyleViT(dim=32, depth=2, heads=4).eval()
X = torch.randn(3, 3, 32, 32)
SPECS = {  # different targets, ranks, alphas and flags per adapter
    "a": {"targets": ["q", "v"], "r": 2, "alpha": 4},
    "b": {"targets": ["q", "k", "v", "fc1"], "r": 3, "alpha": 6, "use_rslora": True},
    "c": {"targets": ["fc2", "v"], "r": 2, "alpha": 8, "use_dora": True},
}


def randomise(model, adapter):
    """Non-trivial factors (B is zero after injection) for ``adapter``, seeded by its name."""
    generator = torch.Generator().manual_seed(sum(map(ord, adapter)))
    with torch.no_grad():
        for value in lora_state_dict(model, adapter=adapter).values():
            value.copy_(value + 0.1 * torch.randn(value.shape, generator=generator))


def multi(base=BASE, names=("a", "b", "c"), dropout=0.0):
    model = copy.deepcopy(base)
    for name in names:
        inject_lora(model, dropout=dropout, adapter=name, **SPECS[name])
        randomise(model, name)
    return model


def alone(model, name, tmp_path, base=BASE):
    """A fresh base holding only ``name``, loaded from its own file: the single-adapter reference."""
    path = save_lora(model, tmp_path / f"{name}.safetensors", adapter=name)
    return load_lora(copy.deepcopy(base), path)


def test_first_adapter_runs_and_set_adapter_switches_to_each_alone(tmp_path):
    model = multi()
    assert adapter_names(model) == ("a", "b", "c")
    with torch.no_grad():
        assert torch.equal(model(X), alone(model, "a", tmp_path)(X))  # the first injected runs
        for name in ("b", "c", "a"):
            set_adapter(model, name)
            torch.testing.assert_close(model(X), alone(model, name, tmp_path)(X), rtol=0, atol=1e-6)
        set_adapter(model, None)
        assert torch.equal(model(X), BASE(X))


def test_adding_an_adapter_does_not_change_what_the_model_computes():
    model = multi(names=("a",))
    with torch.no_grad():
        before = model(X)
        inject_lora(model, adapter="b", **SPECS["b"])
        randomise(model, "b")
        assert torch.equal(model(X), before)


def test_set_adapter_unknown_name_lists_the_adapters():
    model = multi()
    with pytest.raises(LoRAError, match=r"no adapter named 'z'; its adapters are \['a', 'b', 'c'\]"):
        set_adapter(model, "z")


def test_same_name_on_the_same_layer_is_an_error_and_changes_nothing():
    model = multi(names=("a",))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoRAError, match="already has a LoRA adapter named 'a'"):
        inject_lora(model, ["v"], r=2, adapter="a")
    assert {k: v for k, v in model.state_dict().items()}.keys() == state.keys()


@pytest.mark.parametrize("bad", ["", "a.b", "x__y", "1st", 3])
def test_adapter_names_are_checked(bad):
    with pytest.raises(LoRAError, match="adapter names"):
        inject_lora(copy.deepcopy(BASE), ["q"], adapter=bad)


def test_parameters_of_other_adapters_are_suffixed_and_all_train():
    model = multi(names=("a", "b"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.0.attn.qkv.lora_A_q__a" in trainable and "blocks.0.attn.qkv.lora_A_k__b" in trainable
    assert all("lora_" in n for n in trainable)


def test_omitting_the_name_with_several_adapters_is_an_error_listing_them(tmp_path):
    model = multi()
    calls = [
        lambda: lora_state_dict(model),
        lambda: load_lora_state_dict(model, {}),
        lambda: save_lora(model, tmp_path / "x.safetensors"),
        lambda: save_peft_adapter(model, tmp_path / "peft"),
        lambda: lora_summary(model),
        lambda: verify_lora(model, X),
        lambda: merge_lora(model),
    ]
    for call in calls:
        with pytest.raises(LoRAError, match=r"several adapters \['a', 'b', 'c'\]"):
            call()


def test_state_keys_are_the_same_for_every_name():
    model = multi(names=("a",))
    inject_lora(model, adapter="z", dropout=0.0, **SPECS["a"])
    assert set(lora_state_dict(model, adapter="a")) == set(lora_state_dict(model, adapter="z"))
    load_lora_state_dict(model, lora_state_dict(model, adapter="a"), adapter="z")
    set_adapter(model, "z")
    with torch.no_grad():
        out_z = model(X)
        set_adapter(model, "a")
        assert torch.equal(out_z, model(X))


def test_files_hold_one_adapter_each_and_reload_under_their_names(tmp_path):
    model = multi()
    paths = [save_lora(model, tmp_path / f"{n}.safetensors", adapter=n) for n in ("a", "b", "c")]
    fresh = copy.deepcopy(BASE)
    for path in paths:
        load_lora(fresh, path)
    assert adapter_names(fresh) == ("a", "b", "c")
    with torch.no_grad():
        for name in ("a", "b", "c"):
            set_adapter(model, name)
            set_adapter(fresh, name)
            assert torch.equal(model(X), fresh(X))
    with safe_open(str(paths[1]), "pt") as handle:
        assert handle.metadata()["adapter"] == "b"
        assert not any("__" in key for key in handle.keys())  # noqa: SIM118


def test_load_under_another_name_and_hot_swap_one_adapter(tmp_path):
    model = multi(names=("a", "b"))
    path_a = save_lora(model, tmp_path / "a.safetensors", adapter="a")
    load_lora(model, path_a, adapter="a2")  # added beside the others
    assert adapter_names(model) == ("a", "b", "a2")
    other = multi(names=("b",))
    randomise(other, "b")
    randomise(other, "b")
    path_b = save_lora(other, tmp_path / "b.safetensors")
    b_before = {k: v.clone() for k, v in lora_state_dict(model, adapter="a").items()}
    load_lora(model, path_b)  # recorded name 'b': swapped into b, a untouched
    assert all(torch.equal(v, b_before[k]) for k, v in lora_state_dict(model, adapter="a").items())
    assert all(torch.equal(v, lora_state_dict(other)[k]) for k, v in lora_state_dict(model, adapter="b").items())
    with torch.no_grad():
        set_adapter(model, "a2")
        out = model(X)
        set_adapter(model, "a")
        assert torch.equal(out, model(X))


def test_a_failed_load_of_a_new_adapter_leaves_the_model_unchanged(tmp_path):
    model = multi(names=("a", "b"))
    donor = multi(names=("c",))
    path = save_lora(donor, tmp_path / "c.safetensors")
    tensors = dict(lora_state_dict(donor))
    tensors.pop(next(iter(tensors)))
    with safe_open(str(path), "pt") as handle:
        header = handle.metadata()
    broken = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(broken), metadata=header)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(LoRAError, match="missing tensors"):
        load_lora(model, broken)
    assert list(model.state_dict()) == list(before) and types == [type(m) for m in model.modules()]
    assert adapter_names(model) == ("a", "b")


def test_files_written_before_names_load_unchanged_as_default(tmp_path):
    model = inject_lora(copy.deepcopy(BASE), ["q", "v"], r=2, dropout=0.0)
    randomise(model, "default")
    path = save_lora(model, tmp_path / "new.safetensors")
    with safe_open(str(path), "pt") as handle:
        header = {k: v for k, v in handle.metadata().items() if k != "adapter"}  # the old header
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=header)
    fresh = load_lora(copy.deepcopy(BASE), old)
    assert adapter_names(fresh) == ("default",)
    assert set(dict(fresh.named_parameters())) == set(dict(model.named_parameters()))
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))


def test_delete_adapter_restores_plain_layers_and_switches_the_running_one(tmp_path):
    model = multi()
    delete_adapter(model, "a")
    assert adapter_names(model) == ("b", "c")
    with torch.no_grad():
        torch.testing.assert_close(model(X), alone(model, "b", tmp_path)(X), rtol=0, atol=1e-6)
    delete_adapter(model, "b")
    delete_adapter(model, "c")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(BASE.state_dict())
    with torch.no_grad():
        assert torch.equal(model(X), BASE(X))
    with pytest.raises(LoRAError, match="no LoRA adapters"):
        delete_adapter(model, "a")


def test_merge_one_adapter_refuses_while_others_remain_unless_told(tmp_path):
    model = multi()
    with pytest.raises(LoRAError, match=r"drop the model's other adapters \['a', 'c'\]"):
        merge_lora(model, adapter="b")
    assert adapter_names(model) == ("a", "b", "c")
    reference = alone(model, "b", tmp_path)
    merged = merge_lora(model, adapter="b", discard_others=True)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(BASE.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(X), reference(X), rtol=1e-5, atol=1e-5)


def test_summary_and_verify_per_adapter():
    model = multi()
    summary = lora_summary(model, adapter="b")
    assert [n for n, _ in summary.adapted] == [
        "blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv", "blocks.1.mlp.fc1"
    ]
    assert summary.adapter_params == sum(v.numel() for v in lora_state_dict(model, adapter="b").values())
    changes = verify_lora(model, X, adapter="c")
    assert set(changes) == {"blocks.0.attn.qkv[v]", "blocks.0.mlp.fc2", "blocks.1.attn.qkv[v]", "blocks.1.mlp.fc2"}
    with torch.no_grad():  # verify ran adapter c and put the running adapter back
        out = model(X)
        set_adapter(model, "a")
        assert torch.equal(out, model(X))


def test_peft_files_per_adapter(tmp_path):
    base = PlainNet().eval()
    model = inject_lora(copy.deepcopy(base), ["stem"], r=2, dropout=0.0, adapter="one")
    inject_lora(model, ["stem", "mixer.left"], r=3, dropout=0.0, adapter="two")
    randomise(model, "two")
    folder = save_peft_adapter(model, tmp_path / "two", adapter="two")
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 3
    load_peft_adapter(model, folder, adapter="copy")
    x = torch.randn(4, 12)
    with torch.no_grad():
        set_adapter(model, "two")
        out = model(x)
        set_adapter(model, "copy")
        assert torch.equal(out, model(x))


def test_mha_named_adapters_run_alone(tmp_path):
    base = TorchvisionStyleViT().eval()
    model = copy.deepcopy(base)
    inject_lora(model, ["q", "v"], r=2, dropout=0.0, adapter="x")
    inject_lora(model, ["q", "k", "v", "o"], r=3, dropout=0.0, adapter="y")
    randomise(model, "x")
    randomise(model, "y")
    image = torch.randn(2, 3, 32, 32)
    attention = [m for m in model.modules() if isinstance(m, LoRAMultiheadAttention)]
    assert attention and all(m.adapter_names == ("x", "y") for m in attention)
    with torch.no_grad():
        for name in ("x", "y"):
            set_adapter(model, name)
            reference = alone(model, name, tmp_path, base)
            torch.testing.assert_close(model(image), reference(image), rtol=0, atol=1e-5)
        with disable_lora(model):
            assert torch.equal(model(image), base(image))
    merged = merge_lora(model, adapter="y", discard_others=True)
    assert type(merged.encoder.layers[0].self_attention) is nn.MultiheadAttention


# --- the fixes that came with the redesign ------------------------------------------------------


def test_a_same_layout_swap_keeps_what_the_user_made_trainable(tmp_path):
    model = inject_lora(copy.deepcopy(BASE), ["q", "v"], r=2)
    path = save_lora(model, tmp_path / "a.safetensors")
    norm = model.blocks[0].norm1.weight
    norm.requires_grad_(True)  # the user unfroze a norm after injecting
    frozen_adapter = model.blocks[0].attn.qkv.lora_A_q
    frozen_adapter.requires_grad_(False)
    load_lora(model, path)
    assert norm.requires_grad and not frozen_adapter.requires_grad


def test_verify_refuses_nan_outputs_instead_of_calling_adapters_inert():
    model = inject_lora(copy.deepcopy(BASE), ["q", "v"], r=2)
    with pytest.raises(LoRAError, match="NaN or Inf on the example inputs"):
        verify_lora(model, torch.full_like(X, float("nan")))


def test_read_lora_metadata_reads_no_tensor(tmp_path, monkeypatch):
    model = inject_lora(copy.deepcopy(BASE), ["q", "v"], r=2)
    path = save_lora(model, tmp_path / "a.safetensors", metadata={"run": 7})
    reads = []

    class Counting:
        def __init__(self, *args, **kwargs):
            self.inner = safe_open(*args, **kwargs)

        def __enter__(self):
            handle = self.inner.__enter__()
            outer = self

            class Handle:
                def metadata(self):
                    return handle.metadata()

                def keys(self):
                    return handle.keys()

                def get_tensor(self, key):
                    reads.append(key)
                    return handle.get_tensor(key)

            outer.handle = Handle()
            return outer.handle

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(lora_vit.io, "safe_open", Counting)
    assert read_lora_metadata(path) == {"run": 7}
    assert reads == []
    load_lora(copy.deepcopy(BASE), path)
    assert reads  # the counting really sees tensor reads


@pytest.mark.parametrize("flag", ["use_rslora", "use_dora"])
@pytest.mark.parametrize("value", ["false", 0, 1, None])
def test_flags_must_be_booleans(flag, value):
    with pytest.raises(LoRAError, match=f"{flag} must be True or False"):
        inject_lora(copy.deepcopy(BASE), ["q"], **{flag: value})
    with pytest.raises(LoRAError, match=f"{flag} must be True or False"):
        LoRALinear(nn.Linear(4, 4), r=2, **{flag: value})


def test_pad_keeps_float64_factors_for_a_float64_model(tmp_path):
    base = copy.deepcopy(BASE).double()
    small = inject_lora(copy.deepcopy(base), ["q", "v"], r=2, dropout=0.0)
    randomise(small, "default")
    path = save_lora(small, tmp_path / "r2.safetensors")
    big = inject_lora(copy.deepcopy(base), ["q", "v"], r=4, dropout=0.0)
    load_lora(big, path, pad=True)
    qkv = big.blocks[0].attn.qkv
    assert qkv.lora_A_q.dtype == torch.float64
    x = X.double()
    with torch.no_grad():
        # float32 padding would round the factors: ~1e-8 off; float64 keeps them to ~1e-16.
        torch.testing.assert_close(big(x), small(x), rtol=0, atol=1e-12)


def test_compiled_switching_adapters_compiles_once_per_choice_without_breaks(fresh_dynamo):
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    model = multi()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    outputs = {}
    with torch.no_grad():
        for name in ("a", "b", "a", "b", None):
            set_adapter(model, name)
            outputs.setdefault(name, compiled(X))
            torch.testing.assert_close(compiled(X), model(X), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 3  # a, b and the base: each compiled once, then reused
    assert dict(counters["graph_break"]) == {}
    assert not torch.equal(outputs["a"], outputs["b"])


def test_adapter_parameters_are_exactly_one_adapters_factors():
    from lora_vit import adapter_parameters

    model = inject_lora(TimmStyleViT(dim=16, depth=2, heads=2), ["q", "v"], r=2, adapter="a")
    inject_lora(model, ["fc1"], r=3, adapter="b", use_dora=True)
    by_id = {id(p): n for n, p in model.named_parameters()}
    a_names = [by_id[id(p)] for p in adapter_parameters(model, "a")]
    b_names = [by_id[id(p)] for p in adapter_parameters(model, "b")]
    assert len(a_names) == 2 * 2 * 2 and all(n.endswith("__a") and ".qkv." in n for n in a_names)
    assert len(b_names) == 2 * 3 and all(n.endswith("__b") and ".fc1." in n for n in b_names)
    every = {n for n, p in model.named_parameters() if p.requires_grad}
    assert every == set(a_names) | set(b_names)
    with pytest.raises(LoRAError, match=r"'a'.*'b'"):
        adapter_parameters(model)
