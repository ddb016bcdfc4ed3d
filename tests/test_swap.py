"""Swapping adapters of the same layout into a running compiled model: values change, no recompile."""

import copy

import pytest
import torch
import torch._dynamo
from mha_models import TorchvisionStyleViT
from models import TimmStyleViT
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from lora_vit import LoRAError, inject_lora, load_lora, load_lora_state_dict, lora_state_dict, save_lora

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def trained(base, seed):
    model = inject_lora(copy.deepcopy(base), ["q", "v", "o"], r=2, alpha=4, dropout=0.0, trainable=["head"] if
                        hasattr(base, "head") else ())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.mark.parametrize("family", [TimmStyleViT, TorchvisionStyleViT], ids=["timm", "torchvision"])
def test_files_and_state_dicts_of_the_same_layout_swap_in_without_recompiling(family, tmp_path):
    base = family(depth=1)
    running = trained(base, 0)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(running, backend=counter, fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        compiled(x)
        for seed in (1, 2):
            other = trained(base, seed)
            if seed == 1:
                load_lora(compiled, save_lora(other, tmp_path / f"{seed}.safetensors"))
            else:
                load_lora_state_dict(compiled, lora_state_dict(other))
            torch.testing.assert_close(compiled(x), other(x), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1, "a same-layout swap must reuse the compiled graph"
    assert dict(counters["graph_break"]) == {}


def test_another_rank_is_refused_and_leaves_the_running_model_as_it_was(tmp_path):
    base = TimmStyleViT(depth=1)
    running = trained(base, 0)
    before = copy.deepcopy(lora_state_dict(running))
    other = inject_lora(copy.deepcopy(base), ["q", "v", "o"], r=4, alpha=4, trainable=["head"])
    with pytest.raises(LoRAError, match="another layout"):
        load_lora(running, save_lora(other, tmp_path / "r4.safetensors"))
    after = lora_state_dict(running)
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("family", [TimmStyleViT, TorchvisionStyleViT], ids=["timm", "torchvision"])
def test_lower_ranks_pad_into_a_maximum_rank_model_without_recompiling(family, tmp_path):
    base = family(depth=1).eval()
    running = inject_lora(copy.deepcopy(base), ["q", "v", "o"], r=8, alpha=16, dropout=0.0)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(running, backend=counter, fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        compiled(x)
        for r, alpha, rslora in ((2, 4, False), (4, 32, True), (8, 8, False)):
            source = inject_lora(copy.deepcopy(base), ["q", "v", "o"], r=r, alpha=alpha, dropout=0.0,
                                 use_rslora=rslora).eval()
            for name, param in source.named_parameters():
                if "lora_" in name:
                    param.normal_(0, 0.1)
            path = save_lora(source, tmp_path / f"r{r}.safetensors")
            if r != 8:
                with pytest.raises(LoRAError, match="pad=True"):
                    load_lora(compiled, path)
            load_lora(compiled, path, pad=True)
            torch.testing.assert_close(compiled(x), source(x), rtol=1e-5, atol=1e-5)
        big = inject_lora(copy.deepcopy(base), ["q", "v", "o"], r=16, alpha=16)
        before = copy.deepcopy(lora_state_dict(running))
        with pytest.raises(LoRAError, match="higher ranks than this model"):
            load_lora(compiled, save_lora(big, tmp_path / "r16.safetensors"), pad=True)
        assert all(torch.equal(lora_state_dict(running)[k], v) for k, v in before.items())
    assert counter.frame_count == 1, "padded swaps must reuse the compiled graph"
    assert dict(counters["graph_break"]) == {}


def test_padding_does_not_paper_over_other_targets(tmp_path):
    base = TimmStyleViT(depth=1)
    running = inject_lora(copy.deepcopy(base), ["q", "v"], r=8)
    other = inject_lora(copy.deepcopy(base), ["q", "k"], r=2)
    with pytest.raises(LoRAError, match="another layout"):
        load_lora(running, save_lora(other, tmp_path / "qk.safetensors"), pad=True)
