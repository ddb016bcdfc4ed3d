"""DoRA on CUDA: bf16 autocast eager and inductor (Triton) against a float64 formula; skipped without a GPU."""

import copy

import pytest
import torch
import torch._dynamo
from models import TimmStyleViT
from torch import nn

from lora_vit import LoRALinear, inject_lora, merge_lora

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def relative_error(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def trained(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for s in m.slices:
                    getattr(m, s.b_name).normal_(0, 0.1)
                    getattr(m, s.magnitude_name).mul_(1.2)
    return model


def test_bf16_autocast_dora_layer_matches_the_dense_formula():
    layer = trained(LoRALinear(nn.Linear(256, 384), {"q": 8, "v": 4}, 16, 0.0, slices={"q": (0, 128), "v": (256, 384)},
                               use_dora=True)).cuda()
    x = torch.randn(4, 50, 256, device="cuda")
    w = layer.weight.double() + layer.delta_weight().double()
    scale = layer.row_scale(w.norm(dim=1).float()).double()
    ref = (x.double() @ w.T) * scale + layer.bias.double()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x)
    assert relative_error(out, ref) < 1e-2


@pytest.mark.slow
def test_inductor_dora_training_matches_eager_on_cuda():
    torch._dynamo.reset()
    eager = trained(inject_lora(TimmStyleViT(), ["q", "v", "fc1"], r=4, dropout=0.0, use_dora=True)).cuda().train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(4, 3, 32, 32, device="cuda")
    for model in (eager, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        if a.grad is not None:
            assert relative_error(b.grad, a.grad) < 2e-2, name
    merged = merge_lora(copy.deepcopy(eager).eval())
    with torch.no_grad():
        assert relative_error(merged(x), eager.eval()(x)) < 1e-4
