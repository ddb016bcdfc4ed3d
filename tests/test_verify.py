"""`verify_lora`: off-path adapters are named, on-path ones pass, and the model is left bit-identical."""

import copy

import pytest
import torch
import torch.nn.functional as F
from models import HF4StyleViT, PlainNet, TimmStyleViT, hf_vit_mae
from torch import nn

from lora_vit import LoRAError, LoRALinear, inject_lora
from lora_vit.verify import verify_lora


class ReadsWeight(nn.Module):
    """Calls ``called`` but reads ``read.weight`` directly, as nn.MultiheadAttention does."""

    def __init__(self):
        super().__init__()
        self.called = nn.Linear(6, 6)
        self.read = nn.Linear(6, 6)
        self.unused = nn.Linear(6, 6)

    def forward(self, x):
        return self.called(x) + F.linear(x, self.read.weight, self.read.bias)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_off_path_adapters_are_named_with_the_reason():
    model = inject_lora(ReadsWeight(), ["called", "read", "unused"], r=2)
    with pytest.raises(LoRAError) as caught:
        verify_lora(model, torch.randn(3, 6))
    first = str(caught.value).splitlines()[0]
    assert first.endswith("['read', 'unused']") and "2 of 3" in first
    assert "F.linear(x, layer.weight" in str(caught.value)


@pytest.mark.parametrize("make", [TimmStyleViT, PlainNet, HF4StyleViT], ids=lambda m: m.__name__)
def test_every_adapter_on_the_path_passes_and_the_model_is_unchanged(make):
    inputs = {"TimmStyleViT": torch.randn(2, 3, 32, 32), "PlainNet": torch.randn(4, 12),
              "HF4StyleViT": torch.randn(2, 5, 32)}[make.__name__]
    model = inject_lora(make(), "all-linear", r=2, alpha=4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.adapter_parameters()[1].normal_()  # non-zero B: restoring it must be exact
    model.train()
    model.get_submodule(next(n for n, m in model.named_modules() if isinstance(m, LoRALinear))).eval()
    modes = [m.training for m in model.modules()]
    before = snapshot(model)
    rng = torch.get_rng_state()
    changes = verify_lora(model, inputs)
    assert len(changes) == sum(len(m.slices) for m in model.modules() if isinstance(m, LoRALinear))
    assert all(change > 0 for change in changes.values())
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)


def test_sampling_models_compare_like_with_like_and_kwargs_are_forwarded():
    pytest.importorskip("transformers")
    model = hf_vit_mae()
    model.config.mask_ratio = 0.5  # random masking on every forward
    model = inject_lora(model, ["q", "v"], r=2)
    changes = verify_lora(model, pixel_values=torch.randn(2, 3, 32, 32))
    assert len(changes) == 4


def test_a_model_without_adapters_or_float_outputs_is_refused():
    with pytest.raises(LoRAError, match="no LoRA adapters"):
        verify_lora(nn.Linear(2, 2), torch.randn(1, 2))

    class Argmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x).argmax(-1)

    with pytest.raises(LoRAError, match="no floating-point tensor"):
        verify_lora(inject_lora(Argmax(), ["fc"], r=2), torch.randn(2, 4))


def test_a_perturbation_restores_even_when_the_forward_raises():
    model = inject_lora(copy.deepcopy(PlainNet()), ["stem"], r=2)
    before = snapshot(model)
    with pytest.raises(RuntimeError):
        verify_lora(model, torch.randn(4, 7))  # wrong width: the forward itself fails
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
