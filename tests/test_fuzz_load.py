"""Fuzzed adapter loading: every broken file or state dict is a LoRAError and leaves the model as it was."""

import copy
import json
import math
import re
import struct

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from models import TimmStyleViT
from safetensors.torch import save as safetensors_bytes

from lora_vit import (
    LoRAError,
    LoRALinear,
    adapter_names,
    inject_lora,
    load_lora,
    load_lora_state_dict,
    lora_state_dict,
    save_lora,
)

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Built once: the tests below never change them (loads go into deep copies).
BASE = TimmStyleViT(dim=16, depth=1, heads=2).eval()
TRAINED = inject_lora(copy.deepcopy(BASE), ["q", "v", "fc1"], r={"q": 2, "v": 3, "fc1": 2}, alpha=8, trainable=["head"])
with torch.no_grad():
    for _tensor in lora_state_dict(TRAINED).values():
        _tensor.normal_(0, 0.1)
@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """(file bytes, header, tensors) of a valid adapter file."""
    from safetensors import safe_open

    path = save_lora(TRAINED, tmp_path_factory.mktemp("good") / "a.safetensors")
    with safe_open(str(path), "pt") as handle:
        header = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    return path.read_bytes(), header, tensors


def fingerprint(model):
    """Everything a load may change: parameters, buffers, module types, trainability, the record."""
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [type(m).__name__ for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        getattr(model, "_lora_vit_trainable", None),
    )


def assert_same(model, before):
    state, types, grads, record = fingerprint(model)
    assert list(state) == list(before[0])
    assert all(torch.equal(state[k], before[0][k]) for k in state)
    assert types == before[1] and grads == before[2] and record == before[3]


def targets():
    """A fresh base model and an already injected one with the same layout."""
    injected = inject_lora(copy.deepcopy(BASE), ["q", "v", "fc1"], r={"q": 2, "v": 3, "fc1": 2}, alpha=8,
                           trainable=["head"])
    return [copy.deepcopy(BASE), injected]


def expect_refused(path, message=None):
    """load_lora into a fresh and an injected model both raise LoRAError and change nothing."""
    for model in targets():
        before = fingerprint(model)
        with pytest.raises(LoRAError, match=message) as info:
            load_lora(model, path)
        assert str(path) in str(info.value)  # the message says which file
        assert_same(model, before)


def write(tmp_path, data: bytes):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    return path


def header_bytes(header, tensors):
    return safetensors_bytes(tensors, metadata=header)


# --- files that are not safetensors at all --------------------------------------------------


@FUZZ
@given(cut=st.floats(0.0, 0.999))
def test_truncated_files_are_refused(tmp_path, good, cut):
    data = good[0]
    expect_refused(write(tmp_path, data[: int(len(data) * cut)]), "not a readable safetensors file")


@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes_are_refused(tmp_path, data):
    expect_refused(write(tmp_path, data), "not a readable safetensors file")


@FUZZ
@given(length=st.integers(0, 2**64 - 1), body=st.binary(max_size=256))
def test_random_header_lengths_are_refused(tmp_path, length, body):
    # The first 8 bytes of a safetensors file give the header length; a huge claim must not
    # allocate or hang, a small one must not read past the end.
    expect_refused(write(tmp_path, struct.pack("<Q", length) + body), "not a readable safetensors file")


@FUZZ
@given(position=st.integers(0, 10_000), value=st.integers(0, 255))
def test_corrupted_bytes_load_or_are_refused_cleanly(tmp_path, good, position, value):
    data = bytearray(good[0])
    position %= len(data)
    assume(data[position] != value)
    data[position] = value
    path = write(tmp_path, bytes(data))
    for model in targets():
        before = fingerprint(model)
        try:
            load_lora(model, path)
        except LoRAError:
            assert_same(model, before)
        else:  # a flipped byte in tensor data is still a valid (different) adapter; one in the
            # recorded adapter name, a valid adapter under another name (added beside the first)
            for name in adapter_names(model):
                assert all(torch.isfinite(v).all() for v in lora_state_dict(model, adapter=name).values())


