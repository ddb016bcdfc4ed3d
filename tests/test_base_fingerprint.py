"""Adapter files remember the base weights they were trained on; another base is refused."""

import copy
import json

import pytest
import torch
from models import TimmStyleViT
from safetensors import safe_open
from safetensors.torch import save_file

from lora_vit import LoRAError, LoRALinear, inject_lora, load_lora, lora_state_dict, save_lora
from lora_vit.fingerprint import SAMPLES, base_fingerprint, mismatch, sample_positions


@pytest.fixture
def saved(tmp_path):
    base = TimmStyleViT().eval()
    model = inject_lora(copy.deepcopy(base), ["q", "v"], r=2, trainable=["head"]).eval()
    with torch.no_grad():
        for tensor in lora_state_dict(model).values():
            tensor.normal_(0, 0.1)
    return base, model, save_lora(model, tmp_path / "a.safetensors")


def header_of(path):
    with safe_open(str(path), "pt") as handle:
        return dict(handle.metadata())


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_file_records_sampled_base_values_of_every_adapted_layer(saved):
    _, model, path = saved
    record = json.loads(header_of(path)["base_fingerprint"])
    assert record["method"] == "strided-samples-v1"
    assert sorted(record["layers"]) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    weight = model.blocks[1].attn.qkv.weight.detach().reshape(-1)
    assert record["layers"]["blocks.1.attn.qkv"] == [float(weight[i]) for i in sample_positions(weight.numel())]
    assert len(set(sample_positions(96 * 32))) == SAMPLES  # distinct positions, spread over rows
    assert len({i // 32 for i in sample_positions(96 * 32)}) > SAMPLES // 2


def test_another_base_is_refused_by_name_and_the_model_is_unchanged(saved):
    _, _model, path = saved
    other = TimmStyleViT().eval()  # same architecture, other weights (another checkpoint)
    before = snapshot(other)
    with pytest.raises(LoRAError, match=r"trained on other base weights.*2 of 2 adapted layers.*"
                                         r"'blocks.0.attn.qkv' \(max relative difference .*check_base=False"):
        load_lora(other, path)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())
    assert not any(isinstance(m, LoRALinear) for m in other.modules())


def test_check_base_false_loads_onto_another_base(saved):
    _, model, path = saved
    other = load_lora(TimmStyleViT().eval(), path, check_base=False)
    for key, value in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(other)[key], value)


def test_already_injected_model_on_another_base_is_refused(saved):
    _, _, path = saved
    other = inject_lora(TimmStyleViT(), ["q", "v"], r=2, trainable=["head"])
    with pytest.raises(LoRAError, match="trained on other base weights"):
        load_lora(other, path)


def test_a_slightly_fine_tuned_base_is_refused(saved):
    base, _, path = saved
    drifted = copy.deepcopy(base)
    with torch.no_grad():
        drifted.blocks[1].attn.qkv.weight.mul_(1.05)  # one layer moved by 5 %
    with pytest.raises(LoRAError, match=r"1 of 2 adapted layers.*'blocks.1.attn.qkv'"):
        load_lora(drifted, path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_the_same_base_in_another_dtype_is_accepted(saved, dtype):
    base, model, path = saved
    cast = load_lora(copy.deepcopy(base).to(dtype), path)
    x = torch.randn(2, 3, 32, 32)
    tolerance = {torch.bfloat16: 0.1, torch.float16: 0.01, torch.float64: 1e-5}[dtype]
    torch.testing.assert_close(cast.eval()(x.to(dtype)).float(), model(x), atol=tolerance, rtol=tolerance)


def test_files_without_a_fingerprint_still_load(saved, tmp_path):
    _base, model, path = saved
    header = {k: v for k, v in header_of(path).items() if k != "base_fingerprint"}
    old = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in lora_state_dict(model).items()}, str(old), metadata=header)
    fresh = load_lora(TimmStyleViT().eval(), old)  # no record, so no check
    assert torch.equal(fresh.head.weight, model.head.weight)


def test_mismatch_tolerates_one_bfloat16_rounding_and_nothing_like_another_checkpoint():
    values = torch.randn(SAMPLES) * 0.02
    same = values.to(torch.bfloat16).float()
    assert mismatch(values.tolist(), same.tolist()) is None
    assert mismatch(values.tolist(), (values * 1.02).tolist()) is not None
    assert mismatch(values.tolist(), [float("nan")] * SAMPLES) == float("inf")


def test_unreadable_weights_have_no_fingerprint():
    assert base_fingerprint(torch.zeros(4, 3, device="meta"), (4, 3)) is None
    assert base_fingerprint(torch.zeros(4, 3, dtype=torch.int8), (4, 3)) is None
    assert base_fingerprint(torch.zeros(6), (4, 3)) is None  # an FSDP shard, not the whole weight
    assert base_fingerprint(torch.ones(4, 3), (4, 3)) == [1.0] * SAMPLES
