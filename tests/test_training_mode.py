"""An adapted layer takes the training mode of the module it replaces (inject, add, load, PEFT load, merge)."""

import copy
import functools

import models
import pytest
import torch
from mha_models import TorchvisionStyleViT
from models import PlainNet
from torch import nn

from lora_vit import (
    LoRALinear,
    LoRAMultiheadAttention,
    inject_lora,
    load_lora,
    load_peft_adapter,
    merge_lora,
    save_lora,
    save_peft_adapter,
)

X = torch.randn(6, 12)


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}



randomised = functools.partial(models.randomise, scale=0.3)


@pytest.mark.parametrize("mode", [False, True])
def test_inject_keeps_the_models_mode_everywhere(mode):
    model = PlainNet().train(mode)
    inject_lora(model, ["stem", "mixer.left"], r=2, dropout=0.5, trainable=["readout"])
    inject_lora(model, ["mixer.right"], r=2, dropout=0.5, trainable=["readout"], adapter="b")
    assert set(modes(model).values()) == {mode}, modes(model)


def test_dropout_stays_off_after_injecting_into_a_model_in_eval():
    model = randomised(inject_lora(PlainNet().eval(), ["stem", "mixer.left", "mixer.right"], r=2, dropout=0.5))
    assert isinstance(model.stem, LoRALinear) and not model.stem.training
    with torch.no_grad():
        # Active dropout (p=0.5) would make two calls differ almost surely.
        torch.testing.assert_close(model(X), model(X), rtol=0, atol=0)


def test_mha_and_its_out_proj_keep_eval_mode():
    model = TorchvisionStyleViT().eval()
    inject_lora(model, ["q", "v", "o"], r=2, dropout=0.5)
    attention = model.encoder.layers[0].self_attention
    assert isinstance(attention, LoRAMultiheadAttention) and isinstance(attention.out_proj, LoRALinear)
    assert set(modes(model).values()) == {False}


def test_load_into_a_fresh_model_in_eval_keeps_eval(tmp_path):
    base = PlainNet()
    source = inject_lora(copy.deepcopy(base), ["stem", "mixer.left"], r=2, dropout=0.5, trainable=["readout"])
    randomised(source)
    save_lora(source, tmp_path / "a.safetensors")
    model = load_lora(base.eval(), tmp_path / "a.safetensors")
    assert isinstance(model.stem, LoRALinear) and set(modes(model).values()) == {False}
    loaded = load_lora(model, tmp_path / "a.safetensors", adapter="again")
    assert set(modes(loaded).values()) == {False}


def test_peft_load_into_a_model_in_eval_keeps_eval(tmp_path):
    source = randomised(inject_lora(PlainNet(), ["stem", "mixer.left"], r=2, dropout=0.5))
    save_peft_adapter(source, tmp_path / "peft")
    model = load_peft_adapter(PlainNet().eval(), tmp_path / "peft")
    assert isinstance(model.stem, LoRALinear) and set(modes(model).values()) == {False}


def test_merged_layers_keep_the_mode():
    model = merge_lora(randomised(inject_lora(PlainNet().eval(), ["stem"], r=2)))
    assert type(model.stem) is nn.Linear and not model.stem.training