# --- valid safetensors, wrong metadata --------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(
    drop=st.sets(st.sampled_from(["format", "format_version", "layers", "trainable", "user", "base_fingerprint"])),
    replace=st.dictionaries(
        st.sampled_from(["format", "layers", "trainable", "base_fingerprint"]),
        st.text(max_size=20) | JSON_VALUES.map(json.dumps),
        max_size=2,
    ),
)
def test_missing_or_garbage_metadata_is_refused(tmp_path, good, drop, replace):
    _, header, tensors = good
    assume({"format", "layers", "trainable", "base_fingerprint"} & (drop | set(replace)))
    broken = {k: v for k, v in header.items() if k not in drop}
    broken.update(replace)
    path = write(tmp_path, header_bytes(broken, tensors))
    for model in targets():
        before = fingerprint(model)
        try:
            load_lora(model, path)
        except LoRAError:
            assert_same(model, before)
        else:
            # Only a replacement that happens to equal what was there, or a dropped optional
            # field (format_version, user, base_fingerprint), may load.
            assert "format" not in drop and "layers" not in drop and "trainable" not in drop
            assert all(json.loads(broken[k]) == json.loads(header[k]) for k in replace if k in ("layers", "trainable"))


FIELDS = ["in_features", "out_features", "dropout", "use_rslora", "slices"]
SLICE_FIELDS = ["name", "start", "stop", "r", "alpha"]


@FUZZ
@given(
    layer=st.sampled_from(["blocks.0.attn.qkv", "blocks.0.mlp.fc1"]),
    field=st.sampled_from(FIELDS + [f"slices.{f}" for f in SLICE_FIELDS]),
    value=st.integers(-3, 200) | st.floats(allow_nan=True) | st.text(max_size=4) | st.none() | st.booleans(),
)
def test_metadata_claiming_other_shapes_or_values_is_refused(tmp_path, good, layer, field, value):
    _, header, tensors = good
    layers = json.loads(header["layers"])
    config = layers[layer]
    if field.startswith("slices."):
        key = field.split(".", 1)[1]
        assume(config["slices"][0][key] != value or type(config["slices"][0][key]) is not type(value))
        config["slices"][0][key] = value
    else:
        assume(config[field] != value or type(config[field]) is not type(value))
        config[field] = value
    harmless = field in ("dropout", "use_rslora", "slices.alpha") or (field == "slices.name" and layer.endswith("fc1"))
    path = write(tmp_path, header_bytes({**header, "layers": json.dumps(layers)}, tensors))
    for model in targets():
        before = fingerprint(model)
        try:
            load_lora(model, path)
        except LoRAError:
            assert_same(model, before)
        else:
            # Dropout, scaling and rslora do not change tensor shapes, so a valid value of
            # one of them is a different but loadable adapter; everything else must fail.
            assert harmless, f"loaded with {field}={value!r}"


# --- valid metadata, wrong tensors ------------------------------------------------------------

KEYS = sorted(lora_state_dict(TRAINED))


def mutations():
    key = st.sampled_from(KEYS)
    return st.one_of(
        st.tuples(st.just("drop"), key),
        st.tuples(st.just("extra"), st.text("abcdefgh.", min_size=1, max_size=12)),
        st.tuples(st.just("dtype"), key, st.sampled_from([torch.int8, torch.int32, torch.int64, torch.bool,
                                                          torch.uint8, torch.complex64])),
        st.tuples(st.just("shape"), key, st.lists(st.integers(0, 5), min_size=0, max_size=3)),
        st.tuples(st.just("nonfinite"), key, st.sampled_from([math.nan, math.inf, -math.inf, 1e39]),
                  st.integers(0, 10_000)),
    )


