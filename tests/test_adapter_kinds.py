"""The table of adapter kinds: a kind registered from outside the library (here, in this file) is
injected, run, routed per sample, merged, saved and loaded like LoRA and DoRA, with no change to
the library; the built-in kinds keep their file records."""

import copy
import functools
import json
from dataclasses import dataclass

import models
import pytest
import torch
from models import PlainNet, TimmStyleViT
from safetensors import safe_open
from torch import Tensor

from lora_vit import (
    AdapterKind,
    AdapterSpec,
    LoRAError,
    LoRALinear,
    adapter_per_sample,
    inject_lora,
    load_lora,
    lora_state_dict,
    merge_lora,
    register_kind,
    save_lora,
    save_peft_adapter,
    set_adapter,
)
from lora_vit.kinds import KINDS, kind_named


@dataclass(frozen=True)
class VeRALikeKind(AdapterKind):
    """VeRA's update ``diag(b) B diag(d) A`` (Kopiczko et al. 2024), with every tensor trained.

    Per slice two more vectors: ``d`` ``(r,)`` scales the rows of ``A`` and ``b`` ``(rows,)`` the
    rows of ``B``; both start at 1, so a fresh adapter (``B = 0``) computes the base function.
    """

    name: str = "vera_like"

    @staticmethod
    def d_name(s):
        return f"lora_vera_d_{s.name}" if s.name else "lora_vera_d"

    @staticmethod
    def b_name(s):
        return f"lora_vera_b_{s.name}" if s.name else "lora_vera_b"

    def extra_shapes(self, s, in_features):
        return [(self.d_name(s), (s.r,)), (self.b_name(s), (s.rows,))]

    def initialise(self, view):
        super().initialise(view)
        with torch.no_grad():
            for s in view.spec.slices:
                view.param(self.d_name(s)).fill_(1.0)
                view.param(self.b_name(s)).fill_(1.0)

    def factors(self, view, dtype=None):
        a, scaled_b = super().factors(view, dtype)
        slices = view.spec.slices
        d = torch.cat([view.param(self.d_name(s)) for s in slices])
        rows = torch.zeros(view.out_features, dtype=scaled_b.dtype, device=scaled_b.device)
        for s in slices:
            rows = torch.cat([rows[: s.start], view.param(self.b_name(s)).to(scaled_b.dtype), rows[s.stop :]])
        return d.to(a.dtype)[:, None] * a, rows[:, None] * scaled_b


VERA_LIKE = register_kind(VeRALikeKind())
X = torch.randn(5, 12)



randomise = functools.partial(models.randomise, scale=0.3)


def dense_weight(base_weight: Tensor, state: dict, prefix: str, scaling: float) -> Tensor:
    """``W + scaling * diag(b) B diag(d) A`` from the tensors alone, in float64."""
    a, b = state[f"{prefix}.lora_A"].double(), state[f"{prefix}.lora_B"].double()
    d, e = state[f"{prefix}.lora_vera_d"].double(), state[f"{prefix}.lora_vera_b"].double()
    return base_weight.double() + scaling * torch.diag(e) @ b @ torch.diag(d) @ a


def test_registered_kind_is_in_the_table_and_refuses_clashes():
    assert kind_named("vera_like") is VERA_LIKE and KINDS["lora"].name == "lora"
    assert register_kind(VeRALikeKind()) is VERA_LIKE  # an equal kind again: the one in the table

    @dataclass(frozen=True)
    class Other(VeRALikeKind):
        label_text: str = "other"

    with pytest.raises(LoRAError, match="already registered"):
        register_kind(Other())
    with pytest.raises(LoRAError, match="unknown adapter kind 'nope'"):
        inject_lora(PlainNet(), ["stem"], kind="nope")
    with pytest.raises(LoRAError, match="use_dora=True asks for DoRA"):
        inject_lora(PlainNet(), ["stem"], kind="vera_like", use_dora=True)


def test_injected_kind_has_its_parameters_trains_and_starts_at_the_base():
    base = PlainNet()
    model = inject_lora(copy.deepcopy(base), ["stem", "mixer.right"], r=3, alpha=6, kind="vera_like")
    state = lora_state_dict(model)
    assert state["stem.lora_vera_d"].shape == (3,) and state["stem.lora_vera_b"].shape == (24,)
    assert all(p.requires_grad for p in model.stem.adapter_parameters()) and len(model.stem.adapter_parameters()) == 4
    torch.testing.assert_close(model(X), base(X), rtol=0, atol=0)
    model(X).square().sum().backward()
    assert model.stem.lora_B.grad.abs().sum() > 0
    assert model.stem.lora_vera_d.grad.abs().sum() == 0  # it scales B @ A, still zero


