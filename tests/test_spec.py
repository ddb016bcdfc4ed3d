"""AdapterSpec: the one owner of the adapter schema (validation, the JSON record, the PEFT mapping)."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_vit import AdapterSpec, LoRAError


@st.composite
def specs(draw):
    """A valid spec with its layer shape: unsliced, or 1-3 disjoint named row blocks."""
    in_features = draw(st.integers(1, 16))
    rslora, dora = draw(st.booleans()), draw(st.booleans())
    dropout = draw(st.sampled_from([0.0, 0.05, 0.5]))
    init = draw(st.sampled_from(["normal", "kaiming"]))
    alpha = st.one_of(st.integers(1, 64), st.floats(0.25, 64.0, allow_nan=False))
    if draw(st.booleans()):
        out_features = draw(st.integers(1, 16))
        r = draw(st.integers(1, min(in_features, out_features)))
        spec = AdapterSpec.build(out_features, in_features, r, draw(alpha), dropout,
                                 init=init, use_rslora=rslora, use_dora=dora)
        return spec, in_features, out_features
    cuts = sorted(draw(st.sets(st.integers(1, 24), min_size=2, max_size=4)))
    blocks = {f"s{i}": (a, b) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))}
    ranks = {n: draw(st.integers(1, min(in_features, b - a))) for n, (a, b) in blocks.items()}
    alphas = {n: draw(alpha) for n in blocks}
    out_features = cuts[-1] + draw(st.integers(0, 3))
    spec = AdapterSpec.build(out_features, in_features, ranks, alphas, dropout, slices=blocks,
                             init=init, use_rslora=rslora, use_dora=dora)
    return spec, in_features, out_features


@settings(max_examples=60, deadline=None)
@given(specs())
def test_the_json_record_round_trips_to_the_same_spec(drawn):
    spec, in_features, out_features = drawn
    record = json.loads(json.dumps(spec.config(in_features, out_features, kind="linear")))
    assert AdapterSpec.from_config(record, init=spec.init) == spec
    # Factor shapes follow the slices: A (r, in), B (rows, r), magnitude (rows,) with DoRA.
    shapes = dict(spec.shapes(in_features))
    for s in spec.slices:
        assert shapes[s.a_name] == (s.r, in_features) and shapes[s.b_name] == (s.stop - s.start, s.r)
        assert (s.magnitude_name in shapes) == spec.use_dora
    assert spec.total_rank == sum(s.r for s in spec.slices)


@settings(max_examples=60, deadline=None)
@given(specs())
def test_the_peft_mapping_round_trips_whole_layer_adapters_and_refuses_slices(drawn):
    spec, in_features, out_features = drawn
    if not spec.covers_all_rows(out_features):
        with pytest.raises(LoRAError, match="fused q/k/v slices"):
            spec.peft_fields()
        return
    fields = spec.peft_fields()
    peft_config = {"lora_dropout": fields["lora_dropout"], "use_rslora": fields["use_rslora"],
                   "use_dora": fields["use_dora"]}
    record = AdapterSpec.peft_record(in_features, out_features, fields["r"], fields["lora_alpha"], peft_config)
    assert AdapterSpec.from_config(record, init=spec.init) == spec
    names = AdapterSpec.peft_tensor_names(spec.use_dora)
    assert [ours for ours, _ in names] == [n for n, _ in spec.shapes(in_features)]
    assert dict(names)["lora_A"] == "lora_A" and ("lora_magnitude_vector" in dict(names).values()) == spec.use_dora


@pytest.mark.parametrize(("field", "value", "message"), [
    ("use_rslora", "false", "use_rslora must be True or False, got 'false'"),
    ("use_dora", 1, "use_dora must be True or False, got 1"),
    ("dropout", 1.0, "dropout"),
    ("init", "xavier", "xavier"),
])
def test_bad_values_are_refused_by_name_not_coerced(field, value, message):
    arguments = {"use_rslora": False, "use_dora": False, "init": "normal", "dropout": 0.0} | {field: value}
    dropout = arguments.pop("dropout")
    with pytest.raises(LoRAError, match=message):
        AdapterSpec.build(8, 8, 2, 4, dropout, **arguments)


@pytest.mark.parametrize(("r", "slices", "message"), [
    (9, None, "r"),
    ({"q": 2}, None, "per-slice r or alpha mappings need `slices`"),
    (2, {"q": (0, 4), "k": (3, 8)}, "overlap"),
    (2, {"q": (0, 9)}, r"inside \[0, 8\)"),
    ({"q": 2}, {"q": (0, 4), "v": (4, 8)}, "without an entry for slice 'v'"),
])
def test_bad_shapes_are_refused_naming_the_slice_or_rank(r, slices, message):
    with pytest.raises(LoRAError, match=message):
        AdapterSpec.build(8, 8, r, 4, 0.0, slices=slices)


def test_a_malformed_record_is_refused_whole():
    good = AdapterSpec.build(8, 4, 2, 4, 0.0).config(4, 8)
    for broken in ({**good, "use_rslora": "false"}, {**good, "slices": []}, {**good, "in_features": 4.0}):
        with pytest.raises(LoRAError, match="malformed"):
            AdapterSpec.from_config(broken)
    with pytest.raises(LoRAError, match="an unnamed slice must cover all rows"):
        AdapterSpec.from_config({**good, "slices": [{**good["slices"][0], "stop": 4}]})
