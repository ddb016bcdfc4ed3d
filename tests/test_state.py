import copy
import json
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from models import HF4StyleViT, PlainNet, TimmStyleViT
from safetensors.torch import save_file

import lora_vit.io
from lora_vit import (
    LoRAError,
    LoRALinear,
    inject_lora,
    load_lora,
    load_lora_state_dict,
    lora_state_dict,
    read_lora_metadata,
    save_lora,
)


def randomise(model):
    with torch.no_grad():
        for tensor in lora_state_dict(model).values():
            if tensor.is_floating_point():
                tensor.normal_(0, 0.1)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.fixture
def trained():
    """(base, adapted): the same base weights, one with trained-looking adapters and head."""
    base = TimmStyleViT().eval()
    model = inject_lora(copy.deepcopy(base), ["q", "v", "fc1"], r={"q": 2, "v": 3, "fc1": 4}, alpha=8,
                        trainable=["head"]).eval()
    randomise(model)
    return base, model


def test_lora_state_dict_holds_exactly_adapters_and_trainable_modules(trained):
    _, model = trained
    keys = list(lora_state_dict(model))
    expected = []
    for i in range(2):
        expected += [f"blocks.{i}.attn.qkv.lora_{m}_{s}" for s in "qv" for m in "AB"]
        expected += [f"blocks.{i}.mlp.fc1.lora_A", f"blocks.{i}.mlp.fc1.lora_B"]
    assert sorted(keys) == sorted([*expected, "head.weight", "head.bias"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(keys)


def test_lora_state_dict_without_adapters_is_an_error():
    with pytest.raises(LoRAError, match="has no LoRA adapters; call inject_lora first"):
        lora_state_dict(PlainNet())


def test_state_dict_round_trip_gives_identical_outputs(trained):
    base, model = trained
    other = inject_lora(copy.deepcopy(base), ["q", "v", "fc1"], r={"q": 2, "v": 3, "fc1": 4}, alpha=8,
                        trainable=["head"]).eval()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(other(x), model(x))
    result = load_lora_state_dict(other, lora_state_dict(model))
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(other(x), model(x))


def test_non_strict_load_reports_missing_and_unexpected(trained):
    _, model = trained
    state = dict(lora_state_dict(model))
    state.pop("head.bias")
    state["extra"] = torch.zeros(1)
    result = load_lora_state_dict(model, state, strict=False)
    assert result.missing_keys == ["head.bias"] and result.unexpected_keys == ["extra"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.pop("head.weight"), r"missing tensors \['head.weight'\]"),
        (lambda s: s.__setitem__("blocks.0.attn.qkv.lora_A_k", torch.zeros(2, 32)), "unexpected tensors"),
        (lambda s: s.__setitem__("blocks.0.attn.qkv.lora_A_q", torch.zeros(3, 32)),
         r"'blocks.0.attn.qkv.lora_A_q' has shape \(3, 32\), the model expects \(2, 32\)"),
        (lambda s: s.__setitem__("head.bias", torch.full((3,), float("nan"))), "'head.bias' contains NaN or Inf"),
        (lambda s: s.__setitem__("head.bias", torch.zeros(3, dtype=torch.int64)), "'head.bias' has dtype torch.int64"),
        (lambda s: s.__setitem__("head.bias", [0.0, 0.0, 0.0]), "'head.bias' must be a tensor, got list"),
    ],
)
def test_bad_state_dicts_raise_and_leave_the_model_unchanged(trained, mutate, message):
    _, model = trained
    state = {k: v.clone() + 1 for k, v in lora_state_dict(model).items()}
    mutate(state)
    before = snapshot(model)
    with pytest.raises(LoRAError, match=message):
        load_lora_state_dict(model, state)
    assert_unchanged(model, before)


def test_save_then_load_into_a_fresh_base_model(tmp_path, trained):
    base, model = trained
    path = save_lora(model, tmp_path / "sub" / "adapter.safetensors", metadata={"lr": 5e-4, "tags": ["a", "b"]})
    fresh = copy.deepcopy(base)
    assert load_lora(fresh, path) is fresh
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(fresh.eval()(x), model(x))
    assert [n for n, m in fresh.named_modules() if isinstance(m, LoRALinear)] == [
        n for n, m in model.named_modules() if isinstance(m, LoRALinear)
    ]
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(lora_state_dict(model))
    assert read_lora_metadata(path) == {"lr": 5e-4, "tags": ["a", "b"]}
    # Loading again into the now-injected model works too.
    load_lora(fresh, path)
    assert torch.equal(fresh(x), model(x))


