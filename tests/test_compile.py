"""torch.compile(fullgraph=True) on injected models: one graph, no breaks, same numbers as eager."""

import copy

import pytest
import torch
import torch._dynamo
from compile_support import assert_inductor_matches_eager, output
from models import HF4StyleViT, TimmStyleViT, hf_vit
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from lora_vit import LoRALinear, inject_lora, merge_lora

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

FAMILIES = {
    "timm": (TimmStyleViT, lambda: torch.randn(2, 3, 32, 32)),
    "hf4": (HF4StyleViT, lambda: torch.randn(2, 5, 32)),
    "hf5": (hf_vit, lambda: torch.randn(2, 3, 32, 32)),
}


def adapted(build, dropout=0.0):
    model = inject_lora(build(), ["q", "k", "v", "o", "fc1", "fc2"], r=2, alpha=4, dropout=dropout)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for p in m.adapter_parameters():
                    p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_training_steps_compile_to_one_graph_and_match_eager(family):
    build, make_input = FAMILIES[family]
    eager = adapted(build).train()
    compiled_model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)
    eager_opt = torch.optim.SGD([p for p in eager.parameters() if p.requires_grad], lr=0.1)
    compiled_opt = torch.optim.SGD([p for p in compiled_model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        x = make_input()
        for model, opt in ((eager, eager_opt), (compiled, compiled_opt)):
            opt.zero_grad()
            output(model(x)).square().mean().backward()
            opt.step()
    assert counter.frame_count == 1, "recompiled across training steps"
    assert dict(counters["graph_break"]) == {}
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_inference_compiles_to_one_graph_and_matches_eager(family, merged):
    build, make_input = FAMILIES[family]
    model = adapted(build, dropout=0.1).eval()
    if merged:
        merge_lora(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        for _ in range(2):
            x = make_input()
            torch.testing.assert_close(output(compiled(x)), output(model(x)), rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1
    assert dict(counters["graph_break"]) == {}


def test_dropout_training_compiles_without_breaks():
    model = adapted(TimmStyleViT, dropout=0.1).train()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for _ in range(2):
        output(compiled(torch.randn(2, 3, 32, 32))).sum().backward()
    assert counter.frame_count == 1 and dict(counters["graph_break"]) == {}


def test_inductor_training_and_inference_match_eager():
    """The default backend (inductor; Triton on CUDA, C++ on CPU) compiles the same code path."""
    assert_inductor_matches_eager(adapted(TimmStyleViT).train(), torch.randn(2, 3, 32, 32))


def test_switching_between_train_and_eval_compiles_each_mode_once():
    model = adapted(TimmStyleViT, dropout=0.1)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for _ in range(3):
        model.train()
        output(compiled(torch.randn(2, 3, 32, 32))).sum().backward()
        model.eval()
        with torch.no_grad():
            compiled(torch.randn(2, 3, 32, 32))
    # One graph for training (dropout on), one for inference; alternating reuses both.
    assert counter.frame_count == 2 and dict(counters["graph_break"]) == {}
