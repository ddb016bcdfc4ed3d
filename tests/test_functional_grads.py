"""Exact gradients of the fused LoRA node against autograd through the dense formula in float64."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_vit.functional import _folds, _keep_mask, _new_seed, keep_probability, lora_linear


@st.composite
def cases(draw):
    n = draw(st.integers(1, 40))
    d_in, d_out, r = draw(st.integers(1, 24)), draw(st.integers(1, 24)), draw(st.integers(1, 6))
    needs = draw(st.lists(st.booleans(), min_size=5, max_size=5))
    return {
        "n": n, "d_in": d_in, "d_out": d_out, "r": r, "bias": draw(st.booleans()),
        "needs": needs, "p": draw(st.sampled_from([0.0, 0.1, 0.5])), "seed": draw(st.integers(0, 2**31)),
    }


def dense(x, w, b, a, sb, keep, scale):
    dropped = x * keep * scale if keep is not None else x
    out = x @ w.T + dropped @ a.T @ sb.T
    return out + b if b is not None else out


@given(cases())
@settings(deadline=None, max_examples=60)
def test_every_gradient_matches_the_dense_formula_in_float64(case):
    gen = torch.Generator().manual_seed(case["seed"])
    n, d_in, d_out, r = case["n"], case["d_in"], case["d_out"], case["r"]
    shapes = [(n, d_in), (d_out, d_in), (d_out,), (r, d_in), (d_out, r)]
    tensors = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    if not case["bias"]:
        tensors[2] = None
    for t, need in zip(tensors, case["needs"]):
        if t is not None:
            t.requires_grad_(need)
    g = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    p = case["p"]

    torch.manual_seed(case["seed"])
    out = lora_linear(*tensors, p)
    keep = None
    if p > 0:  # the mask the node drew: same global RNG state, same seed, same mask
        torch.manual_seed(case["seed"])
        seed = _new_seed(torch.device("cpu"))
        keep = _keep_mask(torch.Size((n, d_in)), p, seed, torch.device("cpu"), torch.float64, regenerate=False)
        assert set(keep.unique().tolist()) <= {0.0, 1.0}
    leaves = [t for t in tensors if t is not None and t.requires_grad]
    if not leaves:
        return
    got = torch.autograd.grad(out, leaves, g)
    clones = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in tensors]
    ref_out = dense(*clones, keep, 1 / keep_probability(p))
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    want = torch.autograd.grad(ref_out, [c for c in clones if c is not None and c.requires_grad], g)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_eager_mask_is_zero_one_in_the_input_dtype_with_the_requested_rate(dtype):
    seed = torch.tensor(12345)
    keep = _keep_mask(torch.Size((300, 200)), 0.25, seed, torch.device("cpu"), dtype, regenerate=False)
    again = _keep_mask(torch.Size((300, 200)), 0.25, seed, torch.device("cpu"), dtype, regenerate=True)
    assert keep.dtype == dtype and torch.equal(keep, again)
    assert set(keep.unique().tolist()) == {0.0, 1.0}
    rate = keep.float().mean().item()
    sigma = (0.75 * 0.25 / keep.numel()) ** 0.5
    assert abs(rate - keep_probability(0.25)) < 5 * sigma


@pytest.mark.parametrize("tokens", [5, 64])  # fewer rows than features: unfolded; more: folded into W
def test_folded_and_unfolded_paths_agree_with_each_other_and_without_grad(tokens):
    gen = torch.Generator().manual_seed(tokens)
    x, w, b = torch.randn(tokens, 32, generator=gen), torch.randn(48, 32, generator=gen), torch.randn(48, generator=gen)
    a, sb = torch.randn(4, 32, generator=gen), torch.randn(48, 4, generator=gen)
    ref = (x.double() @ w.double().T + b.double() + x.double() @ a.double().T @ sb.double().T)
    with torch.no_grad():
        torch.testing.assert_close(lora_linear(x, w, b, a, sb, 0.0).double(), ref, rtol=1e-5, atol=1e-4)
    leaves = [t.clone().requires_grad_() for t in (x, a, sb)]
    out = lora_linear(leaves[0], w, b, leaves[1], leaves[2], 0.0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    g = torch.randn(tokens, 48, generator=gen)
    out.backward(g)
    gd = g.double()
    dense_w = w.double() + sb.double() @ a.double()
    torch.testing.assert_close(leaves[0].grad.double(), gd @ dense_w, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(leaves[1].grad.double(), (gd @ sb.double()).T @ x.double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(leaves[2].grad.double(), gd.T @ (x.double() @ a.double().T), rtol=1e-5, atol=1e-4)


def test_the_update_is_folded_into_the_weight_only_at_full_precision_without_dropout():
    x, w = torch.randn(64, 32), torch.randn(48, 32)
    a, sb = torch.randn(4, 32), torch.randn(48, 4)
    assert _folds(x, w, a, sb, 0.0)
    assert not _folds(x[:40], w, a, sb, 0.0)  # fewer rows than the weight's larger side
    assert not _folds(x, w, a, sb, 0.1)  # dropout acts on the branch's input only
    assert not _folds(x.bfloat16(), w.bfloat16(), a.bfloat16(), sb.bfloat16(), 0.0)  # W + dW rounded to bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _folds(x, w, a, sb, 0.0)  # the matmul would round W + dW to bf16


def test_bf16_autocast_step_with_dropout_matches_the_dense_formula_with_the_same_mask():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(96, 32, generator=gen).requires_grad_()
    w, b = torch.randn(40, 32, generator=gen), torch.randn(40, generator=gen)
    a = (torch.randn(4, 32, generator=gen) * 0.3).requires_grad_()
    sb = (torch.randn(40, 4, generator=gen) * 0.3).requires_grad_()
    g = torch.randn(96, 40, generator=gen)
    torch.manual_seed(11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_linear(x, w, b, a, sb, 0.3)
    assert out.dtype == torch.bfloat16
    out.float().backward(g)
    torch.manual_seed(11)
    seed = _new_seed(torch.device("cpu"))
    keep = _keep_mask(torch.Size((96, 32)), 0.3, seed, torch.device("cpu"), torch.float64, regenerate=False)
    leaves = [t.detach().double().requires_grad_() for t in (x, a, sb)]
    ref = dense(leaves[0], w.double(), b.double(), leaves[1], leaves[2], keep, 1 / keep_probability(0.3))
    ref.backward(g.double())
    rel = lambda got, want: ((got.double() - want).norm() / want.norm()).item()  # noqa: E731
    assert rel(out, ref.detach()) < 2e-2
    for got, want in zip((x.grad, a.grad, sb.grad), (t.grad for t in leaves)):
        assert got.dtype == torch.float32 and rel(got, want) < 3e-2
