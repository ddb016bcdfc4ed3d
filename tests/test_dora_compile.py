"""torch.compile(fullgraph=True) on DoRA models: one graph, no breaks, eager's numbers, train and eval."""

import copy

import pytest
import torch
import torch._dynamo
from compile_support import assert_inductor_matches_eager
from models import HF4StyleViT, TimmStyleViT
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from lora_vit import LoRALinear, inject_lora, merge_lora

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

FAMILIES = {
    "timm": (TimmStyleViT, lambda: torch.randn(2, 3, 32, 32)),  # fused qkv: DoRA on q/v slices
    "hf4": (HF4StyleViT, lambda: torch.randn(2, 5, 32)),
}


def adapted(build, dropout=0.0):
    torch.manual_seed(0)
    model = inject_lora(build(), ["q", "v", "o", "fc1"], r=2, alpha=4, dropout=dropout, use_dora=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for s in m.slices:
                    getattr(m, s.b_name).normal_(0, 0.1)
                    getattr(m, s.magnitude_name).mul_(1.2)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_dora_training_compiles_to_one_graph_and_matches_eager(family):
    build, make_input = FAMILIES[family]
    eager = adapted(build).train()
    compiled_model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (eager, compiled_model)]
    for _ in range(3):
        x = make_input()
        for model, opt in zip((eager, compiled), opts):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    assert counter.frame_count == 1, "recompiled across training steps"
    assert dict(counters["graph_break"]) == {}
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_dora_inference_compiles_to_one_graph_and_matches_eager(merged):
    model = adapted(TimmStyleViT, dropout=0.1).eval()
    if merged:
        merge_lora(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(2, 3, 32, 32)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1 and dict(counters["graph_break"]) == {}


def test_dora_dropout_train_and_eval_compile_once_each():
    model = adapted(TimmStyleViT, dropout=0.1)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for _ in range(2):
        model.train()
        compiled(torch.randn(2, 3, 32, 32)).sum().backward()
        model.eval()
        with torch.no_grad():
            compiled(torch.randn(2, 3, 32, 32))
    assert counter.frame_count == 2 and dict(counters["graph_break"]) == {}
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.slow
def test_dora_inductor_matches_eager():
    assert_inductor_matches_eager(adapted(TimmStyleViT).train(), torch.randn(2, 3, 32, 32))


def test_compiled_dora_saves_nothing_of_size_out_by_in():
    """The min-cut partitioner (inductor's) must recompute g * W in backward, not save it."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 24))
    inject_lora(block, ["0", "2"], r=2, dropout=0.1, use_dora=True)
    compiled = torch.compile(block, backend="aot_eager_decomp_partition", fullgraph=True)
    x = torch.randn(64, 24, requires_grad=True)
    compiled(x).sum().backward()  # compile first: the hooks then see only the graph's saved tensors
    shapes = []
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:  # the graph passes parameters along too
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = compiled(x)
    out.sum().backward()
    assert shapes and (40, 24) not in shapes and (24, 40) not in shapes, shapes
    assert block[0].lora_magnitude.grad is not None
