"""The LoRA linear map as one autograd node, with a dropout mask that is never stored.

``lora_linear(x, W, b, A, Bs, p) = x @ W.T + b + (dropout_p(x) @ A.T) @ Bs.T``

Why a custom autograd Function: with ``nn.Dropout`` in front of the adapter, autograd keeps,
per adapted layer, a dropped copy of the input (for ``dA``) and the mask (for ``dx``): about
three extra activations per q/k/v triple, the bulk of a LoRA step's memory overhead. Here the
node saves only ``x`` (q, k and v receive the same tensor, so it is stored once per block),
the small ``(N, r)`` hidden and a 0-dim seed; the mask is regenerated from the seed in
backward. ``dx`` is the floor's own matmul with the rank-r term added into it in place (or,
without dropout at full precision, one matmul with ``W + Bs @ A``: see :func:`_folds`), and
the eager mask is a 1.0 / 0.0 tensor in the input's dtype, so every multiply by it is a
same-dtype vectorised one.

Dropout semantics: each call draws an independent Bernoulli keep-mask over the elements of
``x`` (independent per layer, per step); kept elements are scaled by ``1 / keep_prob``. The
mask is cut from 16-bit random lanes, so ``p`` is rounded to a multiple of ``2**-16``
(0.1 -> 0.100006) and the scaling uses the exact keep probability. Eager mode draws a seed
from torch's global RNG (reproducible under ``torch.manual_seed``) and cuts the lanes from the
words of a generator seeded with it (NumPy's PCG64DXSM on CPU, torch's on other devices);
under ``torch.compile`` a counter-based hash of (seed, element index) is used, which inductor
fuses into neighbouring kernels. The two modes give different (equally distributed) masks.
Double backward is not supported.

DoRA (:func:`dora_linear`) is a second node beside it, sharing the mask helpers:
``y = g * (x @ W.T + (dropout_p(x) @ A.T) @ Bs.T) + b`` with a per-row factor ``g = m / ||W + Bs A||_row``
computed outside the node (:func:`dora_row_norms`, never forming ``W + Bs A``) and applied to
the rows of ``W`` and ``Bs`` (not to the larger output). It saves the same tensors plus its own
output (which the attention that consumes q/k/v saves anyway, so no new storage) and the
``(out,)`` factor: ``dg`` needs the pre-scale output, recovered from the saved one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["as_base_weight", "dora_linear", "dora_row_norms", "keep_probability", "lora_linear"]

_LANE_BITS = 16
_LANES = 1 << _LANE_BITS
_SEED_LIMIT = 1 << 62


def keep_probability(p: float) -> float:
    """The exact probability that an element is kept when dropout ``p`` is requested."""
    return 1.0 - round(p * _LANES) / _LANES


def as_base_weight(weight: Tensor, base_requires_grad: bool) -> Tensor:
    """``weight`` as the base layer held it before :func:`lora_vit.inject_lora` froze it.

    ATen chooses its matmul kernel by whether the weight requires a gradient: a batched input
    that is not contiguous (``nn.MultiheadAttention`` transposes a batch-first input before its
    in-projection) is folded into one ``mm`` for a trainable weight and run as a ``bmm`` for a
    frozen one. The two sum in another order on some CPUs (AMD EPYC: ~3e-7 apart), so the base
    function of an adapted layer, to be the base layer's function bit for bit, must present its
    frozen weight as the base layer did. A detached alias that requires grad makes ATen choose as
    it did for the base; any gradient computed for it is discarded (the base layer computed it too).

    Compiling returns ``weight`` itself: AOTAutograd cannot trace a leaf made inside the graph,
    and a compiled graph makes no bitwise promise anyway (inductor chooses its own kernels).
    """
    if not base_requires_grad or weight.requires_grad or torch.compiler.is_compiling():
        return weight
    return weight.detach().requires_grad_()


def _hashed_keep_mask(numel: int, drop: int, seed: Tensor, device: torch.device) -> Tensor:
    # A few rounds of xor-shift-multiply over (seed + index): cheap, branch-free, and
    # expressible in elementwise ops that dynamo can trace (it cannot trace Generators).
    h = (torch.arange(numel, device=device, dtype=torch.int64) + seed) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h = h ^ (h >> 15)
    h = (h * 0x1B873593) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return (h & (_LANES - 1)) >= drop


def _random_words(count: int, seed: Tensor, device: torch.device) -> Tensor:
    """``count`` uniformly random 64-bit words (int64) on ``device``, determined by ``seed``."""
    if device.type == "cpu":
        # NumPy's PCG64DXSM fills words 2-3x faster than torch's CPU generator (a serial
        # mt19937): drawing the mask twice per layer and step is most of dropout's eager cost.
        return torch.from_numpy(np.random.PCG64DXSM(int(seed)).random_raw(count).view(np.int64))
    generator = torch.Generator(device).manual_seed(int(seed))
    return torch.randint(-(1 << 63), (1 << 63) - 1, (count,), dtype=torch.int64, device=device, generator=generator)


def _generated_keep_mask(numel: int, drop: int, seed: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    # One 64-bit word yields four 16-bit lanes: several times cheaper than bernoulli_ on CPU.
    words = _random_words((numel + 3) // 4, seed, device)
    # The comparison is written straight into the input's dtype (1.0 kept, 0.0 dropped): the
    # multiplies by the mask are then same-dtype, vectorised ones, where a bool mask makes
    # each of them a mixed-type multiply that is several times slower on CPU.
    keep = torch.empty(numel, dtype=dtype, device=device)
    return torch.ge(words.view(torch.int16)[:numel], drop - (1 << (_LANE_BITS - 1)), out=keep)


def _keep_mask(
    shape: torch.Size, p: float, seed: Tensor, device: torch.device, dtype: torch.dtype, regenerate: bool
) -> Tensor:
    """The keep-mask drawn from ``seed`` (bool, or 1.0 / 0.0 in ``dtype``): the same seed gives the same mask."""
    drop = round(p * _LANES)
    if torch.compiler.is_compiling():
        if regenerate:
            # Spelled differently from the forward's, so that common-subexpression
            # elimination cannot fold the two masks into one saved tensor.
            seed = seed.neg().neg()
        return _hashed_keep_mask(shape.numel(), drop, seed, device).view(shape)
    return _generated_keep_mask(shape.numel(), drop, seed, device, dtype).view(shape)


def _new_seed(device: torch.device) -> Tensor:
    # Eager: a CPU scalar, read on the host without a device sync. Compiled: on the data's
    # device, so the graph moves nothing between devices.
    where = device if torch.compiler.is_compiling() else torch.device("cpu")
    return torch.randint(_SEED_LIMIT, (), dtype=torch.int64, device=where)


def _folds(x2: Tensor, weight: Tensor, a: Tensor, scaled_b: Tensor, p: float) -> bool:
    """Whether the update is better added to the weight than to the output, with no precision lost.

    Without dropout, ``x @ W.T + (x @ A.T) @ Bs.T == x @ (W + Bs @ A).T``. Forming ``W + Bs @ A``
    costs one pass over the ``(out, in)`` weight; adding the rank-r term to the output costs
    a pass over the ``(N, out)`` output (and a skinny matmul over ``x`` in inference): folding
    wins once there are at least as many rows as features. Only at full precision (fp32 or
    fp64, no autocast): rounding ``W + Bs @ A`` to bf16 could swallow a small update whole.
    """
    return (
        p == 0
        and x2.shape[0] >= max(weight.shape)
        and weight.dtype in (torch.float32, torch.float64)
        and x2.dtype == weight.dtype == a.dtype == scaled_b.dtype
        and not torch.is_autocast_enabled(x2.device.type)
    )


def _needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd will want gradients of any of ``tensors`` (else no node need be built)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _folded_weight(weight: Tensor, a: Tensor, scaled_b: Tensor) -> Tensor:
    return torch.addmm(weight, scaled_b, a)


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x2: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, scaled_b: Tensor, p: float
    ) -> Tensor:
        folded = _folds(x2, weight, a, scaled_b, p)
        out = F.linear(x2, _folded_weight(weight, a, scaled_b) if folded else weight, bias)
        dtype = out.dtype  # the autocast dtype when autocast is on
        scale = 1.0
        seed = None  # no mask to regenerate
        if p > 0:
            seed = _new_seed(x2.device)
            keep = _keep_mask(x2.shape, p, seed, x2.device, dtype, regenerate=False)
            scale = 1.0 / keep_probability(p)
            # The mask's buffer becomes the dropped input (in the compute dtype): no new (N, in) tensor.
            dropped = keep.mul_(x2) if keep.dtype == dtype else (x2 * keep).to(dtype)
            hidden = F.linear(dropped, (a * scale).to(dtype))
        else:
            hidden = F.linear(x2.to(dtype), a.to(dtype))  # kept for dB
        if not folded:
            out.addmm_(hidden, scaled_b.to(dtype).t())
        ctx.save_for_backward(x2, weight, a, scaled_b, hidden, seed)
        ctx.p, ctx.scale, ctx.folded = p, scale, folded
        # 2-D in, 2-D out, reshaped by the caller: a view made here would forbid callers'
        # in-place ops on the result (timm's EVA does ``qkv += bias``).
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x2, weight, a, scaled_b, hidden, seed = ctx.saved_tensors
        dtype = grad.dtype
        g2 = grad
        keep = _keep_mask(x2.shape, ctx.p, seed, x2.device, dtype, regenerate=True) if ctx.p > 0 else None
        grad_hidden = g2 @ scaled_b.to(dtype)  # (N, R), fresh: scaled in place
        if ctx.scale != 1.0:
            grad_hidden.mul_(ctx.scale)
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            # Matmuls accumulate into an existing (N, in) tensor in place (addmm_): no
            # temporary is copied into a fresh output, and each case allocates one buffer.
            if ctx.folded:  # dx = g @ (W + Bs @ A), as in forward
                grad_x = g2 @ _folded_weight(weight, a, scaled_b)
            elif keep is None:
                grad_x = (g2 @ weight.to(dtype)).addmm_(grad_hidden, a.to(dtype))
            else:  # the masked rank-r term, then the floor's matmul accumulated onto it: one (N, in) buffer
                grad_x = (grad_hidden @ a.to(dtype)).mul_(keep).addmm_(g2, weight.to(dtype))
            grad_x = grad_x.to(x2.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g2.t() @ x2.to(dtype)).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0).to(weight.dtype)
        if ctx.needs_input_grad[3]:
            if keep is None:
                dropped = x2.to(dtype)
            elif keep.dtype != dtype:  # compiled: a bool mask
                dropped = (x2 * keep).to(dtype)
            else:  # the mask is not needed after this: its buffer becomes the dropped input
                dropped = keep.mul_(x2)
            grad_a = (grad_hidden.t() @ dropped).to(a.dtype)
        if ctx.needs_input_grad[4]:
            # (R, N) @ (N, out) reads g2 row-major; g2.t() @ hidden would copy g2 transposed first.
            grad_b = (hidden.t() @ g2).t().to(scaled_b.dtype)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, scaled_b: Tensor, p: float) -> Tensor:
    """``x @ weight.T + bias + (dropout_p(x) @ a.T) @ scaled_b.T``, saving no dropped copy of ``x``.

    Args:
        x: Input ``(*, in_features)``.
        weight: Base weight ``(out_features, in_features)``.
        bias: Base bias ``(out_features,)`` or ``None``.
        a: Stacked down-projections ``(R, in_features)``.
        scaled_b: Up-projections times their scalings ``(out_features, R)``.
        p: Dropout probability on the LoRA branch's input; 0 in eval mode.

    Returns:
        ``(*, out_features)``, in the dtype ``F.linear`` gives (the autocast dtype under autocast).
    """
    x2 = x.reshape(-1, x.shape[-1])
    if p == 0 and not _needs_grad(x2, weight, bias, a, scaled_b):
        out = _no_grad_forward(x2, weight, bias, a, scaled_b)  # inference: no autograd node to build
    else:
        out = _LoRALinear.apply(x2, weight, bias, a, scaled_b, p)
    return out.view(*x.shape[:-1], out.shape[-1])


def _no_grad_forward(x2: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, scaled_b: Tensor) -> Tensor:
    if _folds(x2, weight, a, scaled_b, 0.0):
        return F.linear(x2, _folded_weight(weight, a, scaled_b), bias)
    out = F.linear(x2, weight, bias)
    dtype = out.dtype
    return out.addmm_(F.linear(x2.to(dtype), a.to(dtype)), scaled_b.to(dtype).t())


class _DoRALinear(torch.autograd.Function):
    """``g * (x W^T + dropout(x) A^T Bs^T) + b``; the LoRA node's saving scheme plus ``g`` and the output."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x2: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        a: Tensor,
        scaled_b: Tensor,
        row_scale: Tensor,
        p: float,
    ) -> Tensor:
        # The row scale goes into the (out, in) weight and (out, R) up-projection, which are
        # smaller than the (N, out) output for any batch of more than in_features tokens, and
        # g == 1 (a fresh adapter) leaves W as it is, so the output is F.linear's bit for bit.
        out = F.linear(x2, _scale_rows(weight, row_scale), bias)
        dtype = out.dtype
        scale = 1.0
        seed = None
        if p > 0:
            seed = _new_seed(x2.device)
            keep = _keep_mask(x2.shape, p, seed, x2.device, x2.dtype, regenerate=False)
            scale = 1.0 / keep_probability(p)
            hidden = F.linear((x2 * keep).to(dtype), (a * scale).to(dtype))
        else:
            hidden = F.linear(x2.to(dtype), a.to(dtype))
        out.addmm_(hidden, _scale_rows(scaled_b, row_scale).to(dtype).t())
        ctx.save_for_backward(x2, weight, bias, a, scaled_b, hidden, seed, row_scale, out)
        ctx.p, ctx.scale = p, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x2, weight, bias, a, scaled_b, hidden, seed, row_scale, out = ctx.saved_tensors
        dtype = grad.dtype
        keep = _keep_mask(x2.shape, ctx.p, seed, x2.device, x2.dtype, regenerate=True) if ctx.p > 0 else None
        if torch.compiler.is_compiling():
            # Spelled differently from the forward's, so that common-subexpression elimination
            # cannot fold the backward's g * W into the forward's and make the partitioner save
            # an (out, in) tensor per layer (measured: it does) instead of recomputing it.
            row_scale = row_scale.neg().neg()
        grad_hidden = (grad @ _scale_rows(scaled_b, row_scale).to(dtype)) * ctx.scale
        grad_x = grad_w = grad_bias = grad_a = grad_b = grad_scale = None
        if ctx.needs_input_grad[0]:
            lora = grad_hidden @ a.to(dtype)
            if keep is not None:
                lora.mul_(keep)
            grad_x = torch.addmm(lora, grad, _scale_rows(weight, row_scale).to(dtype)).to(x2.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _scale_rows((grad.t() @ x2.to(dtype)), row_scale).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0).to(bias.dtype)
        if ctx.needs_input_grad[3]:
            dropped = x2 * keep if keep is not None else x2
            grad_a = (grad_hidden.t() @ dropped.to(dtype)).to(a.dtype)
        if ctx.needs_input_grad[4]:
            grad_b = _scale_rows(grad.t() @ hidden, row_scale).to(scaled_b.dtype)
        if ctx.needs_input_grad[5]:
            # dg_i = sum_t grad_ti z_ti with z = (y - b) / g the pre-scale output, recovered
            # from the saved output rather than stored (or recomputed with a full matmul).
            acc = torch.promote_types(row_scale.dtype, torch.float32)
            zg = (grad * out).sum(0, dtype=acc)
            if bias is not None:
                zg = zg - bias.to(acc) * grad.sum(0, dtype=acc)
            g = row_scale.to(acc)
            # A zero factor loses z; its gradient is then taken as zero rather than 0/0.
            safe = torch.where(g == 0, torch.ones_like(g), g)
            grad_scale = torch.where(g == 0, torch.zeros_like(zg), zg / safe).to(row_scale.dtype)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, grad_scale, None


