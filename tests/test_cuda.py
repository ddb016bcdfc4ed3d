"""The CUDA path: the same code, on a GPU, in bf16, eager and through inductor (Triton).

Skipped where no CUDA device is present (CI has none); run on a GPU machine with
``python -m pytest tests/test_cuda.py``.
"""

import copy

import pytest
import torch
import torch._dynamo
from models import TimmStyleViT, hf_vit
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from lora_vit import LoRALinear, inject_lora, load_lora, merge_lora, save_lora

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def relative_error(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def randomise(model, scale=0.05):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for p in m.adapter_parameters():
                    p.normal_(0, scale)


def test_bf16_layer_matches_the_dense_formula():
    layer = LoRALinear(nn.Linear(256, 384), {"q": 8, "v": 4}, 16, 0.0,
                       slices={"q": (0, 128), "v": (256, 384)}).cuda().to(torch.bfloat16)
    randomise(layer, 0.1)
    x = torch.randn(4, 50, 256, device="cuda", dtype=torch.bfloat16)
    w = layer.weight.double() + layer.delta_weight().double()
    ref = x.double() @ w.T + layer.bias.double()
    assert relative_error(layer(x), ref) < 1e-2


def test_bf16_merge_rounds_once_on_the_gpu():
    layer = LoRALinear(nn.Linear(128, 128), r=8, alpha=16).cuda().to(torch.bfloat16)
    randomise(layer, 0.1)
    expected = (layer.weight.float() + 2.0 * layer.lora_B.float() @ layer.lora_A.float()).to(torch.bfloat16)
    assert torch.equal(merge_lora(layer).weight, expected)


@pytest.mark.parametrize("build", [TimmStyleViT, hf_vit], ids=["timm", "hf"])
def test_inductor_bf16_autocast_training_step_is_one_graph_and_matches_eager(build):
    torch._dynamo.reset()
    counters.clear()
    eager = inject_lora(build(), ["q", "k", "v"], r=4, alpha=8, dropout=0.0).cuda().train()
    randomise(eager)
    compiled_model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)
    for _ in range(2):
        x = torch.randn(4, 3, 32, 32, device="cuda")
        for model in (eager, compiled):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x)
                out = out if isinstance(out, torch.Tensor) else out.last_hidden_state
            out.float().square().mean().backward()
    assert counter.frame_count == 1 and dict(counters["graph_break"]) == {}
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        if a.grad is not None:
            assert relative_error(b.grad, a.grad) < 3e-2, name


def test_adapter_saved_from_gpu_loads_on_cpu(tmp_path):
    base = TimmStyleViT().eval()
    model = inject_lora(copy.deepcopy(base).cuda(), ["q", "v"], r=2, trainable=["head"]).eval()
    randomise(model)
    path = save_lora(model, tmp_path / "gpu.safetensors")
    cpu = load_lora(copy.deepcopy(base), path).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(cpu(x), model(x.cuda()).cpu(), rtol=1e-3, atol=1e-4)