def test_forward_and_merge_equal_the_dense_formula():
    base = PlainNet().double()
    model = randomise(inject_lora(copy.deepcopy(base), ["stem", "mixer.right"], r=3, alpha=6, dropout=0.0,
                                  kind="vera_like"))
    state = {k: v.detach() for k, v in lora_state_dict(model).items()}
    stem = dense_weight(base.stem.weight, state, "stem", 6 / 3)
    right = dense_weight(base.mixer["right"].weight, state, "mixer.right", 6 / 3)
    x = X.double()
    h = torch.tanh(x @ stem.T + base.stem.bias)
    expected = base.readout((h @ base.mixer["left"].weight.T + base.mixer["left"].bias) * torch.sigmoid(h @ right.T))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-12)
        merged = merge_lora(copy.deepcopy(model))
        assert type(merged.stem) is torch.nn.Linear
        torch.testing.assert_close(merged.stem.weight, stem, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(merged.mixer["right"].weight, right, rtol=1e-12, atol=1e-12)


def test_save_records_the_kind_and_load_rebuilds_it(tmp_path):
    base = PlainNet()
    model = randomise(inject_lora(copy.deepcopy(base), ["stem"], r=2, kind="vera_like", trainable=["readout"]))
    path = save_lora(model, tmp_path / "vera.safetensors")
    with safe_open(path, "pt") as f:
        record = json.loads(f.metadata()["layers"])["stem"]
    assert record["adapter_kind"] == "vera_like" and "use_dora" not in record
    loaded = load_lora(copy.deepcopy(base), path)
    assert isinstance(loaded.stem, LoRALinear) and loaded.stem.adapter().kind is VERA_LIKE
    with torch.no_grad():  # in eval: no LoRA dropout
        torch.testing.assert_close(loaded.eval()(X), model.eval()(X), rtol=0, atol=0)
    with pytest.raises(LoRAError, match="unknown adapter kind 'nope'"):
        AdapterSpec.from_config(dict(record, adapter_kind="nope"))


def test_padding_a_kind_whose_parameters_grow_with_the_rank_is_refused_and_the_model_kept(tmp_path):
    base = PlainNet()
    low = randomise(inject_lora(copy.deepcopy(base), ["stem"], r=2, kind="vera_like"))
    path = save_lora(low, tmp_path / "r2.safetensors")
    high = inject_lora(copy.deepcopy(base), ["stem"], r=4, kind="vera_like")
    before = {k: v.clone() for k, v in lora_state_dict(high).items()}
    with pytest.raises(LoRAError, match=r"pad=True swaps lower ranks into A and B only, but adapter kind\(s\)"
                                        r" \['vera_like'\] add parameters whose shape depends on the rank"):
        load_lora(high, path, pad=True)
    assert all(torch.equal(before[k], v) for k, v in lora_state_dict(high).items()), "a failed load changes nothing"
    # DoRA's magnitude is per output row, not per rank: it still pads (as LoRA does).
    dora_low = randomise(inject_lora(copy.deepcopy(base), ["stem"], r=2, use_dora=True))
    dora_path = save_lora(dora_low, tmp_path / "dora.safetensors")
    dora_high = inject_lora(copy.deepcopy(base), ["stem"], r=4, use_dora=True)
    with torch.no_grad():
        torch.testing.assert_close(load_lora(dora_high, dora_path, pad=True).eval()(X), dora_low.eval()(X))


def test_fused_slices_and_a_mixed_batch_with_lora_and_dora():
    base = TimmStyleViT(dim=32, depth=1, heads=4).eval()
    model = inject_lora(copy.deepcopy(base), ["q", "v"], r=2, dropout=0.0, kind="vera_like", adapter="v")
    inject_lora(model, ["q", "v"], r=2, dropout=0.0, adapter="l")
    inject_lora(model, ["o"], r=2, dropout=0.0, use_dora=True, adapter="d")
    for name, seed in (("v", 1), ("l", 2), ("d", 3)):
        randomise(model, name, seed)
    x = torch.randn(3, 3, 32, 32)
    names = ["d", "v", "l"]
    with torch.no_grad():
        alone = []
        for i, name in enumerate(names):
            set_adapter(model, name)
            alone.append(model(x[i : i + 1]))
        with adapter_per_sample(model, names):
            mixed = model(x)
        torch.testing.assert_close(mixed, torch.cat(alone), rtol=1e-5, atol=1e-5)
        set_adapter(model, "v")
        merged = merge_lora(copy.deepcopy(model), adapter="v", discard_others=True)
        torch.testing.assert_close(merged(x), model(x), rtol=1e-5, atol=1e-5)


def test_peft_export_refuses_a_kind_it_has_no_form_for(tmp_path):
    model = inject_lora(PlainNet(), ["stem"], r=2, kind="vera_like")
    with pytest.raises(LoRAError, match="PEFT has no form for adapters of kind 'vera_like'"):
        save_peft_adapter(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_builtin_kinds_keep_their_file_records():
    lora = AdapterSpec.build(8, 6, 2, 4, 0.0).config(6, 8)
    dora = AdapterSpec.build(8, 6, 2, 4, 0.0, use_dora=True).config(6, 8)
    assert "adapter_kind" not in lora and "use_dora" not in lora
    assert dora["use_dora"] is True and "adapter_kind" not in dora
    assert json.loads(json.dumps(dora)) == dora
    assert AdapterSpec.from_config(dora).kind is KINDS["dora"] and AdapterSpec.from_config(lora).kind is KINDS["lora"]
    assert AdapterSpec.build(8, 6, 2, 4, 0.0, kind="dora") == AdapterSpec.build(8, 6, 2, 4, 0.0, use_dora=True)


def test_a_kind_that_cannot_run_on_a_packed_in_projection_is_refused_in_one_message():
    from mha_models import TorchvisionStyleViT

    with pytest.raises(LoRAError, match=r"use_dora is not supported on nn\.MultiheadAttention's packed"):
        inject_lora(TorchvisionStyleViT(), ["q"], r=2, use_dora=True)
    model = inject_lora(TorchvisionStyleViT().eval(), ["q", "v"], r=2, kind="vera_like")  # a kind that can
    randomise(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(merge_lora(copy.deepcopy(model))(x), model(x), rtol=1e-5, atol=1e-5)