def _scale_rows(matrix: Tensor, row_scale: Tensor) -> Tensor:
    """``row_scale[:, None] * matrix``, computed in the wider dtype and rounded once to the matrix's."""
    return (matrix * row_scale[:, None]).to(matrix.dtype)


def dora_row_norms(weight: Tensor, a: Tensor, scaled_b: Tensor) -> Tensor:
    """``||W_i + (scaled_b @ a)_i||`` per output row, without forming the ``(out, in)`` sum.

    ``||W_i||^2 + 2 Bs_i (A W_i^T) + Bs_i (A A^T) Bs_i^T``: an ``(R, out)`` and an ``(R, R)``
    product. Computed in float32 (float64 for a float64 weight) with autocast off, and
    without gradient (DoRA treats the norm as a constant in backward, as the paper's section
    4.3 and PEFT do). The sum is clamped below at the smallest normal float, so a zero row
    gets a tiny positive norm instead of a division by zero.

    Precision: the squared norm is a sum of terms; when the update nearly cancels a row
    (``||W_i + dW_i|| << ||W_i||``) the relative error grows like ``eps * ||W_i||^2 /
    ||W_i + dW_i||^2`` (float32: 1e-7 times that ratio).

    Args:
        weight: ``(out_features, in_features)``.
        a: ``(R, in_features)``.
        scaled_b: ``(out_features, R)``.

    Returns:
        ``(out_features,)`` in float32 (float64 for a float64 weight).
    """
    acc = torch.promote_types(weight.dtype, torch.float32)
    with torch.autocast(weight.device.type, enabled=False):
        w = weight.detach()
        a32 = a.detach().to(acc)
        b32 = scaled_b.detach().to(acc)
        # (w * w).sum(1), not linalg.vector_norm(dim=1): the latter takes as long as a full
        # (N, in) x (in, out) matmul on CPU (torch 2.13), this is a thousand times faster.
        w_wide = w.to(acc)
        w_sq = (w_wide * w_wide).sum(1)
        # A W^T in the weight's dtype (no float32 copy of a low-precision W), then widened.
        aw = F.linear(a32.to(w.dtype), w).to(acc)  # (R, out)
        cross = (b32 * aw.t()).sum(1)
        own = ((b32 @ (a32 @ a32.t())) * b32).sum(1)
        sq = w_sq + 2 * cross + own
        return sq.clamp_min(torch.finfo(acc).tiny).sqrt()