def mutate(tensors, mutation):
    tensors = {k: v.clone() for k, v in tensors.items()}
    kind, key, *rest = mutation
    if kind == "drop":
        del tensors[key]
    elif kind == "extra":
        if key in tensors:
            return None
        tensors[key] = torch.zeros(2)
    elif kind == "dtype":
        tensors[key] = tensors[key].to(rest[0])
    elif kind == "shape":
        if tuple(rest[0]) == tuple(tensors[key].shape):
            return None
        tensors[key] = torch.zeros(rest[0])
    else:
        value, position = rest
        flat = tensors[key].to(torch.float64).reshape(-1)
        flat[position % flat.numel()] = value
        tensors[key] = flat.reshape(tensors[key].shape)  # float64: 1e39 is finite until cast
    return tensors


@FUZZ
@given(mutation=mutations())
def test_wrong_tensors_in_a_file_are_refused(tmp_path, good, mutation):
    _, header, tensors = good
    broken = mutate(tensors, mutation)
    assume(broken is not None)
    message = "missing tensors" if mutation[0] == "drop" else re.escape(repr(mutation[1]))
    expect_refused(write(tmp_path, header_bytes(header, broken)), message)


@FUZZ
@given(mutation=mutations(), strict=st.booleans())
def test_wrong_tensors_in_a_state_dict_are_refused(mutation, strict):
    broken = mutate({k: v.clone() for k, v in lora_state_dict(TRAINED).items()}, mutation)
    assume(broken is not None)
    model = targets()[1]
    before = fingerprint(model)
    if not strict and mutation[0] in ("drop", "extra"):  # reported, not refused
        result = load_lora_state_dict(model, broken, strict=False)
        assert (result.missing_keys, result.unexpected_keys) == (
            ([mutation[1]], []) if mutation[0] == "drop" else ([], [mutation[1]]))
        return
    with pytest.raises(LoRAError, match="missing tensors" if mutation[0] == "drop" else re.escape(repr(mutation[1]))):
        load_lora_state_dict(model, broken, strict=strict)
    assert_same(model, before)


@pytest.mark.parametrize(("state", "message"), [
    (None, "state_dict must be a mapping of names to tensors, got NoneType"),
    ([1.0], "state_dict must be a mapping of names to tensors, got list"),
    ({"head.bias": "tensor"}, "'head.bias' must be a tensor, got str"),
    ({"head.bias": [0.0, 0.0, 0.0]}, "'head.bias' must be a tensor, got list"),
])
def test_non_mapping_or_non_tensor_state_dicts_are_refused(state, message):
    model = targets()[1]
    before = fingerprint(model)
    if isinstance(state, dict):
        state = {**lora_state_dict(TRAINED), **state}
    with pytest.raises(LoRAError, match=message):
        load_lora_state_dict(model, state)
    assert_same(model, before)


def test_dense_values_are_required():
    model = targets()[1]
    before = fingerprint(model)
    for odd in (torch.zeros(model.head.bias.shape, device="meta"), model.head.bias.detach().to_sparse()):
        with pytest.raises(LoRAError, match=r"'head\.bias' must be a dense tensor"):
            load_lora_state_dict(model, {**lora_state_dict(TRAINED), "head.bias": odd})
    assert_same(model, before)


def test_a_trainable_module_that_contains_an_adapted_layer_is_refused(tmp_path, good):
    _, header, tensors = good
    path = write(tmp_path, header_bytes({**header, "trainable": json.dumps(["blocks.0.attn"])}, tensors))
    expect_refused(path, r"trainable module 'blocks.0.attn' contains adapted layers \['blocks.0.attn.qkv'\]")


def test_low_precision_values_load_cast_to_the_model_dtype():
    model = targets()[1]
    state = {k: v.to(torch.bfloat16) for k, v in lora_state_dict(TRAINED).items()}
    load_lora_state_dict(model, state)
    for key, value in lora_state_dict(model).items():
        assert value.dtype == torch.float32 and torch.equal(value, state[key].float())
    assert any(isinstance(m, LoRALinear) for m in model.modules())
