"""Micro-benchmark of alternative `LoRALinear.forward` formulations (issue 5).

One ViT attention input ``x`` (tokens = batch * 197, width d) feeds three adapted
projections q, k, v exactly as in a ViT block; each variant runs forward and backward of
that triple. Reported per variant: median time of interleaved repetitions, ratio to the
frozen floor (three plain frozen Linears, gradient flowing to ``x``), bytes of tensors saved
for backward (storages counted once, so a tensor shared by q/k/v counts once), and, with
``--compile``, the same under ``torch.compile(fullgraph=True)`` with graph breaks counted.

This file does not touch the library: every formulation is written out here so they can be
compared side by side; the winner is proposed for ``lora_vit/layer.py``.

    python benchmarks/explore_layer.py --width 384 --reps 15 --compile
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------- dropout masks

_LANE_BITS = 16  # a mask draws 16 random bits per element: 4 elements per int64 draw


def _keep_threshold(p: float) -> tuple[int, float]:
    """Integer threshold on a 16-bit lane and the exact keep probability it gives."""
    drop = round(p * (1 << _LANE_BITS))
    return drop, 1.0 - drop / (1 << _LANE_BITS)


def fast_keep_mask(shape: torch.Size, p: float, device: torch.device, generator=None) -> Tensor:
    """Bernoulli keep-mask from 64-bit random integers cut into 4 lanes of 16 bits.

    ``bernoulli_`` draws one random number per element; this draws one per 4 elements and
    is ~6x faster on CPU. ``p`` is rounded to a multiple of 2**-16 (0.1 -> 0.100006).
    """
    numel = shape.numel()
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((numel + 3) // 4,), dtype=torch.int64,
                          device=device, generator=generator)
    lanes = words.view(torch.int16)[:numel].view(shape)
    drop, _ = _keep_threshold(p)
    return lanes >= drop - (1 << 15)


def hash_keep_mask(shape: torch.Size, p: float, seed: Tensor) -> Tensor:
    """Counter-based keep-mask: a 32-bit integer hash of (seed, element index).

    Pure tensor ops, so ``torch.compile`` fuses it into one kernel and the partitioner can
    regenerate it in backward from the seed instead of saving it.
    """
    idx = torch.arange(shape.numel(), device=seed.device, dtype=torch.int64).view(shape)
    h = (idx + seed) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h = h ^ (h >> 15)
    h = (h * 0x1B873593) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    drop, _ = _keep_threshold(p)
    return (h & 0xFFFF) >= drop


# --------------------------------------------------------------------------- autograd functions


class DropoutDownBool(torch.autograd.Function):
    """h = dropout(x) @ A.T saving x and a bool mask (not the dropped copy)."""

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, p: float) -> Tensor:
        keep = fast_keep_mask(x.shape, p, x.device)
        scale = 1.0 / _keep_threshold(p)[1]
        ctx.save_for_backward(x, a, keep)
        ctx.scale = scale
        return F.linear(x * keep * scale, a)

    @staticmethod
    def backward(ctx, gh: Tensor):
        x, a, keep = ctx.saved_tensors
        scaled = keep * ctx.scale
        ga = gh.flatten(0, -2).t() @ (x * scaled).flatten(0, -2)
        return (gh @ a) * scaled, ga, None


class DropoutDownRegen(torch.autograd.Function):
    """h = dropout(x) @ A.T saving x and an int seed; the mask is regenerated in backward.

    Eager only: ``torch.Generator`` objects are not traceable by dynamo.
    """

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, p: float) -> Tensor:
        seed = int(torch.randint(1 << 62, ()))
        gen = torch.Generator(x.device).manual_seed(seed)
        keep = fast_keep_mask(x.shape, p, x.device, gen)
        ctx.save_for_backward(x, a)
        ctx.seed, ctx.p = seed, p
        ctx.scale = 1.0 / _keep_threshold(p)[1]
        return F.linear(x * keep * ctx.scale, a)

    @staticmethod
    def backward(ctx, gh: Tensor):
        x, a = ctx.saved_tensors
        gen = torch.Generator(x.device).manual_seed(ctx.seed)
        scaled = fast_keep_mask(x.shape, ctx.p, x.device, gen) * ctx.scale
        ga = gh.flatten(0, -2).t() @ (x * scaled).flatten(0, -2)
        return (gh @ a) * scaled, ga, None


def keep_mask(shape: torch.Size, p: float, seed: Tensor, device: torch.device, backward: bool = False) -> Tensor:
    """The dropout keep-mask for ``seed`` (a 0-dim int64 CPU tensor), reproducible in backward.

    Eager: 64-bit draws from a generator seeded with ``seed`` (fast on CPU). Under
    torch.compile (dynamo cannot trace generators): the counter hash, fused by inductor.
    """
    if torch.compiler.is_compiling():
        if backward:  # a different (equal) seed expression, so CSE cannot fold the
            seed = seed.neg().neg()  # regenerated mask into the forward one and save it
        return hash_keep_mask(shape, p, seed.to(device))
    gen = torch.Generator(device).manual_seed(int(seed))
    return fast_keep_mask(shape, p, device, gen)


class LoRAFused(torch.autograd.Function):
    """The whole layer, ``x @ W.T + b + (dropout(x) @ A.T) @ Bs.T``, as one autograd node.

    Saves x (shared by q/k/v, so once per block), the (N, r) hidden and, with dropout, a
    seed from which backward regenerates the mask; never a dropped copy or a mask. grad_x
    is one ``addmm`` on top of the LoRA term, so autograd adds nothing. ``Bs`` is the
    already scaled B, built outside with autograd.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, a: Tensor, bs: Tensor, p: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        out = F.linear(x2, w, b)
        seed = torch.randint(1 << 62, (), dtype=torch.int64)
        scale = 1.0
        if p > 0:
            keep = keep_mask(x2.shape, p, seed, x.device)
            scale = 1.0 / _keep_threshold(p)[1]
            h = F.linear(torch.where(keep, x2, 0.0), a * scale)
        else:
            h = F.linear(x2, a)
        out.addmm_(h, bs.t())
        ctx.save_for_backward(x2, w, a, bs, h, seed)
        ctx.p, ctx.scale = p, scale
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, g: Tensor):
        x2, w, a, bs, h, seed = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gh = g2 @ bs
        keep = keep_mask(x2.shape, ctx.p, seed, x2.device, backward=True) if ctx.p > 0 else None
        gx = gw = gb = ga = gbs = None
        if ctx.needs_input_grad[0]:
            lora = (gh * ctx.scale) @ a
            if keep is not None:
                lora = torch.where(keep, lora, 0.0)
            gx = torch.addmm(lora, g2, w).view(*g.shape[:-1], x2.shape[-1])
        if ctx.needs_input_grad[1]:
            gw = g2.t() @ x2
        if ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        if ctx.needs_input_grad[3]:
            ga = (gh * ctx.scale).t() @ (torch.where(keep, x2, 0.0) if keep is not None else x2)
        if ctx.needs_input_grad[4]:
            gbs = g2.t() @ h
        return gx, gw, gb, ga, gbs, None


