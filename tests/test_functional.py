"""Dropout semantics of the fused LoRA node: rate, scaling, mask reuse in backward, independence, memory."""

import pytest
import torch
import torch._dynamo
from torch import nn

from lora_vit import LoRALinear
from lora_vit.functional import keep_probability

D = 64


def identity_branch(p: float) -> LoRALinear:
    """A layer whose output is exactly ``dropout(x)``: W = 0, A = B = I, scaling 1."""
    layer = LoRALinear(nn.Linear(D, D, bias=False), r=D, alpha=D, dropout=p).train()
    with torch.no_grad():
        layer.weight.zero_()
        layer.lora_A.copy_(torch.eye(D))
        layer.lora_B.copy_(torch.eye(D))
    return layer


def run(layer, x, mode):
    if mode == "eager":
        return layer(x)
    torch._dynamo.reset()
    return torch.compile(layer, backend=mode, fullgraph=True)(x)


MODES = ["eager", "aot_eager"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_rate_and_inverted_scaling(mode, p):
    layer = identity_branch(p)
    x = torch.rand(400, D) + 1.0  # strictly positive, so a zero output means "dropped"
    out = run(layer, x, mode).detach()
    kept = out != 0
    keep = keep_probability(p)
    n = kept.numel()
    sigma = (keep * (1 - keep) / n) ** 0.5
    assert abs(kept.float().mean().item() - keep) < 5 * sigma
    scale = torch.tensor(1 / keep, dtype=torch.float32)
    torch.testing.assert_close(out[kept], x[kept] * scale, rtol=1e-6, atol=0)
    assert abs(out.sum().item() / x.sum().item() - 1) < 0.02  # E[dropout(x)] = x


@pytest.mark.parametrize("mode", MODES)
def test_backward_reuses_the_forward_mask(mode):
    layer = identity_branch(0.3)
    x = (torch.rand(50, 7, D) + 1.0).requires_grad_()
    g = torch.randn(50, 7, D)
    out = run(layer, x, mode)
    (out * g).sum().backward()
    keep = out.detach() != 0
    scale = 1 / keep_probability(0.3)
    torch.testing.assert_close(x.grad, torch.where(keep, g * scale, 0.0), rtol=1e-5, atol=1e-6)
    # Adapter gradients equal those of the dense formula with that same mask.
    a = layer.lora_A.detach().clone().requires_grad_()
    b = layer.lora_B.detach().clone().requires_grad_()
    dropped = torch.where(keep, x.detach(), 0.0) * scale
    ((dropped @ a.T @ b.T) * g).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, a.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.lora_B.grad, b.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_masks_are_independent_across_calls_and_layers(mode):
    x = torch.rand(300, D) + 1.0
    q, k = identity_branch(0.5), identity_branch(0.5)
    masks = [run(q, x, mode) != 0, run(q, x, mode) != 0, run(k, x, mode) != 0]

    def corr(m1, m2):
        return torch.corrcoef(torch.stack([m1.flatten().float(), m2.flatten().float()]))[0, 1].item()

    assert abs(corr(masks[0], masks[1])) < 0.03
    assert abs(corr(masks[0], masks[2])) < 0.03
    # No structure along features or tokens: every column and row keeps about half.
    assert masks[0].float().mean(0).sub(0.5).abs().max() < 0.15
    assert masks[0].float().mean(1).sub(0.5).abs().max() < 0.25


def test_eager_masks_follow_torch_manual_seed():
    layer, x = identity_branch(0.5), torch.rand(20, D) + 1.0
    torch.manual_seed(3)
    first = layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), first)


def test_eval_mode_uses_no_dropout():
    layer, x = identity_branch(0.5).eval(), torch.rand(20, D)
    assert torch.equal(layer(x), layer(x))
    torch.testing.assert_close(layer(x), x)


def test_dropout_keeps_no_copy_of_the_input_for_backward():
    """q, k and v on one input save that input once, not a dropped copy and a mask each."""
    x = torch.randn(8, 197, 96, requires_grad=True)
    layers = [LoRALinear(nn.Linear(96, 96), r=8, dropout=0.1).train() for _ in range(3)]
    storages: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = [layer(x) for layer in layers]
    saved = sum(storages.values())
    tokens = 8 * 197
    # x once, plus per layer its (tokens, r) hidden, its scaled B (96, 8) and a seed.
    budget = x.nbytes + 3 * (tokens * 8 * 4 + 96 * 8 * 4 + 8)
    assert x.nbytes <= saved <= budget, f"saved {saved / x.nbytes:.2f}x the input"
    # nn.Dropout in front of each adapter would add a dropped copy and a mask per layer:
    assert saved < 1.5 * x.nbytes
    sum(o.sum() for o in outs).backward()
    assert all(layer.lora_A.grad is not None for layer in layers)


def test_keep_probability_rounds_to_16_bits():
    assert keep_probability(0.0) == 1.0
    assert keep_probability(0.5) == 0.5
    assert abs(keep_probability(0.1) - 0.9) < 2**-16


def test_inductor_dropout_matches_the_regenerated_mask():
    layer = identity_branch(0.25)
    x = (torch.rand(64, D) + 1.0).requires_grad_()
    torch._dynamo.reset()
    out = torch.compile(layer, fullgraph=True)(x)
    out.sum().backward()
    keep = out.detach() != 0
    assert abs(keep.float().mean().item() - keep_probability(0.25)) < 0.02
    torch.testing.assert_close(x.grad, keep.float() / keep_probability(0.25), rtol=1e-5, atol=1e-6)