def dora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, scaled_b: Tensor, row_scale: Tensor, p: float
) -> Tensor:
    """``row_scale * (x @ weight.T + (dropout_p(x) @ a.T) @ scaled_b.T) + bias``, as one autograd node.

    With ``row_scale = m / ||W + scaled_b @ a||_row`` this is DoRA; dropout acts on the LoRA
    branch's input only (the base term sees ``x`` itself). Saves no dropped copy of ``x`` and
    nothing of size ``(out, in)``.

    Args:
        x: Input ``(*, in_features)``.
        weight: Base weight ``(out_features, in_features)``.
        bias: Base bias ``(out_features,)`` or ``None``.
        a: Stacked down-projections ``(R, in_features)``.
        scaled_b: Up-projections times their scalings ``(out_features, R)``.
        row_scale: Per-row factor ``(out_features,)`` (1 on rows without an adapter).
        p: Dropout probability on the LoRA branch's input; 0 in eval mode.

    Returns:
        ``(*, out_features)``, in the dtype ``F.linear`` gives.
    """
    x2 = x.reshape(-1, x.shape[-1])
    if p == 0 and not _needs_grad(x2, weight, bias, a, scaled_b, row_scale) and _folds(x2, weight, a, scaled_b, 0.0):
        # Inference at full precision with many tokens: one matmul with g * (W + Bs A), the
        # weight merge_lora would store, instead of the hidden, its product and a pass over
        # the output. No autograd node is built.
        out = F.linear(x2, _scale_rows(_folded_weight(weight, a, scaled_b), row_scale), bias)
    else:
        out = _DoRALinear.apply(x2, weight, bias, a, scaled_b, row_scale, p)
    return out.view(*x.shape[:-1], out.shape[-1])