def test_file_records_config_version_and_base_shapes(tmp_path, trained):
    from safetensors import safe_open

    _, model = trained
    path = save_lora(model, tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as handle:
        header = handle.metadata()
    assert header["format"] == "lora_vit" and header["lora_vit_version"] == lora_vit.__version__
    layers = json.loads(header["layers"])
    qkv = layers["blocks.0.attn.qkv"]
    assert (qkv["in_features"], qkv["out_features"]) == (32, 96)
    assert [(s["name"], s["start"], s["stop"], s["r"], s["alpha"]) for s in qkv["slices"]] == [
        ("q", 0, 32, 2, 8.0), ("v", 64, 96, 3, 8.0)
    ]
    assert json.loads(header["trainable"]) == ["head"]


@given(
    targets=st.lists(st.sampled_from(["q", "k", "v", "o", "fc1", "fc2"]), min_size=1, unique=True),
    r=st.integers(1, 6),
    alpha=st.floats(0.5, 64),
    dropout=st.sampled_from([0.0, 0.1, 0.5]),
    rslora=st.booleans(),
    with_head=st.booleans(),
)
def test_file_round_trip_property(tmp_path_factory, targets, r, alpha, dropout, rslora, with_head):
    base = HF4StyleViT().eval()
    model = inject_lora(copy.deepcopy(base), targets, r=r, alpha=alpha, dropout=dropout, use_rslora=rslora,
                        trainable=["classifier"] if with_head else ()).eval()
    randomise(model)
    path = save_lora(model, tmp_path_factory.mktemp("rt") / "a.safetensors")
    fresh = load_lora(copy.deepcopy(base), path).eval()
    x = torch.randn(2, 5, 32)
    assert torch.equal(fresh(x), model(x))
    for (name, layer), (_, again) in zip(
        ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)),
        ((n, m) for n, m in fresh.named_modules() if isinstance(m, LoRALinear)),
    ):
        assert again.config() == layer.config(), name


def test_load_into_a_model_of_the_wrong_shape_names_the_layer(tmp_path, trained):
    _, model = trained
    path = save_lora(model, tmp_path / "a.safetensors")
    wrong = TimmStyleViT(dim=48, heads=4)
    before = snapshot(wrong)
    with pytest.raises(LoRAError, match=r"layer 'blocks.0.attn.qkv': expected a Linear\(32, 96\)"):
        load_lora(wrong, path)
    assert_unchanged(wrong, before)
    assert not any(isinstance(m, LoRALinear) for m in wrong.modules())
    with pytest.raises(LoRAError, match=r"adapts layer 'blocks.0.attn.qkv', which this model does not have"):
        load_lora(PlainNet(), path)


def test_load_into_a_model_injected_with_another_layout_is_an_error(tmp_path, trained):
    base, model = trained
    path = save_lora(model, tmp_path / "a.safetensors")
    other = inject_lora(copy.deepcopy(base), ["q"], r=2, trainable=["head"])
    with pytest.raises(LoRAError, match="already has adapters with another layout"):
        load_lora(other, path)


def write_adapter(path, tensors, **header):
    save_file(tensors, str(path), metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in header.items()})


