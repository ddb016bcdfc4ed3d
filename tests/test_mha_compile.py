"""torch.compile(fullgraph=True) on models with LoRA inside nn.MultiheadAttention: one graph per mode, no breaks."""

import copy

import pytest
import torch
import torch._dynamo
from compile_support import assert_inductor_matches_eager
from mha_models import OpenClipStyleViT, TorchvisionStyleViT
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from lora_vit import LoRALinear, LoRAMultiheadAttention, inject_lora, merge_lora

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

FAMILIES = {"torchvision": TorchvisionStyleViT, "open_clip": OpenClipStyleViT}


def adapted(build, dropout=0.0):
    # One block: compile time grows with depth and one block shows every pattern.
    model = inject_lora(build(depth=1), ["q", "k", "v", "o", "fc1", "fc2"], r=2, alpha=4, dropout=dropout)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (LoRALinear, LoRAMultiheadAttention)):
                for p in m.adapter_parameters():
                    p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize(("family", "dropout"), [("torchvision", 0.0), ("open_clip", 0.1)])
def test_training_steps_compile_to_one_graph_and_match_eager(family, dropout):
    eager = adapted(FAMILIES[family], dropout).train()
    compiled_model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)
    eager_opt = torch.optim.SGD([p for p in eager.parameters() if p.requires_grad], lr=0.1)
    compiled_opt = torch.optim.SGD([p for p in compiled_model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        x = torch.randn(2, 3, 32, 32)
        for model, opt in ((eager, eager_opt), (compiled, compiled_opt)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    assert counter.frame_count == 1, "recompiled across training steps"
    assert dict(counters["graph_break"]) == {}
    if dropout == 0.0:  # with dropout the two modes draw different masks (documented)
        for (name, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(("family", "merged"), [("torchvision", False), ("open_clip", False), ("torchvision", True)])
def test_inference_compiles_to_one_graph_and_matches_eager(family, merged):
    model = adapted(FAMILIES[family], dropout=0.1).eval()
    if merged:
        merge_lora(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(2, 3, 32, 32)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1
    assert dict(counters["graph_break"]) == {}


def test_switching_between_train_and_eval_compiles_each_mode_once():
    model = adapted(TorchvisionStyleViT, dropout=0.1)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for _ in range(2):
        model.train()
        compiled(torch.randn(2, 3, 32, 32)).sum().backward()
        model.eval()
        with torch.no_grad():
            compiled(torch.randn(2, 3, 32, 32))
    assert counter.frame_count == 2 and dict(counters["graph_break"]) == {}


@pytest.mark.slow
def test_inductor_training_and_inference_match_eager():
    assert_inductor_matches_eager(adapted(TorchvisionStyleViT).train(), torch.randn(2, 3, 32, 32))


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_inductor_training_step_and_fast_path_inference_match_eager():
    eager = adapted(TorchvisionStyleViT, dropout=0.0).cuda().train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(4, 3, 32, 32, device="cuda")
    for model in (eager, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x).float().square().mean().backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        if a.grad is not None:
            err = ((b.grad.double() - a.grad.double()).norm() / a.grad.double().norm().clamp_min(1e-12)).item()
            assert err < 5e-2, name
    eager.eval()
    with torch.inference_mode():
        merged = merge_lora(copy.deepcopy(eager))
        torch.testing.assert_close(eager(x), merged(x), rtol=1e-4, atol=1e-4)