# --------------------------------------------------------------------------- formulations


class Proj(nn.Module):
    """A frozen Linear(d, d) with a rank-r adapter; ``kind`` picks the forward."""

    def __init__(self, d: int, r: int, p: float, kind: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) / d**0.5, requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(d), requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(r, d) * 0.02)
        self.lora_B = nn.Parameter(torch.randn(d, r) * 0.02)
        self.p, self.kind, self.c = p, kind, 2.0
        self.drop = nn.Dropout(p) if p > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return FORWARDS[self.kind](self, x)


def _floor(m: Proj, x: Tensor) -> Tensor:
    return F.linear(x, m.weight, m.bias)


def _current(m: Proj, x: Tensor) -> Tensor:
    result = F.linear(x, m.weight, m.bias)
    hidden = F.linear(m.drop(x), m.lora_A)
    return result + F.linear(hidden, m.lora_B * m.c)


def _scale_hidden(m: Proj, x: Tensor) -> Tensor:
    result = F.linear(x, m.weight, m.bias)
    return result + F.linear(F.linear(m.drop(x), m.lora_A) * m.c, m.lora_B)


def _addmm(m: Proj, x: Tensor, hidden: Tensor | None = None) -> Tensor:
    result = F.linear(x, m.weight, m.bias)
    if hidden is None:
        hidden = F.linear(m.drop(x), m.lora_A)
    out = result.view(-1, result.shape[-1])
    out.addmm_(hidden.view(-1, hidden.shape[-1]), m.lora_B.t(), alpha=m.c)
    return result


def _native_mask(m: Proj, x: Tensor) -> Tensor:
    """Plain autograd with the fast mask: autograd keeps the dropped copy."""
    keep = fast_keep_mask(x.shape, m.p, x.device)
    return _addmm(m, x, F.linear(x * keep * (1.0 / _keep_threshold(m.p)[1]), m.lora_A))


def _rand_mask(m: Proj, x: Tensor) -> Tensor:
    """torch.rand_like mask in plain ops (what inductor lowers dropout to)."""
    keep = torch.rand_like(x) >= m.p
    return _addmm(m, x, F.linear(x * keep * (1.0 / (1.0 - m.p)), m.lora_A))