def good_header(model):
    layers = {n: m.config() for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    return {"format": "lora_vit", "format_version": "1", "layers": layers, "trainable": ["head"], "user": {}}


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        ("random", "not a readable safetensors file"),
        ("truncated", "not a readable safetensors file"),
        ("empty", "not a readable safetensors file"),
        ("pickle", "not a readable safetensors file"),
        ("no_format", "is not a lora-vit adapter file: its metadata has format None"),
        ("bad_json", "metadata field 'layers' is missing or not valid JSON"),
        ("bad_layer", "recorded config of layer 'blocks.0.attn.qkv' is malformed"),
        ("bad_rank", "r must be a positive integer, got 0"),
        ("shape_claim", r"'blocks.0.attn.qkv.lora_A_q' has shape \(2, 32\), the model expects \(5, 32\)"),
        ("missing", r"missing tensors \['head.bias'\]"),
        ("extra", r"unexpected tensors \['blocks.9.attn.qkv.lora_A'\]"),
        ("nan", "'head.weight' contains NaN or Inf"),
        ("trainable_missing", "trains module 'classifier', which this model does not have"),
    ],
)
def test_broken_files_raise_and_leave_the_model_unchanged(tmp_path, trained, corrupt, message):
    base, model = trained
    good = tmp_path / "good.safetensors"
    save_lora(model, good)
    tensors = {k: v.contiguous() for k, v in lora_state_dict(model).items()}
    header = good_header(model)
    path = tmp_path / "bad.safetensors"
    if corrupt == "random":
        path.write_bytes(os.urandom(4096))
    elif corrupt == "truncated":
        path.write_bytes(good.read_bytes()[:-100])
    elif corrupt == "empty":
        path.write_bytes(b"")
    elif corrupt == "pickle":
        torch.save(lora_state_dict(model), path)  # a pickle must never be unpickled
    elif corrupt == "no_format":
        write_adapter(path, tensors, note="x")
    elif corrupt == "bad_json":
        write_adapter(path, tensors, **{**header, "layers": "{not json"})
    elif corrupt == "bad_layer":
        header["layers"]["blocks.0.attn.qkv"]["slices"] = "q"
        write_adapter(path, tensors, **header)
    elif corrupt == "bad_rank":
        header["layers"]["blocks.0.attn.qkv"]["slices"][0]["r"] = 0
        write_adapter(path, tensors, **header)
    elif corrupt == "shape_claim":
        header["layers"]["blocks.0.attn.qkv"]["slices"][0]["r"] = 5
        write_adapter(path, tensors, **header)
    elif corrupt == "missing":
        tensors.pop("head.bias")
        write_adapter(path, tensors, **header)
    elif corrupt == "extra":
        tensors["blocks.9.attn.qkv.lora_A"] = torch.zeros(1)
        write_adapter(path, tensors, **header)
    elif corrupt == "nan":
        tensors["head.weight"] = torch.full_like(tensors["head.weight"], float("nan"))
        write_adapter(path, tensors, **header)
    elif corrupt == "trainable_missing":
        header["trainable"] = ["classifier"]
        write_adapter(path, tensors, **header)
    fresh = copy.deepcopy(base)
    before = snapshot(fresh)
    with pytest.raises(LoRAError, match=message):
        load_lora(fresh, path)
    assert_unchanged(fresh, before)
    assert not any(isinstance(m, LoRALinear) for m in fresh.modules())
    assert not any(p.requires_grad is False for p in fresh.parameters())


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter file"):
        load_lora(PlainNet(), tmp_path / "nope.safetensors")


def test_interrupted_save_keeps_the_previous_file(tmp_path, trained, monkeypatch):
    _, model = trained
    path = save_lora(model, tmp_path / "a.safetensors", metadata={"version": 1})
    original = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(lora_vit.io.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_lora(model, path, metadata={"version": 2})
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left behind


def test_bad_metadata_is_refused_before_writing(tmp_path, trained):
    _, model = trained
    with pytest.raises(LoRAError, match="JSON-serialisable"):
        save_lora(model, tmp_path / "a.safetensors", metadata={"x": object()})
    with pytest.raises(LoRAError, match="string keys"):
        save_lora(model, tmp_path / "a.safetensors", metadata={1: "x"})
    assert not (tmp_path / "a.safetensors").exists()


def test_tied_trainable_weights_save(tmp_path):
    model = PlainNet()
    model.readout.weight = torch.nn.Parameter(torch.randn(5, 24))
    inject_lora(model, ["stem"], r=2, trainable=["readout", "mixer"])
    model.mixer["left"].weight = model.mixer["right"].weight  # shared storage
    path = save_lora(model, tmp_path / "tied.safetensors")
    fresh = PlainNet()
    fresh.readout.weight = torch.nn.Parameter(torch.zeros(5, 24))
    fresh.mixer["left"].weight = fresh.mixer["right"].weight
    load_lora(fresh, path, check_base=False)  # fresh's stem is another random base
    assert torch.equal(fresh.mixer["left"].weight, model.mixer["right"].weight)
    assert torch.equal(fresh.readout.weight, model.readout.weight)


def test_saved_file_gets_ordinary_permissions(tmp_path, trained):
    _, model = trained
    old = os.umask(0o022)
    try:
        path = save_lora(model, tmp_path / "a.safetensors")
        assert path.stat().st_mode & 0o777 == 0o644
        path.chmod(0o640)
        save_lora(model, path)  # overwriting keeps the existing file's mode
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_head_only_run_saves_and_loads_without_adapters(tmp_path):
    base = PlainNet().eval()
    model = inject_lora(copy.deepcopy(base), targets=(), trainable=["readout"]).eval()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"readout.weight", "readout.bias"}
    with torch.no_grad():
        model.readout.weight.add_(1.0)
    path = save_lora(model, tmp_path / "probe.safetensors")
    fresh = load_lora(copy.deepcopy(base), path).eval()
    x = torch.randn(2, 12)
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(LoRAError, match="targets is empty and nothing is trainable"):
        inject_lora(PlainNet(), targets=())
