"""disable_lora: base outputs with adapters in place; nesting, exceptions and torch.compile."""

import copy

import pytest
import torch
import torch._dynamo
from mha_models import OpenClipStyleViT, TorchvisionStyleViT
from models import HF4StyleViT, TimmStyleViT
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from lora_vit import LoRAError, LoRALinear, LoRAMultiheadAttention, disable_lora, inject_lora

FAMILIES = {
    "timm": (TimmStyleViT, lambda: torch.randn(2, 3, 32, 32)),
    "hf4": (HF4StyleViT, lambda: torch.randn(2, 5, 32)),
    "torchvision": (TorchvisionStyleViT, lambda: torch.randn(2, 3, 32, 32)),
    "open_clip": (OpenClipStyleViT, lambda: torch.randn(2, 3, 32, 32)),
}


def adapted(base, dropout=0.1):
    model = inject_lora(copy.deepcopy(base), ["q", "k", "v", "o", "fc1", "fc2"], r=2, alpha=4, dropout=dropout)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (LoRALinear, LoRAMultiheadAttention)):
                for p in m.adapter_parameters():
                    p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["eval_no_grad", "train_grad"])
def test_disabled_model_computes_exactly_the_base_outputs(family, mode):
    build, make_input = FAMILIES[family]
    base = build()
    model = adapted(base)
    training = mode == "train_grad"
    base.train(training)
    model.train(training)
    x = make_input().requires_grad_(training)
    with torch.set_grad_enabled(training):
        expected = base(x)
        before = model(x) if not training else None
        with disable_lora(model) as same:
            assert same is model
            got = model(x)
        assert torch.equal(got, expected)
        if not training:
            assert not torch.equal(model(x), expected)
            assert torch.equal(model(x), before)
    if training:
        got.sum().backward()
        assert x.grad is not None  # the activation gradient still flows, as in the base model
        assert all(p.grad is None for n, p in model.named_parameters() if "lora_" in n)


def test_nesting_and_exceptions_restore_the_previous_state_exactly():
    base = TorchvisionStyleViT().eval()
    model = adapted(base).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        adapted_out, base_out = model(x), base(x)
        with disable_lora(model):
            with pytest.raises(KeyError), disable_lora(model):
                raise KeyError("inside")
            assert torch.equal(model(x), base_out), "the inner block must not re-enable the outer one's layers"
        assert torch.equal(model(x), adapted_out)
        with pytest.raises(RuntimeError), disable_lora(model):
            raise RuntimeError("boom")
        assert torch.equal(model(x), adapted_out)
    assert all("_lora_disabled" not in m.__dict__ for m in model.modules())


def test_a_model_without_adapters_is_refused():
    with pytest.raises(LoRAError, match="no LoRA adapters"), disable_lora(nn.Sequential(nn.Linear(2, 2))):
        pass


@pytest.mark.parametrize("family", ["timm", "torchvision"])
def test_compiled_model_adds_one_graph_for_the_disabled_state_and_no_break(family, fresh_dynamo):
    build, make_input = FAMILIES[family]
    base = build(depth=1).eval()
    model = adapted(base).eval()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = make_input()
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
            with disable_lora(compiled):
                torch.testing.assert_close(compiled(x), base(x), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 2
    assert dict(counters["graph_break"]) == {}


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("base_trainable", [True, False])
def test_disabled_layers_compute_the_base_as_it_was_given_frozen_or_trainable(base_trainable, grad):
    # ATen folds a non-contiguous batched input into one mm when the weight requires grad and runs a
    # bmm when it does not; on AMD EPYC the two round differently, so the disabled layer must present
    # its (now frozen) weight as the base layer held it.
    linear = nn.Linear(64, 96).requires_grad_(base_trainable)
    mha = nn.MultiheadAttention(64, 4, batch_first=True).requires_grad_(base_trainable)
    layers = [LoRALinear(copy.deepcopy(linear), r=2, alpha=4), LoRAMultiheadAttention(copy.deepcopy(mha), r=2, alpha=4)]
    for layer in layers:
        for name, param in layer.named_parameters():
            param.requires_grad_("lora_" in name)  # as inject_lora leaves them
            if "lora_" in name:
                param.data.normal_(0, 0.1)
        layer.train()
    x = torch.randn(2, 17, 64, requires_grad=grad)  # batch first: MHA projects its (17, 2, 64) transpose
    with torch.set_grad_enabled(grad):
        with disable_lora(layers[0]):
            assert torch.equal(layers[0](x.transpose(0, 1)), linear(x.transpose(0, 1)))
        with disable_lora(layers[1]):
            assert torch.equal(layers[1](x, x, x, need_weights=False)[0], mha(x, x, x, need_weights=False)[0])
    assert all(p.grad is None for layer in layers for n, p in layer.named_parameters() if "lora_" not in n)