def _hash_mask(m: Proj, x: Tensor) -> Tensor:
    """Counter-hash mask in plain ops; the seed is a 0-dim tensor drawn from torch's RNG."""
    seed = torch.randint(1 << 31, (), device=x.device)
    keep = hash_keep_mask(x.shape, m.p, seed)
    return _addmm(m, x, F.linear(x * keep * (1.0 / _keep_threshold(m.p)[1]), m.lora_A))


def _fn_bool(m: Proj, x: Tensor) -> Tensor:
    return _addmm(m, x, DropoutDownBool.apply(x, m.lora_A, m.p))


def _fn_regen(m: Proj, x: Tensor) -> Tensor:
    return _addmm(m, x, DropoutDownRegen.apply(x, m.lora_A, m.p))


def _fused(m: Proj, x: Tensor) -> Tensor:
    return LoRAFused.apply(x, m.weight, m.bias, m.lora_A, m.lora_B * m.c, m.p)


FORWARDS: dict[str, Callable[[Proj, Tensor], Tensor]] = {
    "floor": _floor,
    "a_current": _current,
    "c_scale_hidden": _scale_hidden,
    "b_addmm": _addmm,
    "e_fastmask_plain": _native_mask,
    "e_randlike_plain": _rand_mask,
    "e_hash_plain": _hash_mask,
    "d_fn_boolmask": _fn_bool,
    "d_fn_regen": _fn_regen,
    "d_fused_regen": _fused,
}
EAGER_ONLY = {"d_fn_regen"}


class Triple(nn.Module):
    """q, k, v projections of one shared input, as in a ViT attention block."""

    def __init__(self, d: int, r: int, p: float, kind: str) -> None:
        super().__init__()
        self.q, self.k, self.v = (Proj(d, r, p, kind) for _ in range(3))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.q(x), self.k(x), self.v(x)


def saved_bytes(fn: Callable, x: Tensor, params: list[Tensor]) -> int:
    """Bytes of distinct storages saved for backward during one forward, parameters excluded."""
    seen: dict[int, int] = {}
    skip = {p.untyped_storage().data_ptr() for p in params}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = fn(x)
    del outs
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=384, help="384 = ViT-S, 768 = ViT-B")
    parser.add_argument("--tokens", type=int, default=8 * 197)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(fullgraph=True)")
    parser.add_argument("--only", nargs="*", help="subset of variants (floor is always run)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    names = [n for n in FORWARDS if not args.only or n in args.only or n == "floor"]
    modes = ["eager"] + (["compiled"] * args.compile)
    runs: dict[tuple[str, str], Callable] = {}
    params: list[Tensor] = []
    breaks: dict[tuple[str, str], int] = {}
    for name in names:
        p = 0.0 if name in ("floor",) else args.dropout
        model = Triple(args.width, args.rank, p, name).train()
        params += list(model.parameters())
        for mode in modes:
            if mode == "compiled" and name in EAGER_ONLY:
                continue
            if mode == "compiled":
                torch._dynamo.utils.counters.clear()
                fn = torch.compile(model, fullgraph=True)
            else:
                fn = model
            runs[(name, mode)] = fn
    x0 = torch.randn(args.tokens // 197, 197, args.width, requires_grad=True)
    grads = [torch.randn(args.tokens // 197, 197, args.width) for _ in range(3)]

    def step(fn: Callable) -> None:
        x = x0 * 1.0  # non-leaf, like a LayerNorm output
        torch.autograd.backward(list(fn(x)), grads)

    memory = {}
    for key, fn in runs.items():  # warm-up (compiles) and memory
        torch._dynamo.utils.counters.clear()
        step(fn)
        step(fn)
        breaks[key] = sum(torch._dynamo.utils.counters["graph_break"].values())
        memory[key] = saved_bytes(fn, x0 * 1.0, params)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
    for _ in range(args.reps):  # interleaved: every variant once per round
        for key, fn in runs.items():
            start = time.perf_counter()
            step(fn)
            times[key].append(time.perf_counter() - start)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, tokens {args.tokens},"
          f" width {args.width}, r {args.rank}, dropout {args.dropout}, reps {args.reps}")
    print(f"{'variant':<18} {'mode':<9} {'ms':>8} {'x floor':>8} {'min x':>6} {'saved MiB':>10} {'x N*d':>8} breaks")
    for mode in modes:
        base_t = statistics.median(times[("floor", mode)])
        base_min = min(times[("floor", mode)])
        for name in names:
            if (name, mode) not in runs:
                continue
            med = statistics.median(times[(name, mode)])
            mem = memory[(name, mode)]
            rel_min = min(times[(name, mode)]) / base_min
            print(f"{name:<18} {mode:<9} {med * 1e3:8.2f} {med / base_t:8.3f} {rel_min:6.3f} {mem / 2**20:10.2f}"
                  f" {mem / 2**20 / args.tokens / args.width / 4 * 2**20:8.2f} {breaks[(name, mode)]}")


if __name__ == "__main__":
    main()
